"""The config schema: defaults for every section and the start-up check.

Experiment files in `configs/` start from `base_config()` and override fields. Before a
run starts, `validate(config)` compares the config against the schema (the base config
plus the chosen model's own defaults) and raises one `ConfigError` listing every unknown
key, wrong type and impossible value, with the closest known key where there is one.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import ml_collections

from dsjax import precision
from dsjax.data import loader
from dsjax.errors import ConfigError, DataError
from dsjax.models import registry

OPTIMIZERS = ("adamw", "sgd", "momentum")
SCHEDULES = ("constant", "cosine")
DROPOUT_RNGS = ("threefry2x32", "rbg", "unsafe_rbg")


def base_config() -> ml_collections.ConfigDict:
  """Returns the defaults shared by every experiment.

  Returns:
    A ConfigDict with sections `model`, `data`, `train`, `optimizer`, `precision`,
    `checkpoint` and `logging`. The model section holds only `name`; the model's own
    fields come from its registry entry (see `with_model_defaults`).
  """
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = "cnn-digits"

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"
  config.data.data_dir = ""  # Real-format datasets read from here; embedded ones ignore it.
  config.data.val_fraction = 0.1
  config.data.split_seed = 0
  config.data.seq_len = 128  # Token data: tokens per packed sequence.
  config.data.vocab_size = 8192  # Token data: WordPiece vocabulary trained on the corpus.
  config.data.vocab_file = ""  # Token data: a pretrained vocab.txt instead (--init-from sets it).
  config.data.mlm_probability = 0.15  # Masked-LM: share of tokens predicted (80/10/10 rule).
  # Masked-LM training: positions per sequence the MLM head scores, gathered before the
  # vocabulary projection (NVIDIA BERT's max_predictions_per_seq); padded slots weigh 0,
  # and tokens masked beyond it stay unmasked. -1: from seq_len and mlm_probability (mean
  # + 4 sd: 36 at 128 x 15%); 0: the full head on every position. Evaluation uses the full head.
  config.data.max_predictions = -1
  config.data.num_examples = 0  # Synthetic data: examples generated; 0 is the loader's default.
  # Images: random crop + horizontal flip of training batches; detection: random flip and
  # zoom in [0.75, 1.25], with the boxes.
  config.data.augment = False
  config.data.image_size = 0  # Detection: the letterboxed input side; 0 is the dataset's.
  config.data.max_boxes = 0  # Detection: boxes per image, padded; 0 is the dataset's.
  config.data.cache_dir = ""  # Derived artefacts (e.g. the tokenizer); "" is the workdir.
  # Training batches (dsjax.data.loader): memory (gathered from in-memory arrays), grain
  # (read ahead by a grain pipeline: prepared token shards row by row, image files decoded
  # and augmented in its readers), or auto: grain for prepared shards and image folders.
  # Both give the same batches.
  config.data.loader = "auto"
  config.data.workers = 0  # grain worker processes; 0 reads in the training process.
  config.data.prefetch = 2  # grain: batches read ahead, by as many threads (per process).

  config.train = ml_collections.ConfigDict()
  config.train.steps = 500
  config.train.batch_size = 128  # Global batch per optimizer step (all micro-batches).
  config.train.grad_accum_steps = 1
  config.train.eval_every_steps = 100
  config.train.eval_batch_size = 256
  # Evaluate on the first N examples of each split (a corpus's val split can hold millions
  # of sequences); 0: every example.
  config.train.eval_examples = 0
  config.train.log_every_steps = 10
  # PRNG of the dropout masks: threefry2x32 (jax's default), rbg or unsafe_rbg (XLA's
  # bit generator, cheaper on GPU/TPU; masks then depend on the mesh).
  config.train.dropout_rng = "threefry2x32"
  # A pretrained checkpoint to start from (bert-*: a Hugging Face BERT folder); its model
  # sizes replace config.model's, and its vocab.txt becomes data.vocab_file.
  config.train.init_from = ""

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "cosine"
  # Steps over which the cosine decays to 0; 0 means train.steps. Set it when a run may
  # be extended with a larger --steps: the schedule then stays the same on resume.
  config.optimizer.decay_steps = 0
  config.optimizer.warmup_steps = 0  # Linear warm-up from 0, before either schedule.
  config.optimizer.weight_decay = 1e-4
  config.optimizer.momentum = 0.9
  config.optimizer.grad_clip_norm = 0.0  # 0 disables clipping.

  config.precision = ml_collections.ConfigDict()
  # A preset (fp32, bf16, fp16, mixed) or a policy string such as "p=f32,c=f16,o=f32".
  config.precision.policy = "fp32"
  # Dynamic loss scaling, used when the compute dtype is float16.
  config.precision.loss_scale = ml_collections.ConfigDict()
  config.precision.loss_scale.initial_scale = 2.0**15
  config.precision.loss_scale.growth_interval = 2000
  config.precision.loss_scale.growth_factor = 2.0
  config.precision.loss_scale.backoff_factor = 0.5
  config.precision.loss_scale.min_scale = 1.0
  config.precision.loss_scale.max_scale = 2.0**24
  # Keep only half-precision activations for the backward pass (float32 ones are
  # recomputed): less activation memory, same float32 master-weight gradients.
  config.precision.half_residuals = False
  # Adaptive per-layer precision (dsjax.precision.adaptive). None: on for `mixed` only;
  # False pins the plan (every layer in the compute dtype); True forces it on.
  config.precision.adaptive = ml_collections.config_dict.placeholder(bool)
  config.precision.controller = ml_collections.ConfigDict()
  config.precision.controller.check_every_steps = 10
  config.precision.controller.error_check_every_steps = 100
  config.precision.controller.overflow_fraction = 0.5
  config.precision.controller.error_tolerance = 0.05
  config.precision.controller.demote_fraction = 0.25
  config.precision.controller.stable_checks = 10

  # DNAS (dsjax-search); ignored by dsjax-train.
  config.search = ml_collections.ConfigDict()
  config.search.steps = 600
  config.search.order = 1  # 2: unrolled step with an exact Hessian-vector product.
  config.search.unroll_lr = 0.0  # xi of the second-order step; 0: optimizer.learning_rate.
  config.search.warmup_steps = 100  # Weights only, architecture frozen.
  config.search.arch_learning_rate = 3e-2
  config.search.arch_weight_decay = 1e-3
  config.search.temperature_start = 2.0
  config.search.temperature_end = 0.5
  config.search.aux_skip = 0.0  # DARTS- auxiliary skip weight at the start, decayed to 0.
  config.search.param_free_weight = 0.0  # Penalty on the probability of identity/zero ops.
  config.resource = ml_collections.ConfigDict()
  config.resource.target_flops = 0.0  # Per example; 0 means no budget.
  config.resource.target_params = 0.0
  # Budgets of a numeric-format search (model.backbone.precision_choices): bit-ops (MACs x
  # weight bits x activation bits, per example) and model bytes; 0 means no budget.
  config.resource.target_bitops = 0.0
  config.resource.target_model_bytes = 0.0
  config.resource.penalty_weight = 0.0

  # Device mesh (dsjax.parallel.mesh): one axis may be -1, "the rest of the devices".
  config.mesh = ml_collections.ConfigDict()
  config.mesh.pipe = 1
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.model = 1
  # Devices the mesh spans: 0 means all (of all processes); N the first N of one process
  # (scaling studies, or leaving devices to another job).
  config.mesh.num_devices = 0
  config.parallel = ml_collections.ConfigDict()
  # Overrides of the logical -> mesh axis rules, e.g. "embed=model,vocab=none".
  config.parallel.rules = ""
  config.parallel.microbatches = 0  # Pipeline micro-batches; 0 means 2 x mesh.pipe.
  # Circular pipeline: each microbatch goes round the stages this many times (layers are
  # cut into repeats x pipe chunks); 1 is GPipe. Needs microbatches >= mesh.pipe.
  config.parallel.pipeline_repeats = 1
  # With FSDP: gather each stage's weights once per step for the whole schedule (and reduce
  # their gradient once), not in every schedule step: more memory, less traffic. Same as
  # the rule replica=data+fsdp (MaxText's pipeline_fsdp_ag_once).
  config.parallel.pipeline_fsdp_gather_once = False
  # Data-parallel gradient exchange (dsjax.parallel.compression): none (XLA's dense
  # all-reduce), topk:DENSITY, threshold:T or powersgd:RANK, plus ",knob=value" options.
  config.parallel.grad_compression = "none"
  # 1: apply step t-1's gradient while step t's is exchanged (asynchronous update).
  config.parallel.delayed_update = 0
  # Let collectives run asynchronously behind compute (XLA flags per backend; set before
  # the backend starts, so it applies from the command line).
  config.parallel.overlap = True
  # Multi-process runs (dsjax.parallel.distributed); flags --coordinator etc. set these.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator = ""  # host:port of process 0.
  config.distributed.num_processes = 0  # 0: single process (or detected from the cluster).
  config.distributed.process_id = -1
  config.distributed.initialization_timeout = 300
  # Seconds without heartbeats after which a process counts as dead: the others then end,
  # each with one line naming it, instead of waiting in a collective (jax#22740).
  config.distributed.peer_timeout_s = 30
  config.distributed.cluster_detection = True  # Slurm, Kubernetes, Cloud TPU environments.

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 100
  config.checkpoint.max_to_keep = 3
  # Async saves overlap the write with training. Off by default: on CPU the host copy
  # can alias buffers that the next (donating) step reuses.
  config.checkpoint.async_save = False

  config.logging = ml_collections.ConfigDict()
  config.logging.tensorboard = True
  config.logging.progress_bar = True
  # A jax.profiler trace (TensorBoard/Perfetto) of the steps after the first
  # trace_after_steps (compilation and warm-up stay out of it); "" = no trace.
  config.logging.trace_dir = ""
  config.logging.trace_after_steps = 2
  # At the end of a run (or search), write its PNG plots into the workdir (dsjax.plots;
  # needs matplotlib, the `plot` extra). `dsjax-plot WORKDIR` draws them at any time.
  config.logging.plots = False
  return config


def with_model_defaults(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Sets `config.model` to the registered defaults of model `name`.

  Args:
    config: a config whose model section is replaced in place.
    name: a registered model name.

  Returns:
    The same config, for chaining.
  """
  spec = registry.get_spec(name)
  config.model = ml_collections.ConfigDict({"name": name, **spec.defaults})
  config.data.name = spec.dataset
  return config


def _schema(config: ml_collections.ConfigDict) -> dict[str, Any]:
  schema = base_config().to_dict()
  schema["model"].update(registry.get_spec(config.model.name).defaults)
  return schema


def _type_name(value: Any) -> str:
  return type(value).__name__


def _same_kind(value: Any, default: Any) -> bool:
  if default is None or value is None:
    return True
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, int | float)
  if isinstance(default, tuple | list):
    return isinstance(value, tuple | list)
  return isinstance(value, type(default))


def _compare(values: Mapping, schema: Mapping, prefix: str, problems: list[str]) -> None:
  for key, value in values.items():
    path = f"{prefix}{key}"
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema), n=1)
      hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
      problems.append(f"unknown key {path}{hint}")
    elif isinstance(schema[key], Mapping):
      if isinstance(value, Mapping):
        _compare(value, schema[key], f"{path}.", problems)
      else:
        problems.append(f"{path} must be a section, got {_type_name(value)}")
    elif not _same_kind(value, schema[key]):
      problems.append(f"{path} must be {_type_name(schema[key])}, got {value!r}")


def _check_values(config: ml_collections.ConfigDict, problems: list[str]) -> None:
  def check(ok: bool, message: str) -> None:
    if not ok:
      problems.append(message)

  train, opt = config.train, config.optimizer
  for field in ("steps", "batch_size", "grad_accum_steps", "eval_every_steps",
                "eval_batch_size", "log_every_steps"):
    check(train[field] >= 1, f"train.{field} must be >= 1, got {train[field]}")
  check(train.eval_examples >= 0, f"train.eval_examples must be >= 0 (0: every example), got "
        f"{train.eval_examples}")
  if train.batch_size >= 1 and train.grad_accum_steps >= 1:
    check(train.batch_size % train.grad_accum_steps == 0,
          f"train.batch_size={train.batch_size} does not split into "
          f"train.grad_accum_steps={train.grad_accum_steps} equal micro-batches: "
          f"use a batch size divisible by {train.grad_accum_steps}")
  check(config.logging.trace_after_steps >= 0,
        f"logging.trace_after_steps must be >= 0, got {config.logging.trace_after_steps}")
  check(train.dropout_rng in DROPOUT_RNGS, f"train.dropout_rng must be one of "
        f"{', '.join(DROPOUT_RNGS)}, got {train.dropout_rng!r}")
  check(opt.name in OPTIMIZERS,
        f"optimizer.name must be one of {', '.join(OPTIMIZERS)}, got {opt.name!r}")
  check(opt.schedule in SCHEDULES,
        f"optimizer.schedule must be one of {', '.join(SCHEDULES)}, got {opt.schedule!r}")
  check(opt.learning_rate > 0, f"optimizer.learning_rate must be > 0, got {opt.learning_rate}")
  check(opt.decay_steps >= 0, f"optimizer.decay_steps must be >= 0, got {opt.decay_steps}")
  check(opt.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {opt.warmup_steps}")
  check(opt.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {opt.weight_decay}")
  check(0 <= opt.momentum < 1, f"optimizer.momentum must be in [0, 1), got {opt.momentum}")
  check(opt.grad_clip_norm >= 0,
        f"optimizer.grad_clip_norm must be >= 0 (0 disables), got {opt.grad_clip_norm}")
  search = config.search
  check(search.steps >= 1, f"search.steps must be >= 1, got {search.steps}")
  check(search.order in (1, 2), f"search.order must be 1 or 2, got {search.order}")
  check(0 <= search.warmup_steps < search.steps or search.steps == 1,
        f"search.warmup_steps must be in [0, search.steps), got {search.warmup_steps}")
  check(search.arch_learning_rate > 0,
        f"search.arch_learning_rate must be > 0, got {search.arch_learning_rate}")
  check(search.temperature_start > 0 and search.temperature_end > 0,
        "search.temperature_start and temperature_end must be > 0")
  for field in ("target_flops", "target_params", "target_bitops", "target_model_bytes",
                "penalty_weight"):
    check(config.resource[field] >= 0, f"resource.{field} must be >= 0, got "
          f"{config.resource[field]}")
  backbone = config.model.get("backbone") or {}
  for field in ("target_bitops", "target_model_bytes"):
    check(config.resource[field] <= 0 or bool(backbone.get("precision_choices")),
          f"resource.{field} budgets a numeric-format search: set "
          "model.backbone.precision_choices, or budget target_flops/target_params instead")
  knobs = config.precision.controller
  for field in ("check_every_steps", "error_check_every_steps", "stable_checks"):
    check(knobs[field] >= 1, f"precision.controller.{field} must be >= 1, got {knobs[field]}")
  for field in ("overflow_fraction", "demote_fraction"):
    check(0 < knobs[field] <= 1,
          f"precision.controller.{field} must be in (0, 1], got {knobs[field]}")
  check(knobs.demote_fraction <= knobs.overflow_fraction,
        "precision.controller.demote_fraction must not exceed overflow_fraction "
        "(a demoted layer would be promoted again at once)")
  check(knobs.error_tolerance > 0,
        f"precision.controller.error_tolerance must be > 0, got {knobs.error_tolerance}")
  try:
    policy = precision.get_policy(config.precision.policy)
    precision.loss_scale_for(policy, **config.precision.loss_scale.to_dict())
    problems.extend(f"precision: {problem}" for problem in precision.check_policy(policy))
  except ConfigError as error:
    problems.append(f"precision: {error}")
  check(config.data.max_predictions >= -1,
        f"data.max_predictions must be >= 0 (0: every position) or -1 (derived from "
        f"seq_len and mlm_probability), got {config.data.max_predictions}")
  for field in ("image_size", "max_boxes"):
    check(config.data[field] >= 0,
          f"data.{field} must be >= 0 (0: the dataset's default), got {config.data[field]}")
  check(0 <= config.data.val_fraction < 0.5,
        f"data.val_fraction must be in [0, 0.5), got {config.data.val_fraction}")
  _check_loader(config.data, check)
  for axis, size in config.mesh.items():
    if axis != "num_devices":
      check(size >= 1 or size == -1, f"mesh.{axis} must be >= 1 or -1 (the rest), got {size}")
  check(config.mesh.num_devices >= 0,
        f"mesh.num_devices must be >= 0 (0: all devices), got {config.mesh.num_devices}")
  check(config.parallel.delayed_update in (0, 1),
        f"parallel.delayed_update must be 0 or 1, got {config.parallel.delayed_update}")
  check(config.parallel.pipeline_repeats >= 1,
        f"parallel.pipeline_repeats must be >= 1 (1: GPipe), got "
        f"{config.parallel.pipeline_repeats}")
  check(config.parallel.microbatches >= 0,
        f"parallel.microbatches must be >= 0 (0: 2 x mesh.pipe), got "
        f"{config.parallel.microbatches}")
  check(config.distributed.peer_timeout_s >= 1,
        f"distributed.peer_timeout_s must be >= 1, got {config.distributed.peer_timeout_s}")
  check(config.checkpoint.every_steps >= 1,
        f"checkpoint.every_steps must be >= 1, got {config.checkpoint.every_steps}")
  check(config.checkpoint.max_to_keep >= 1,
        f"checkpoint.max_to_keep must be >= 1, got {config.checkpoint.max_to_keep}")
  for message in registry.get_spec(config.model.name).check(config.model):
    problems.append(f"model: {message}")


def _check_loader(data_config: ml_collections.ConfigDict, check: Any) -> None:
  """data.loader, workers and prefetch: known values, and no knob that cannot act."""
  for field in ("workers", "prefetch"):
    check(data_config[field] >= 0, f"data.{field} must be >= 0, got {data_config[field]}")
  try:
    kind = loader.loader_kind(data_config)
  except DataError as error:
    check(False, str(error))
    return
  defaults = base_config().data
  for field in ("workers", "prefetch"):
    check(kind == "grain" or data_config[field] == defaults[field],
          f"data.{field} sets the grain loader, but data.loader={data_config.loader} reads "
          f"{data_config.name} in memory: set --config.data.loader=grain, or leave "
          f"data.{field} at {defaults[field]}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks a config against the schema; raises one ConfigError naming every problem.

  Args:
    config: the resolved config of a run.

  Raises:
    ConfigError: on unknown keys, wrong types or impossible values.
  """
  name = config.get("model", {}).get("name")
  if name not in registry.known_models():
    # The model decides the schema of its section: report this alone.
    raise ConfigError(f"invalid config: unknown model {name!r}; "
                      f"known models: {', '.join(registry.known_models())}")
  problems: list[str] = []
  _compare(config.to_dict(), _schema(config), "", problems)
  if not problems:  # Value checks assume the structure is right.
    _check_values(config, problems)
  if problems:
    raise ConfigError("invalid config: " + "; ".join(problems))


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses the `:arg` of `--config file.py:arg` into typed variant settings.

  `"tiny"` sets a boolean default to True; `"key=value"` parses value by the type of the
  default. Settings are comma-separated: `"tiny,width=64"`.

  Args:
    arg: the string after the colon, or None.
    **defaults: every accepted setting and its default value.

  Returns:
    A ConfigDict of the settings.

  Raises:
    ConfigError: an unknown setting, or a value that does not parse.
  """
  settings = ml_collections.ConfigDict(defaults)
  for item in filter(None, (part.strip() for part in (arg or "").split(","))):
    key, has_value, raw = item.partition("=")
    if key not in defaults:
      raise ConfigError(f"unknown config variant {key!r}; known: {', '.join(defaults) or 'none'}")
    default = defaults[key]
    try:
      if not has_value:
        value = True
      elif isinstance(default, bool):
        value = {"true": True, "false": False}[raw.lower()]
      else:
        value = type(default)(raw)
    except (KeyError, ValueError) as error:
      raise ConfigError(
          f"config variant {key}={raw!r} is not a {type(default).__name__}") from error
    settings[key] = value
  return settings


def make_tiny(config: ml_collections.ConfigDict, batch_size: int) -> ml_collections.ConfigDict:
  """Shrinks a run to 2 steps that log, evaluate and checkpoint at every step (tests).

  Args:
    config: the config to shrink in place; model sizes are the caller's business.
    batch_size: the global batch of the tiny run.

  Returns:
    The same config.
  """
  config.train.steps = 2
  config.train.batch_size = batch_size
  config.train.eval_every_steps = 1
  config.train.log_every_steps = 1
  config.checkpoint.every_steps = 1
  config.optimizer.warmup_steps = 0
  # Every step is a controller check: one compiled step (with statistics), not two.
  config.precision.controller.check_every_steps = 1
  return config
