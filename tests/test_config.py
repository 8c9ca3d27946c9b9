"""Config schema: unknown keys, wrong types and impossible values give one clear error."""

import pytest

from dsjax import config as config_lib
from dsjax.errors import ConfigError
from dsjax.parallel import sharding


def _config():
  return config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")


def test_defaults_validate():
  config_lib.validate(_config())


def test_unknown_key_is_named_with_suggestion():
  config = _config()
  config.train.stepz = 3
  expected = r"unknown key train\.stepz \(did you mean train\.steps\?\)"
  with pytest.raises(ConfigError, match=expected):
    config_lib.validate(config)


def test_unknown_section_and_model_field():
  config = _config()
  config.trian = {"steps": 1}
  config.model.featurez = (1,)
  with pytest.raises(ConfigError) as info:
    config_lib.validate(config)
  message = str(info.value)
  assert "unknown key trian (did you mean train?)" in message
  assert "unknown key model.featurez (did you mean model.features?)" in message
  assert "\n" not in message


def test_wrong_types():
  config = _config().to_dict()  # Plain dicts: ConfigDict itself rejects some type changes.
  config["train"]["steps"] = "100"
  config["logging"]["tensorboard"] = 1
  config["optimizer"]["learning_rate"] = 3  # An int where a float is expected is fine.
  with pytest.raises(ConfigError) as info:
    config_lib.validate(config_lib.ml_collections.ConfigDict(config))
  message = str(info.value)
  assert "train.steps must be int, got '100'" in message
  assert "logging.tensorboard must be bool, got 1" in message
  assert "learning_rate" not in message


@pytest.mark.parametrize("field, value, expected", [
    ("train.steps", 0, "train.steps must be >= 1"),
    ("train.batch_size", -4, "train.batch_size must be >= 1"),
    ("optimizer.learning_rate", 0.0, "optimizer.learning_rate must be > 0"),
    ("optimizer.name", "adagrad", "optimizer.name must be one of adamw, sgd, momentum"),
    ("precision.policy", "fp8", "precision policy 'fp8': 'fp8' is not key=dtype"),
    ("precision.policy", "p=f32,c=f8", "precision policy 'p=f32,c=f8'"),
    ("precision.loss_scale", {"min_scale": 0.0}, "min_scale"),
    ("data.val_fraction", 0.7, "data.val_fraction must be in [0, 0.5)"),
    ("distributed.peer_timeout_s", 0, "distributed.peer_timeout_s must be >= 1"),
    ("model.dropout_rate", 1.0, "model: dropout_rate must be in [0, 1)"),
    ("model.matmul_impl", "cublas", "model: matmul_impl must be one of xla, pallas"),
    ("model.name", "resnet-9000",
     "unknown model 'resnet-9000'; known models: bert-base, bert-mini, bert-tiny, centernet-dnas"),
])
def test_impossible_values(field, value, expected):
  config = _config()
  section, key = field.split(".")
  if isinstance(value, dict):
    config[section][key].update(value)
  else:
    config[section][key] = value
  with pytest.raises(ConfigError, match="^invalid config: ") as info:
    config_lib.validate(config)
  assert expected in str(info.value)


def test_batch_must_split_into_micro_batches():
  config = _config()
  config.train.batch_size, config.train.grad_accum_steps = 30, 4
  expected = "batch_size=30 does not split into .*=4 equal micro-batches"
  with pytest.raises(ConfigError, match=expected):
    config_lib.validate(config)


def test_pipeline_fsdp_gather_once_is_the_replica_rule():
  config = _config()
  config.parallel.pipeline_fsdp_gather_once = True
  rules = sharding.config_rules(config.parallel)
  assert rules[0] == ("replica", ("data", "fsdp"))  # First: it wins over the default.
  config.parallel.rules = "replica=data"
  # The rules are parsed once, by resolve (before any data loads), not by the schema check.
  from dsjax.train import resolve  # noqa: PLC0415

  with pytest.raises(ConfigError, match="names replica too: keep one of them"):
    resolve(config)
  config.parallel.pipeline_fsdp_gather_once = False
  assert resolve(config).rules[0] == ("replica", "data")


def test_all_problems_in_one_message():
  config = _config()
  config.train.steps = 0
  config.optimizer.learning_rate = -1.0
  with pytest.raises(ConfigError) as info:
    config_lib.validate(config)
  assert "train.steps" in str(info.value) and "learning_rate" in str(info.value)


def test_parse_arg():
  settings = config_lib.parse_arg("tiny,width=64", tiny=False, width=32)
  assert settings.tiny is True and settings.width == 64
  assert config_lib.parse_arg(None, tiny=False).tiny is False
  with pytest.raises(ConfigError, match="unknown config variant 'huge'; known: tiny"):
    config_lib.parse_arg("huge", tiny=False)
  with pytest.raises(ConfigError, match="width='x' is not a int"):
    config_lib.parse_arg("width=x", width=32)
