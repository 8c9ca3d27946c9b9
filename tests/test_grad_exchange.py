"""Compressed data-parallel gradient exchange and delayed updates, inside the trainer."""

from __future__ import annotations

import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax.errors import ConfigError
from dsjax.train import train_and_evaluate


def _config(compression: str = "none", delayed: int = 0, steps: int = 200,
            optimizer: str = "momentum", learning_rate: float = 0.05):
  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
  config.model.features, config.model.dense_features = (16,), 64
  config.mesh.num_devices, config.mesh.data = 4, -1
  config.optimizer.name, config.optimizer.learning_rate = optimizer, learning_rate
  config.optimizer.schedule = "constant"
  config.train.steps, config.train.batch_size = steps, 64
  config.train.eval_every_steps = config.checkpoint.every_steps = steps
  config.train.log_every_steps = max(steps // 4, 1)
  config.parallel.grad_compression = compression
  config.parallel.delayed_update = delayed
  config.logging.tensorboard = config.logging.progress_bar = False
  return config


SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Digits, 4 data-parallel replicas, 200 steps: dense, top-1% with and without error
  feedback (momentum SGD, seeds 0-2), and plain SGD synchronous and with a one-step delay
  (a delay already acts as extra momentum, Mitliagkas et al. 2016, so the delayed run drops
  it and is compared with synchronous plain SGD; both on the cosine schedule, whose small
  final steps make the last iterate, and so the comparison, stable across seeds)."""
  settings = {"dense": ("none",), "topk": ("topk:0.01",),
              "topk_no_ef": ("topk:0.01,error_feedback=0",)}
  results = {name: [] for name in settings}
  for seed in SEEDS:
    for name, setting in settings.items():
      config = _config(*setting)
      config.seed += seed
      results[name].append(train_and_evaluate(config, tmp_path_factory.mktemp(name)))
  for name, setting in {"sgd": ("none", 0), "delayed_sgd": ("none", 1)}.items():
    config = _config(*setting, 200, "sgd", 0.2)
    config.optimizer.schedule = "cosine"
    results[name] = [train_and_evaluate(config, tmp_path_factory.mktemp(name))]
  return results


def mean(runs, key):
  return float(np.mean([run[key] for run in runs]))


@pytest.mark.slow
def test_topk_with_error_feedback_matches_dense_accuracy(runs):
  """Means over 3 seeds: one run's test accuracy (359 images) moves by up to 2 points with
  the seed, the 3-seed mean by ~0.9. Measured over seeds 0-3 (docs/benchmarks.md), every
  3-seed mean of top-1% with EF lies within -0.3..+0.9 points of dense's, so the issue's
  1-point bar holds with room. Without EF, the test loss of each seed is 1.1-2.1x EF's
  (3-seed means: >= 1.5x), so 1.25x is a margin on a measured effect, not on noise."""
  dense, topk, no_ef = (mean(runs[k], "test_accuracy") for k in ("dense", "topk", "topk_no_ef"))
  loss_ef, loss_no_ef = mean(runs["topk"], "test_loss"), mean(runs["topk_no_ef"], "test_loss")
  print(f"test accuracy (mean of {len(SEEDS)} seeds): dense {dense:.4f}, topk:0.01 {topk:.4f}, "
        f"without EF {no_ef:.4f}; test loss with EF {loss_ef:.4f}, without {loss_no_ef:.4f}")
  assert topk >= dense - 0.01  # The bar: within 1 point of uncompressed.
  assert loss_no_ef >= 1.25 * loss_ef  # Dropping the unsent 99% loses measurably.


@pytest.mark.slow
def test_compressed_traffic_is_read_from_the_compiled_step(tmp_path):
  """The default digits CNN (99k weights, 0.6% of them in leaves small enough to go dense):
  at topk:0.01 each replica puts in 1% (value, index) pairs, at most 1/20 of the dense
  all-reduce's bytes, as read from the two compiled steps."""
  config = _config("topk:0.01", steps=1)
  config.model = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits").model
  summary = train_and_evaluate(config, tmp_path)
  print(f"comm bytes per step: {summary['comm_bytes']:,} compressed, "
        f"{summary['comm_bytes_dense']:,} dense")
  assert 0 < summary["comm_bytes"] <= summary["comm_bytes_dense"] / 20
  assert summary["collective_bytes"]["all-gather"] > 0


@pytest.mark.slow
def test_delayed_update_trains_close_to_synchronous(runs):
  """Like with like: plain SGD at one rate and schedule, synchronous and delayed. Over seeds
  0-3 the delayed run ends 0.6-0.9 points below (docs/benchmarks.md); 2 points is 2.4x the
  largest gap seen."""
  sync, delayed = runs["sgd"][0]["test_accuracy"], runs["delayed_sgd"][0]["test_accuracy"]
  print(f"test accuracy: synchronous SGD {sync:.4f}, one-step delay {delayed:.4f}")
  assert delayed >= sync - 0.02


@pytest.mark.slow
def test_full_density_topk_is_the_dense_exchange(tmp_path):
  dense = train_and_evaluate(_config("none", steps=4), tmp_path / "dense")
  full = train_and_evaluate(_config("topk:1.0", steps=4), tmp_path / "full")
  np.testing.assert_allclose(full["test_loss"], dense["test_loss"], rtol=1e-5)


def test_compression_needs_a_data_only_mesh(tmp_path):
  config = _config("topk:0.01", steps=2)
  config.mesh.data, config.mesh.model = 2, 2
  with pytest.raises(ConfigError, match="data-parallel exchange only, but the mesh also has "
                                        "model=2"):
    train_and_evaluate(config, tmp_path)


def test_bad_compression_spec_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match="parallel.grad_compression"):
    train_and_evaluate(_config("topk:2"), tmp_path)


@pytest.mark.slow
def test_density_warm_up_sends_less_each_stage(tmp_path):
  """DGC warm-up over 4 steps: 25%, 6.25%, 1.6%, then the 1% target (one compiled step per
  density), read from the per-step metrics."""
  import json

  train_and_evaluate(_config("topk:0.01,min_size=100,warmup_steps=4", steps=5), tmp_path)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  sent = [record["grad_sent_fraction"] for record in records]
  assert len(sent) == 5 and all(a > b for a, b in zip(sent[:4], sent[1:4], strict=False))
  assert sent[0] > 0.2 and sent[-1] < 0.02
