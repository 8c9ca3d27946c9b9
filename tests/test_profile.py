"""The profiling app: its report names the bottleneck of a short run."""

import pytest


def test_report_names_a_slow_data_loader(tmp_path, monkeypatch):
  import time

  from dsjax import config as config_lib
  from dsjax.data import BatchIterator
  from dsjax.profile import report

  slow_next = BatchIterator.__next__

  def sleepy_next(self):
    time.sleep(0.05)  # Far longer than a tiny CNN step (a few ms).
    return slow_next(self)

  monkeypatch.setattr(BatchIterator, "__next__", sleepy_next)
  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
  config.model.features, config.model.dense_features = (4, 8), 16
  config.train.batch_size = 16
  config.logging.progress_bar = False
  result = report.run_profile(config, tmp_path, steps=6)
  assert result["findings"][0]["kind"] == "data"
  assert result["breakdown"]["data_wait"] > 0.5
  assert "data loader waits" in report.format_report(result)
  assert (tmp_path / "profile.json").exists()


def test_report_of_a_healthy_run_has_no_data_finding():
  records = [{"step_ms": 10.0, "data_wait_ms": 0.1, "host_ms": 1.0, "device_ms": 8.9,
              "mfu": 0.6, "tflops_per_device": 1.0, "skipped_steps": 0}] * 3
  from dsjax.profile import report

  result = report.analyse(records, {})
  assert result["findings"] == []
  assert result["breakdown"]["device"] == pytest.approx(0.89)
