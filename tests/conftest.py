"""Test set-up: 8 simulated CPU devices, and shared fixtures.

XLA_FLAGS must be set before jax is imported anywhere, so this runs first.
"""

import os
import pickle
import tempfile

# Compiling dominates the suite's time on 2 cores: skip XLA's expensive backend (LLVM)
# optimisations. The HLO-level work (fusion, SPMD partitioning) is unchanged; every
# comparison in the tests runs both sides under the same flags.
# Rounding audit: DSJAX_TEST_XLA_FLAGS goes last, so it wins (`--xla_cpu_max_isa=AVX2` makes
# XLA:CPU vectorise, and so round, as an older CPU does), and DSJAX_TEST_SEED_OFFSET shifts
# the seed of every config built from base_config(). A threshold asserted after training
# must hold under both; see README "Tests".
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
     "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
     os.environ.get("DSJAX_TEST_XLA_FLAGS", "")]).strip()
SEED_OFFSET = int(os.environ.get("DSJAX_TEST_SEED_OFFSET", "0"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU compiles take seconds here; tests and the CLI subprocesses they start compile
# the same small programs again and again, so share one persistent cache per test run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="dsjax-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dsjax import config as config_lib  # noqa: E402

if SEED_OFFSET:  # At import, so that module-scoped fixtures see it too.
  _base_config = config_lib.base_config

  def _offset_seed_config():
    config = _base_config()
    config.seed += SEED_OFFSET
    return config

  config_lib.base_config = _offset_seed_config


def pytest_configure(config):
  config.addinivalue_line("markers", "all_devices: the test's training runs span all 8 "
                          "simulated devices (others run on one)")


@pytest.fixture(autouse=True)
def _one_device_training(request, monkeypatch):
  """Training runs built from `base_config()` use one device unless the test is marked
  `all_devices`: most tests are about something else, and 8-way SPMD on 2 cores is slow.
  Parallel tests build their meshes explicitly or carry the marker."""
  if request.node.get_closest_marker("all_devices"):
    return
  original = config_lib.base_config

  def base_config():
    config = original()
    config.mesh.num_devices = 1
    return config

  monkeypatch.setattr(config_lib, "base_config", base_config)

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar10(folder, rows_per_file=None, skip=()):
  """Writes tiny CIFAR-10 python batches (the real pickle format) into `folder`."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  for name in CIFAR10_FILES:
    if name in skip:
      continue
    n = rows_per_file or (4 if name == "test_batch" else 6)
    payload = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
               b"labels": rng.integers(0, 10, n).tolist(),
               b"batch_label": name.encode()}
    with open(os.path.join(folder, name), "wb") as f:
      pickle.dump(payload, f)


@pytest.fixture
def make_cifar10():
  """The `write_cifar10` function, for tests that need CIFAR-10 files on disk."""
  return write_cifar10
