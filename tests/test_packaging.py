"""A plain (non-editable) install, as Colab and `pip install git+URL` users get: the wheel
holds every module and experiment file, and each registered model's tiny variant trains
from another folder through the installed entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dsjax import models

REPO = Path(__file__).resolve().parents[1]
# Each model's tiny variant, by the name of its installed experiment file.
TINY = {name: models.get_spec(name).config_file.replace(".py", ".py:tiny", 1)
        .replace(":tiny:", ":tiny,") for name in models.known_models()}
ONE_DEVICE = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "").replace(
    "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=1")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """Builds the wheel (no build isolation: the test extra carries setuptools) and
  installs it, without dependencies (they are this environment's), into a folder."""
  root = tmp_path_factory.mktemp("wheel")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                  "--no-build-isolation", "--wheel-dir", str(root / "dist"), str(REPO)],
                 check=True, capture_output=True, timeout=300)
  wheel = next((root / "dist").glob("dsjax-*.whl"))
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                  "--target", str(root / "site"), str(wheel)],
                 check=True, capture_output=True, timeout=300)
  return wheel, root / "site"


def run_installed(site: Path, cwd: Path, module: str, *args: str):
  """`python -m MODULE ARGS` with the installed copy first on the path, from `cwd`."""
  env = dict(os.environ, PYTHONPATH=str(site), **ONE_DEVICE)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_wheel_holds_every_module_and_config(installed):
  wheel, _ = installed
  names = set(zipfile.ZipFile(wheel).namelist())
  tree = {str(p.relative_to(REPO)) for folder in ("dsjax", "pallas_kernels")
          for p in (REPO / folder).rglob("*.py")}
  tree |= {f"dsjax/configs/{p.name}" for p in (REPO / "configs").glob("*.py")}
  assert tree <= names, sorted(tree - names)


def test_installed_help_uses_the_installed_configs(installed, tmp_path):
  _, site = installed
  result = run_installed(site, tmp_path, "dsjax.train", "--help")
  assert result.returncode == 0, result.stderr
  assert f"default experiment file in {site / 'dsjax' / 'configs'}" in result.stdout


@pytest.mark.slow
def test_installed_model_flag_runs_from_another_folder(installed, tmp_path):
  """The issue's command: `--model cnn-digits` finds its default file in the package."""
  _, site = installed
  result = run_installed(site, tmp_path, "dsjax.train", "--model", "cnn-digits", "--steps",
                         "2", "--workdir", "w")
  assert result.returncode == 0, result.stderr
  assert "final (2 steps)" in result.stdout and (tmp_path / "w" / "summary.json").exists()


def summary_of(workdir: Path) -> dict:
  return json.loads((workdir / "summary.json").read_text())


# One model of each task, loader and entry point: the wheel test above shows every other
# experiment file is installed, and tests/test_export.py trains every model's tiny variant.
INSTALLED_RUNS = ("bert-tiny", "wide-deep", "cnn-cifar10", "dnas-digits", "centernet-dnas")


@pytest.mark.slow
@pytest.mark.parametrize("name", INSTALLED_RUNS)
def test_installed_tiny_variant_trains(installed, tmp_path, name, make_cifar10):
  """A model's tiny variant runs two steps from the installed package (cnn-digits' run is
  the test above); a DNAS model is searched first, then its architecture retrained."""
  _, site = installed
  spec = models.get_spec(name)
  extra = []
  if spec.dataset == "cifar10":
    make_cifar10(tmp_path / "data", rows_per_file=16)
    extra.append(f"--config.data.data_dir={tmp_path / 'data'}")
  if spec.searchable:
    searched = run_installed(site, tmp_path, "dsjax.nas", "--config", TINY[name], "--steps",
                             "2", "--workdir", "search", *extra)
    assert searched.returncode == 0, searched.stderr
    assert summary_of(tmp_path / "search")["params"] > 0
    extra += ["--architecture", "search/architecture.json"]
  result = run_installed(site, tmp_path, "dsjax.train", "--config", TINY[name], "--steps",
                         "2", "--workdir", "run", *extra)
  assert result.returncode == 0, result.stderr
  summary = summary_of(tmp_path / "run")
  assert summary["steps"] == 2
  assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["name"] == name
  metric = "test_accuracy" if spec.task == "classification" else "test_loss"
  assert np.isfinite(summary[metric]) and (spec.task != "classification"
                                           or 0.0 <= summary[metric] <= 1.0)
