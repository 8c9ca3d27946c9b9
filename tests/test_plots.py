"""dsjax.plots: figures drawn from metrics.jsonl, PNGs written only for kinds with data."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import plots
from dsjax.errors import ConfigError, DataError
from dsjax.nas import derivation
from dsjax.nas.space import SearchSpace

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def train_record(step, precision="fp32", **overrides):
  """One metrics.jsonl record with the keys dsjax-train logs (dsjax/train/loop.py)."""
  half = precision != "fp32"
  record = {"step": step, "loss": 2.3 - 0.1 * step, "accuracy": 0.1 * step,
            "learning_rate": 1e-3 * step, "loss_scale": 2.0**15 * step if half else 1.0,
            "skipped_steps": step // 2 if half else 0, "promoted_layers": step % 2 if half else 0,
            "fp16_matmul_flops_fraction": (0.5 if step % 2 else 1.0) if half else 0.0,
            "examples_per_sec": 1000.0 + step, "mfu": 0.01 * step, "step_ms": 5.0}
  if step % 2 == 0:  # Eval keys appear on eval steps only.
    record.update(eval_loss=2.0 - 0.1 * step, eval_accuracy=0.2 * step)
  record.update(overrides)
  return record


def write_run(folder, records, summary=None, config=None):
  folder.mkdir(parents=True)
  (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  if summary is not None:
    (folder / "summary.json").write_text(json.dumps(summary))
  if config is not None:
    (folder / "config.json").write_text(json.dumps(config))
  return folder


def axes_by_title(figure):
  return {ax.get_title(): ax for ax in figure.axes}


def line_data(line):
  return list(line.get_xdata()), list(line.get_ydata())


def test_load_run_reads_records_summary_and_config(tmp_path):
  folder = write_run(tmp_path / "fp32", [train_record(1), train_record(2)],
                     summary={"steps": 2}, config={"precision": {"policy": "fp32"}})
  run = plots.load_run(folder)
  assert (run.name, run.workdir) == ("fp32", folder)
  assert [r["step"] for r in run.records] == [1, 2]
  assert run.summary == {"steps": 2} and run.config["precision"]["policy"] == "fp32"
  assert plots.load_run(write_run(tmp_path / "bare", [train_record(1)])).summary == {}


def test_missing_or_malformed_metrics_name_the_file(tmp_path):
  with pytest.raises(DataError, match=r"nowhere/metrics\.jsonl: no such file"):
    plots.load_run(tmp_path / "nowhere")
  folder = write_run(tmp_path / "bad", [train_record(1)])
  (folder / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "loss": \n{"step": 3}\n')
  with pytest.raises(DataError, match=r"bad/metrics\.jsonl, line 2: not valid JSON"):
    plots.load_run(folder)
  (folder / "metrics.jsonl").write_text('{"loss": 1.0}\n')
  with pytest.raises(DataError, match=r"line 1: expected an object with an integer 'step'"):
    plots.load_run(folder)
  (folder / "metrics.jsonl").write_text("")
  with pytest.raises(DataError, match=r"bad/metrics\.jsonl: no records"):
    plots.load_run(folder)
  (folder / "metrics.jsonl").write_text('{"step": 1}\n')
  (folder / "summary.json").write_text("{")
  with pytest.raises(DataError, match=r"bad/summary\.json: not valid JSON"):
    plots.load_run(folder)


def test_a_live_runs_unfinished_last_line_is_left_out(tmp_path):
  folder = write_run(tmp_path / "live", [train_record(1)])
  with (folder / "metrics.jsonl").open("a") as f:
    f.write('{"step": 2, "lo')
  assert [r["step"] for r in plots.load_run(folder).records] == [1]


def test_curves_draw_the_records_and_skip_nulls(tmp_path):
  records = [train_record(step) for step in range(1, 7)]
  records[2]["loss"] = None  # A non-finite loss, written as null.
  folder = write_run(tmp_path / "run", records,
                     summary={"steps": 6, "test_accuracy": 0.9, "test_loss": 1.0})
  figure = plots.figure_curves(folder)
  axes = axes_by_title(figure)
  assert list(axes) == ["train loss", "eval loss", "eval accuracy (star: test)"]
  train_lines = axes["train loss"].lines
  assert len(train_lines) == 1
  assert line_data(train_lines[0]) == ([1, 2, 4, 5, 6],
                                       [r["loss"] for r in records if r["loss"] is not None])
  assert line_data(axes["eval loss"].lines[0]) == (
      [2, 4, 6], [r["eval_loss"] for r in records if "eval_loss" in r])
  star = axes["eval accuracy (star: test)"].collections[0].get_offsets()
  np.testing.assert_allclose(star, [[6, 0.9]])


def test_several_runs_overlay_one_line_each_with_a_legend(tmp_path):
  runs = [write_run(tmp_path / name, [train_record(s) for s in range(1, 5)])
          for name in ("fp32", "mixed")]
  figure = plots.figure_curves(runs)
  for ax in figure.axes:
    assert [line.get_label() for line in ax.lines] == ["fp32", "mixed"]
  assert [t.get_text() for t in figure.legends[0].get_texts()] == ["fp32", "mixed"]
  # Runs given as Run objects and as paths draw the same.
  again = plots.figure_curves([plots.load_run(runs[0]), runs[1]])
  assert line_data(again.axes[0].lines[1]) == line_data(figure.axes[0].lines[1])


def test_curves_of_a_search_and_of_a_click_prediction_run(tmp_path):
  search = write_run(tmp_path / "search", [
      {"step": s, "train_loss": 2.0 / s, "val_loss": 2.1 / s, "train_accuracy": 0.1}
      for s in (10, 20)])
  axes = axes_by_title(plots.figure_curves(search))
  assert list(axes) == ["train loss", "eval loss"]  # No eval accuracy: no empty panel.
  assert line_data(axes["eval loss"].lines[0]) == ([10, 20], [2.1 / 10, 2.1 / 20])
  ctr = write_run(tmp_path / "ctr", [train_record(2, eval_auc=0.7), train_record(4, eval_auc=0.8)])
  axes = axes_by_title(plots.figure_curves(ctr))
  assert line_data(axes["eval AUC"].lines[0]) == ([2, 4], [0.7, 0.8])


def test_learning_rate(tmp_path):
  records = [train_record(s) for s in range(1, 5)]
  ax = plots.figure_learning_rate(write_run(tmp_path / "run", records)).axes[0]
  assert line_data(ax.lines[0]) == ([1, 2, 3, 4], [r["learning_rate"] for r in records])


def test_loss_scale_and_precision_plan_leave_out_fp32_runs(tmp_path):
  fp32 = write_run(tmp_path / "fp32", [train_record(s) for s in range(1, 5)])
  records = [train_record(s, "fp16") for s in range(1, 5)]
  fp16 = write_run(tmp_path / "fp16", records)
  axes = axes_by_title(plots.figure_loss_scale([fp32, fp16]))
  assert list(axes) == ["loss scale", "skipped steps (cumulative)"]
  assert axes["loss scale"].get_yscale() == "log"
  assert [line.get_label() for line in axes["loss scale"].lines] == ["fp16"]
  assert line_data(axes["loss scale"].lines[0])[1] == [r["loss_scale"] for r in records]
  assert line_data(axes["skipped steps (cumulative)"].lines[0])[1] == [0, 1, 1, 2]
  axes = axes_by_title(plots.figure_precision_plan([fp32, fp16]))
  assert [line.get_label() for ax in axes.values() for line in ax.lines] == ["fp16", "fp16"]
  assert line_data(axes["promoted layers (float32)"].lines[0])[1] == [1, 0, 1, 0]
  assert line_data(axes["half-precision share of matmul FLOPs"].lines[0])[1] == [
      0.5, 1.0, 0.5, 1.0]
  with pytest.raises(DataError, match="no loss scaling logged"):
    plots.figure_loss_scale(fp32)
  # float32 skips a non-finite step too: then the count is worth a plot.
  nan_run = write_run(tmp_path / "nan", [train_record(1), train_record(2, skipped_steps=1)])
  assert len(plots.figure_loss_scale(nan_run).axes[1].lines) == 1


def test_throughput_drops_an_unmeasured_mfu(tmp_path):
  records = [train_record(s) for s in range(1, 4)]
  axes = axes_by_title(plots.figure_throughput(write_run(tmp_path / "run", records)))
  assert list(axes) == ["examples/s", "MFU"]
  assert line_data(axes["examples/s"].lines[0])[1] == [1001.0, 1002.0, 1003.0]
  assert line_data(axes["MFU"].lines[0])[1] == [0.01, 0.02, 0.03]
  no_peak = write_run(tmp_path / "no_peak", [train_record(s, mfu=0.0) for s in range(1, 4)])
  assert [ax.get_title() for ax in plots.figure_throughput(no_peak).axes] == ["examples/s"]


SPACE = SearchSpace(min_channels=4, max_channels=8, channel_choices=2, depth_range=(1, 2),
                    kernel_sizes=(3,), stem_channels=4, strides=(1,))


def search_records(steps):
  """Records with the architecture keys dsjax-search logs (`flat_probabilities`)."""
  rng = np.random.default_rng(0)
  records = []
  for step in steps:
    arch = {f"block_{i}": {"op_logits": rng.normal(size=len(SPACE.candidates(i))),
                           "channel_logits": rng.normal(size=len(SPACE.channels)),
                           "depth_logits": rng.normal(size=2)} for i in range(SPACE.num_blocks)}
    records.append({"step": step, "train_loss": 2.0, "val_loss": 2.1,
                    **derivation.flat_probabilities(arch, SPACE)})
  return records


def test_architecture_one_panel_per_searched_decision(tmp_path):
  records = search_records([5, 10, 15])
  figure = plots.figure_architecture(write_run(tmp_path / "search", records))
  axes = axes_by_title(figure)
  # Block 0 is below the minimum depth: its keep (always 1.0) is no decision.
  assert list(axes) == ["block 0: op", "block 0: channels", "block 1: op", "block 1: channels",
                        "depth: P(keep), kept if >= 0.5"]
  ops = axes["block 1: op"]
  assert [line.get_label() for line in ops.lines] == list(SPACE.candidates(1))
  key = f"arch/block_1/op/{SPACE.candidates(1)[0]}"
  assert line_data(ops.lines[0]) == ([5, 10, 15], [r[key] for r in records])
  assert [line.get_label() for line in axes["block 0: channels"].lines] == ["4", "8"]
  depth = axes["depth: P(keep), kept if >= 0.5"]
  assert line_data(depth.lines[0])[1] == [r["arch/block_1/keep"] for r in records]
  with pytest.raises(DataError, match="no architecture probabilities"):
    plots.figure_architecture(write_run(tmp_path / "train", [train_record(1)]))


def is_png(path):
  return path.stat().st_size > 0 and path.read_bytes()[:8] == PNG_HEADER


def test_write_plots_writes_kinds_with_data_and_skips_the_rest(tmp_path):
  fp32 = write_run(tmp_path / "fp32", [train_record(s) for s in range(1, 5)])
  written = plots.write_plots(fp32)
  assert [p.name for p in written] == ["curves.png", "learning_rate.png", "throughput.png"]
  assert all(p.parent == fp32 and is_png(p) for p in written)
  fp16 = write_run(tmp_path / "fp16", [train_record(s, "fp16") for s in range(1, 5)])
  search = write_run(tmp_path / "search", search_records([1, 2]))
  written = plots.write_plots([fp32, fp16, search], out_dir=tmp_path / "out" / "plots")
  assert [p.name for p in written] == [
      "curves.png", "learning_rate.png", "loss_scale.png", "precision_plan.png",
      "throughput.png", "architecture_search.png"]
  assert all(p.parent == tmp_path / "out" / "plots" and is_png(p) for p in written)


def test_drawing_leaves_pyplot_alone(tmp_path):
  import matplotlib
  import matplotlib.pyplot as plt
  backend = matplotlib.get_backend()
  plots.write_plots(write_run(tmp_path / "run", [train_record(1)]))
  assert plt.get_fignums() == [] and matplotlib.get_backend() == backend


def test_without_matplotlib_plots_say_how_to_install_it(tmp_path, monkeypatch):
  import sys

  monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # `import` now fails.
  with pytest.raises(ConfigError, match=r"plots need matplotlib.*pip install 'dsjax\[plot\]'"):
    plots.write_plots(write_run(tmp_path / "run", [train_record(1)]))


def test_plots_imports_only_errors_from_dsjax():
  tree = ast.parse(Path(plots.__file__).read_text())
  modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
  modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
              for alias in node.names}
  assert {m for m in modules if m.split(".")[0] == "dsjax"} == {"dsjax.errors"}


@pytest.mark.slow
def test_a_real_training_run(tmp_path):
  from dsjax.train import train_and_evaluate

  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
  config.model.features, config.model.dense_features = (4, 8), 16
  config_lib.make_tiny(config, batch_size=16)
  config.logging.progress_bar = False
  config.logging.plots = True  # The run draws its own plots at the end.
  workdir = tmp_path / "digits"
  train_and_evaluate(config, workdir)
  drawn = sorted(p.name for p in workdir.glob("*.png"))
  assert drawn == ["curves.png", "learning_rate.png", "throughput.png"], drawn
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  axes = axes_by_title(plots.figure_curves(workdir))
  assert line_data(axes["train loss"].lines[0]) == ([1, 2], [r["loss"] for r in records])
  assert axes["eval accuracy (star: test)"].collections  # summary.json's test accuracy.
  written = plots.write_plots(workdir)
  assert [p.name for p in written] == ["curves.png", "learning_rate.png", "throughput.png"]
  assert all(is_png(p) for p in written)
