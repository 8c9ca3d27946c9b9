"""Every experiment file in configs/ builds, validates, and runs two steps in its tiny variant."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import models
from dsjax.nas.run import search_architecture
from dsjax.train import train_and_evaluate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIGS.glob("[!_]*.py"))


def load(path: Path, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_there_are_configs():
  assert {p.name for p in CONFIG_FILES} >= {"digits_cnn.py", "cifar10_cnn.py"}


@pytest.mark.parametrize("name", models.known_models())
def test_each_models_default_config_trains_that_model(name):
  """`dsjax-train --model NAME` without --config loads the model's registered file."""
  path, _, arg = models.get_spec(name).config_file.partition(":")
  assert load(CONFIGS / path, arg or None).model.name == name


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_config_validates(path, arg):
  config_lib.validate(load(path, arg))


# digits_dnas:tiny searches and retrains in tests/test_cli.py (through the CLI) and
# tests/test_nas_resume.py; running it here too would only repeat those compiles.
@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if p.stem != "digits_dnas"],
                         ids=lambda p: p.stem)
def test_tiny_variant_runs(path, tmp_path, make_cifar10):
  config = load(path, "tiny")
  if config.data.name == "cifar10":
    make_cifar10(tmp_path / "data", rows_per_file=16)
    config.data.data_dir = str(tmp_path / "data")
  config.logging.progress_bar = False
  if models.get_spec(config.model.name).searchable:  # Search, then retrain the result.
    searched = search_architecture(config, tmp_path / "search")
    assert searched["params"] > 0
    config.model.architecture = searched["architecture"]
  summary = train_and_evaluate(config, tmp_path / "run")
  assert summary["steps"] == config.train.steps
  assert 0.0 <= summary["test_accuracy"] <= 1.0


@pytest.mark.parametrize("name", ["cifar10_resnet", "ctr_wide_deep"])
def test_application_models_train_mixed_on_eight_devices(name, tmp_path, make_cifar10):
  """ResNet and wide-deep under `--precision mixed` (half compute, loss scaling, adaptive
  plan) on the default all-devices mesh: 8-way data parallel, with ResNet's batch
  statistics over the global batch. (BERT: tests/test_parallel.py, bert_base:tiny.)"""
  config = load(CONFIGS / f"{name}.py", "tiny")
  config.mesh.num_devices = 0  # All 8 simulated devices.
  config.precision.policy = "mixed"
  if config.data.name == "cifar10":
    make_cifar10(tmp_path / "data", rows_per_file=16)
    config.data.data_dir = str(tmp_path / "data")
  config.logging.progress_bar = False
  summary = train_and_evaluate(config, tmp_path / "run")
  assert summary["mesh"]["data"] == 8 and summary["steps"] == config.train.steps
  assert np.isfinite(summary["test_loss"])
