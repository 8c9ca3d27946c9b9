"""Every experiment file in configs/ builds, validates, and runs two steps in its tiny variant."""

import importlib.util
from pathlib import Path

import pytest

from dsjax import config as config_lib
from dsjax import models

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


# Every tiny variant also runs two steps, searched first where it is a DNAS model, through
# the installed wheel from another folder: tests/test_packaging.py.
