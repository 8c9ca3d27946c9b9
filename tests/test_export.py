"""Export: every registered model's tiny run as StableHLO and ONNX, int8 for the digits
CNN, and the errors of bad inputs.

Each model trains once (module-scoped, 1-2 steps; the digits CNN 200 steps, so that int8
accuracy means something). onnxruntime is the independent reference: its outputs are
compared with jax's, and its test metrics with the trainer's own summary.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import write_cifar10

from dsjax import models, nas
from dsjax.data.detection import DIGITS_IMAGE_SIZE
from dsjax.errors import CheckpointError, ConfigError
from dsjax.export import ExportError, export, parse_formats
from dsjax.export import convert as export_convert
from dsjax.export import measure as export_measure
from dsjax.export.restore import restore
from dsjax.models import cnn as cnn_module
from dsjax.train import train_and_evaluate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BATCHES = (3, 5)  # Two batch sizes for the dynamic-batch round trips.


def _load(path: Path, arg: str | None):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _forced_architecture(space: nas.SearchSpace, picks, folder: Path, image) -> str:
  """An architecture.json whose blocks are `picks` (candidate, channels, kept)."""
  arch = {}
  for index, (op, channels, kept) in enumerate(picks):
    candidates = space.candidates(index)
    arch[f"block_{index}"] = {
        "op_logits": 40.0 * jax.nn.one_hot(candidates.index(op), len(candidates)),
        "channel_logits": 40.0 * jax.nn.one_hot(space.channels.index(channels),
                                                len(space.channels))}
    if space.optional(index):
      arch[f"block_{index}"]["depth_logits"] = 40.0 * jax.nn.one_hot(int(kept), 2)
  derived = nas.derive(arch, space, input_shape=image, num_classes=10)
  return nas.save_architecture(str(folder), derived)


def _config(name: str, root: Path):
  """The tiny variant of `name`'s experiment file, on one device, shrunk further."""
  path, _, arg = models.get_spec(name).config_file.partition(":")
  config = _load(CONFIGS / path, ",".join(filter(None, ["tiny", arg])))
  config.mesh.num_devices = 1
  config.logging.progress_bar = False
  config.train.steps = 1
  if config.data.name == "cifar10":
    config.data.data_dir = str(root / "cifar10")
  if config.data.name == "text":
    config.data.cache_dir = str(root / "text-cache")  # One tokenizer for the three BERTs.
    config.model.update(hidden=16, num_layers=1, mlp_dim=32, max_position=16)
    config.data.seq_len, config.data.vocab_size = 16, 128
    # The three BERTs then compile the same programs (XLA's persistent cache serves two).
    config.train.grad_accum_steps = 1
  if name == "cnn-digits":  # Trained enough for a meaningful int8 accuracy.
    config.model.features, config.model.dense_features = (16, 32), 64
    config.train.steps, config.train.batch_size = 200, 32
    config.train.eval_every_steps = config.train.log_every_steps = 200
    config.checkpoint.every_steps = 200
  if models.get_spec(name).searchable:
    # Every kind of derived block: a separable conv (the detector's space has none), a
    # strided conv, an identity that zero-pads channels and a skipped block, each conv op
    # with BatchNorm.
    backbone = config.model.backbone
    backbone.depth_range, backbone.strides, backbone.batch_norm = (3, 4), (1, 2), True
    space = nas.from_config(backbone)
    first = "sep_conv_3x3" if "sep_conv_3x3" in space.candidates(0) else "conv_3x3"
    last = "zero" if "zero" in space.candidates(3) else "identity"
    picks = [(first, 4, True), ("conv_3x3", 4, True), ("identity", 8, True),
             (last, 4, False)]
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    if config.data.name == "digits-detection":
      side = config.data.image_size or DIGITS_IMAGE_SIZE
      image = (side, side, 1)
    else:
      image = (8, 8, 1) if "digits" in name else (32, 32, 3)
    config.model.architecture = _forced_architecture(space, picks, folder, image)
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """`trained(name) -> (workdir, summary)`: each model trains on first use, once."""
  root = tmp_path_factory.mktemp("export-runs")
  write_cifar10(root / "cifar10", rows_per_file=16)
  cache = {}

  def get(name: str):
    if name not in cache:
      workdir = root / f"{name}-run"
      cache[name] = (workdir, train_and_evaluate(_config(name, root), workdir))
    return cache[name]

  return get


def _session(path: Path) -> onnxruntime.InferenceSession:
  return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# bert-base's tiny run is the one mixed-precision run (bf16 compute, adaptive plan), and
# exported in float32 like the others. All but the digits CNN are `slow` (make test-fast).
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow)
                                  if name != "cnn-digits" else name
                                  for name in models.known_models()])
def test_round_trips_match_jax(name, trained, tmp_path):
  """StableHLO reloaded from its file equals jax at two batch sizes; ONNX in onnxruntime
  matches to 1e-4 of the output scale, and its test metrics are the trainer's."""
  workdir, summary = trained(name)
  out = tmp_path / "export"
  report = export(workdir, out_dir=out, timing_repeats=0, max_test_examples=64)
  assert json.loads((out / "export.json").read_text()) == report
  run = restore(workdir)
  names = [spec.name for spec in run.inputs]
  assert names == list(run.task.input_keys)
  rows = max(BATCHES)
  split = run.dataset.splits["test"]
  arrays = export_measure.eval_data(run, rows).held_out  # As the task prepares them.
  apply = jax.jit(run.apply_fn())
  reloaded = jax.export.deserialize(bytearray((out / "model.stablehlo").read_bytes()))
  session = _session(out / "model.onnx")
  assert [i.name for i in session.get_inputs()] == names
  assert session.get_inputs()[0].shape[0] == "batch"  # Dynamic, named.
  for batch in BATCHES:
    inputs = [x[:batch] for x in arrays]
    want = np.asarray(apply(run.variables, *inputs))
    np.testing.assert_allclose(np.asarray(reloaded.call(*inputs)), want, rtol=1e-5,
                               atol=1e-6 * np.abs(want).max())
    got = session.run(None, dict(zip(names, inputs, strict=True)))[0]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
  for fmt in ("stablehlo", "onnx"):
    entry = report["formats"][fmt]
    assert entry["max_rel_diff"] <= 1e-4
    assert all((out / file).stat().st_size == size for file, size in entry["files"].items())
    for metric, value in report["jax"]["test"].items():
      assert entry["test"][metric] == pytest.approx(value, rel=1e-4, abs=1e-6)
  if report["eval"]["examples"] == len(split["label" if "label" in split else names[0]]):
    # The whole test split was scored: the trainer's own figures.
    assert report["formats"]["onnx"]["test"]["loss"] == pytest.approx(summary["test_loss"],
                                                                      rel=1e-4)


@pytest.mark.slow
def test_int8_keeps_digits_accuracy(trained, tmp_path):
  """Static int8 (QDQ, per-channel weights, calibrated on training batches) of the
  digits CNN after 200 steps: test accuracy within 1 point of float32, every timing
  recorded."""
  workdir, summary = trained("cnn-digits")
  assert summary["test_accuracy"] > 0.8  # Trained: accuracy means something.
  report = export(workdir, formats="onnx", out_dir=tmp_path, int8=True, timing_repeats=2)
  fp32, int8 = report["formats"]["onnx"], report["formats"]["onnx_int8"]
  assert fp32["test"]["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)
  assert int8["accuracy_drop_points"] <= 1.0
  model = onnx.load(str(tmp_path / "model.int8.onnx"))
  ops = {node.op_type for node in model.graph.node}
  assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
  scales = {init.name: init for init in model.graph.initializer}
  per_channel = [node for node in model.graph.node if node.op_type == "DequantizeLinear"
                 and node.input[1] in scales and len(scales[node.input[1]].dims) == 1
                 and scales[node.input[1]].dims[0] > 1]
  assert per_channel  # Weight scales per output channel.
  for entry in (fp32, int8):
    timings = entry["latency_ms_per_example"]
    assert set(timings) == {"1_thread", "all_threads"}
    assert all(set(t) == {"batch_1", "batch_32"} and min(t.values()) > 0
               for t in timings.values())
  assert set(report["jax"]["latency_ms_per_example"]["all_threads"]) == {"batch_1", "batch_32"}


def _small_float_model(path: Path) -> None:
  """Conv (bias) -> Relu -> Conv (no bias, explicit default attributes) -> global pool ->
  Gemm (bias), NCHW, batch dynamic: the layers the int8 shrinking touches."""
  rng = np.random.default_rng(0)
  helper, numpy_helper = onnx.helper, onnx.numpy_helper
  weights = {"conv0_w": rng.normal(size=(8, 1, 3, 3)), "conv0_b": rng.normal(size=8) * 0.1,
             "conv1_w": rng.normal(size=(8, 8, 3, 3)) * 0.3,
             "dense_w": rng.normal(size=(8, 10)) * 0.3, "dense_b": rng.normal(size=10) * 0.1}
  nodes = [
      helper.make_node("Conv", ["image", "conv0_w", "conv0_b"], ["conv0"], pads=[1] * 4),
      helper.make_node("Relu", ["conv0"], ["relu0"]),
      helper.make_node("Conv", ["relu0", "conv1_w"], ["conv1"], strides=[1, 1],
                       dilations=[1, 1], pads=[0] * 4, group=1),
      helper.make_node("GlobalAveragePool", ["conv1"], ["pooled"]),
      helper.make_node("Flatten", ["pooled"], ["flat"]),
      helper.make_node("Gemm", ["flat", "dense_w", "dense_b"], ["logits"], alpha=1.0,
                       transB=0)]
  graph = helper.make_graph(
      nodes, "small", [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT,
                                                     ["batch", 1, 8, 8])],
      [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 10])],
      [numpy_helper.from_array(value.astype(np.float32), name)
       for name, value in weights.items()])
  onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), str(path))


def _fused_ops(path: Path, scratch: Path) -> list[tuple[str, str]]:
  """The nodes of the graph onnxruntime runs (after its QDQ fusions)."""
  options = onnxruntime.SessionOptions()
  options.optimized_model_filepath = str(scratch)
  options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
  onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
  return [(node.op_type, node.domain) for node in onnx.load(str(scratch)).graph.node]


def test_int8_shrinking_changes_no_value(tmp_path, monkeypatch):
  """The int8 file without the all-zero weight zero points, default attributes, duplicate
  constants and long names: smaller, the same kernels in onnxruntime, the same outputs
  bit for bit, and still QDQ with per-channel weight scales."""
  fp32 = tmp_path / "model.onnx"
  _small_float_model(fp32)
  rng = np.random.default_rng(1)
  calibration = [{"image": rng.uniform(size=(16, 1, 8, 8)).astype(np.float32)}
                 for _ in range(4)]
  with monkeypatch.context() as patch:  # What onnxruntime's quantizer itself writes.
    patch.setattr(export_convert.onnx_graph, "compact", lambda model: model)
    patch.setattr(export_convert.onnx_graph, "drop_zero_points", lambda model: model)
    plain = export_convert.quantize_int8(fp32, tmp_path / "plain.onnx", calibration)
  small = export_convert.quantize_int8(fp32, tmp_path / "small.onnx", calibration)
  assert small["small.onnx"] < 0.95 * plain["plain.onnx"]
  assert _fused_ops(tmp_path / "small.onnx", tmp_path / "a.onnx") == \
      _fused_ops(tmp_path / "plain.onnx", tmp_path / "b.onnx")
  inputs = {"image": rng.uniform(size=(32, 1, 8, 8)).astype(np.float32)}
  for batch in (1, 32):
    feed = {"image": inputs["image"][:batch]}
    np.testing.assert_array_equal(_session(tmp_path / "small.onnx").run(None, feed)[0],
                                  _session(tmp_path / "plain.onnx").run(None, feed)[0])
  model = onnx.load(str(tmp_path / "small.onnx"))
  graph = model.graph
  assert [entry.domain for entry in model.opset_import] == [""]
  assert not model.metadata_props and all(not node.name for node in graph.node)
  scales = {init.name: init for init in graph.initializer}
  producer = {name: node for node in graph.node for name in node.output}
  for node in graph.node:
    assert all(name.isidentifier() for name in [*node.input, *node.output] if name)
    if node.op_type in ("Conv", "Gemm"):
      weight = producer[node.input[1]]
      assert weight.op_type == "DequantizeLinear" and len(scales[weight.input[1]].dims) == 1
      # onnxruntime fuses a Gemm into QGemm only with its weight's zero point.
      assert len(weight.input) == (3 if node.op_type == "Gemm" else 2)
    if node.op_type == "Conv":
      assert {a.name for a in node.attribute} <= {"pads", "strides", "group"}
      assert all(onnx.helper.get_attribute_value(a) != 1 for a in node.attribute
                 if a.name == "group")


def test_parse_formats():
  assert parse_formats("stablehlo, ONNX,onnx") == ("stablehlo", "onnx")
  assert parse_formats(["onnx"]) == ("onnx",)
  with pytest.raises(ConfigError, match=r"unknown export format 'onxx' \(did you mean 'onnx'"):
    parse_formats("stablehlo,onxx")
  with pytest.raises(ConfigError, match="no export format given"):
    parse_formats(" , ")


@pytest.mark.slow
def test_bad_requests_are_refused(trained, tmp_path):
  """Unknown format and int8 without ONNX are refused before anything loads; a folder
  without a checkpoint, a DNAS search folder and a checkpoint the edited config cannot
  rebuild each get their own error."""
  with pytest.raises(ConfigError, match="unknown export format 'tflite'"):
    export(tmp_path, formats="tflite")
  with pytest.raises(ConfigError, match="--int8 quantizes the ONNX model"):
    export(tmp_path, formats="stablehlo", int8=True)
  with pytest.raises(CheckpointError, match="does not exist"):
    export(tmp_path / "missing")
  with pytest.raises(CheckpointError, match="holds no checkpoint to export"):
    export(tmp_path)
  workdir, _ = trained("cnn-digits")
  edited = tmp_path / "edited"
  shutil.copytree(workdir, edited)
  config = json.loads((edited / "config.json").read_text())
  config["model"]["dense_features"] = 24
  (edited / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=r"cannot be restored into the model .*: "
                     r"params/classifier/kernel is \(24, 10\) in the model, shape \(64, 10\)"):
    export(edited, timing_repeats=0)
  search = tmp_path / "search"
  shutil.copytree(trained("dnas-digits")[0], search)
  config = json.loads((search / "config.json").read_text())
  config["model"]["architecture"] = ""
  (search / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match="is a DNAS search of dnas-digits"):
    export(search)


@pytest.mark.slow
def test_bert_needs_its_sequence_length(trained, tmp_path):
  workdir, _ = trained("bert-tiny")
  copy = tmp_path / "bert"
  shutil.copytree(workdir, copy)
  config = json.loads((copy / "config.json").read_text())
  del config["data"]["seq_len"]
  (copy / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match="needs its sequence length.*data.seq_len"):
    export(copy, timing_repeats=0)


def _min_pool(x, window_shape, strides=None, padding="VALID"):
  return jax.lax.reduce_window(x, jnp.inf, jax.lax.min, (1, *window_shape, 1),
                               (1, *(strides or window_shape), 1), padding)


@pytest.mark.slow
def test_ops_the_converter_lacks_are_named(trained, tmp_path, monkeypatch):
  """A primitive jax2onnx has no lowering for (min pooling), and a lowering that fails,
  are reported as ExportError naming the layer and the op; StableHLO still exports."""
  workdir, _ = trained("cnn-digits")
  monkeypatch.setattr(cnn_module.nn, "avg_pool", _min_pool)
  with pytest.raises(ExportError, match=r"cannot express op 'reduce_window_min' of layer CNN"):
    export(workdir, formats="onnx", out_dir=tmp_path, timing_repeats=0)
  assert export(workdir, formats="stablehlo", out_dir=tmp_path, timing_repeats=0,
                max_test_examples=8)["formats"]["stablehlo"]["max_abs_diff"] == 0.0
  monkeypatch.setattr(cnn_module.nn, "avg_pool", flax.linen.pooling.avg_pool)

  from jax2onnx.plugins import plugin_system

  export_convert._load_plugins()
  plugin = plugin_system.PLUGIN_REGISTRY["conv_general_dilated"]

  def broken(*args, **kwargs):
    raise ValueError("unsupported padding")

  monkeypatch.setattr(type(plugin), "lower", broken)
  with pytest.raises(ExportError, match=r"op 'conv_general_dilated' of layer CNN/conv0_0 "
                                        r"\(unsupported padding\)"):
    export(workdir, formats="onnx", out_dir=tmp_path, timing_repeats=0)


@pytest.mark.slow
def test_restore_reads_params_and_batch_stats(trained):
  """A BatchNorm model restores its running statistics (inference mode uses them)."""
  run = restore(trained("resnet20")[0])
  assert set(run.variables) == {"params", "batch_stats"}
  assert dataclasses.asdict(run.inputs[0])["shape"] == (32, 32, 3)
