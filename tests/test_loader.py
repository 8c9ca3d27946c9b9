"""The grain loader (dsjax.data.loader) and image folders (dsjax.data.image_folder).

The grain loader gives the in-memory loader's batches, exactly: on the embedded corpus,
and on prepared shards read row by row. Two `jax.distributed` processes read disjoint rows
whose union is the one-process batch, and the saved position (the global step) moves
between process counts. A run on prepared data killed with SIGKILL resumes to the
uninterrupted run's parameters. Image folders decode, augment per example in the loader
and train; bad folders and files are refused by name.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image
from test_checkpoint import assert_trees_equal, final_state
from test_cli import kill_after_first_checkpoint
from test_detection import load_config

from dsjax import config as config_lib
from dsjax.data import BatchIterator, GrainLoader, get_dataset, image_folder, text
from dsjax.data.lazy import LazyColumn
from dsjax.data.prepare import prepare_text
from dsjax.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300
SEQ_LEN = 32
BATCH = 16


def _text_config(data_dir: str = "", **overrides) -> ml_collections.ConfigDict:
  fields = dict(name="text", data_dir=str(data_dir), val_fraction=0.1, split_seed=0,
                seq_len=SEQ_LEN, vocab_size=VOCAB, vocab_file="", mlm_probability=0.15,
                cache_dir="")
  return ml_collections.ConfigDict({**fields, **overrides})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
  """The embedded corpus, one topic per line, prepared into several shards."""
  folder = tmp_path_factory.mktemp("prepared")
  source = folder / "topics.jsonl"
  source.write_text("".join(json.dumps({"text": d}) + "\n" for d in text.default_documents()),
                    encoding="utf-8")
  prepare_text(str(source), folder / "prep", vocab_size=VOCAB, shard_tokens=20_000,
               progress=False)
  return folder / "prep"


def _assert_batches_equal(a: dict, b: dict, what: str) -> None:
  assert set(a) == set(b), what
  for key in a:
    assert a[key].dtype == b[key].dtype, (what, key)
    np.testing.assert_array_equal(a[key], b[key], err_msg=f"{what}: {key}")


def _steps(steps_per_epoch: int) -> list[int]:
  """A few steps of the first epochs, across each boundary."""
  return [0, 1, steps_per_epoch - 1, steps_per_epoch, 2 * steps_per_epoch + 1]


def test_grain_gives_the_memory_batches(prepared):
  """Embedded arrays through grain (threads, or read on demand), and prepared shards read
  row by row, give BatchIterator's batches on the in-memory arrays, rows and resumes
  included."""
  eager = get_dataset(_text_config(prepared))
  lazy = get_dataset(_text_config(prepared, loader="grain"))
  assert isinstance(lazy.splits["train"]["input_ids"], LazyColumn)
  assert lazy.metadata == eager.metadata
  for name, arrays in eager.splits.items():
    for key, array in arrays.items():
      np.testing.assert_array_equal(lazy.splits[name][key], array, err_msg=f"{name}/{key}")
  memory = BatchIterator(eager.splits["train"], BATCH, seed=3)
  per_epoch = memory.steps_per_epoch
  for arrays, prefetch in ((eager.splits["train"], 2), (lazy.splits["train"], 0),
                           (lazy.splits["train"], 3)):
    for rows in (None, (4, 12)):
      memory.rows = rows
      grain = GrainLoader(arrays, BATCH, seed=3, prefetch=prefetch)
      grain.rows = rows
      for step in range(3):
        _assert_batches_equal(next(grain), memory.batch(step), f"step {step}")
      for step in _steps(per_epoch):
        grain.set_state(dict(memory.get_state(), step=step))
        _assert_batches_equal(next(grain), memory.batch(step), f"resumed at {step}")
        _assert_batches_equal(grain.batch(step), memory.batch(step), f"batch({step})")
      assert grain.get_state() == dict(memory.get_state(), step=2 * per_epoch + 2)
      grain.close()
  with pytest.raises(DataError, match="different data config"):
    GrainLoader(lazy.splits["train"], BATCH, seed=4).set_state(memory.get_state())


def test_worker_processes_give_the_same_batches():
  """grain worker processes (spawned) read the batches the threads read."""
  arrays = {"x": np.arange(600, dtype=np.int32).reshape(200, 3),
            "y": np.arange(200, dtype=np.float32)}
  memory = BatchIterator(arrays, 8, seed=1)
  memory.rows = (2, 6)
  grain = GrainLoader(arrays, 8, seed=1, workers=1, prefetch=2)
  grain.rows = (2, 6)
  try:
    for step in range(30):  # Past the first epoch (25 steps).
      batch = next(grain)
      assert type(batch["x"]) is np.ndarray
      _assert_batches_equal(batch, memory.batch(step), f"step {step}")
  finally:
    grain.close()


# --- two processes ---------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _process_main(port: int, process_id: int, prep: str, state: str, out: str) -> None:
  """One process of the two-process test: its rows of three batches from `state` on."""
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                             initialization_timeout=120)
  from dsjax.data import train_iterator
  from dsjax.parallel import mesh as parallel_mesh
  from dsjax.parallel import sharding

  config = config_lib.base_config()
  mesh = parallel_mesh.make_mesh(config.mesh)  # data = all 4 devices of both processes.
  data_config = _text_config(prep, loader="auto", workers=0, prefetch=2)
  loader = train_iterator(get_dataset(data_config), data_config, BATCH, seed=3)
  assert isinstance(loader, GrainLoader)
  loader.rows = sharding.local_rows(sharding.batch_sharding(mesh), BATCH)
  loader.set_state(json.loads(state))
  batches = [next(loader) for _ in range(3)]
  np.savez(out, rows=np.asarray(loader.rows), state=json.dumps(loader.get_state()),
           **{f"{step}/{key}": value for step, batch in enumerate(batches)
              for key, value in batch.items()})
  loader.close()
  jax.distributed.shutdown()


@pytest.mark.slow
def test_two_processes_read_disjoint_rows_and_move_between_process_counts(tmp_path, prepared):
  """Two processes (jax.distributed on 127.0.0.1, gloo) resume a one-process position,
  read disjoint rows that together are the one-process global batches, and their saved
  position continues the same global order in one process."""
  dataset = get_dataset(_text_config(prepared, loader="grain"))
  reference = BatchIterator(dataset.splits["train"], BATCH, seed=3)
  expected = [reference.batch(step) for step in range(6)]
  one = GrainLoader(dataset.splits["train"], BATCH, seed=3, prefetch=0)
  for _ in range(2):
    next(one)
  state = json.dumps(one.get_state())  # After two steps of one process.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join([*flags, "--xla_force_host_platform_device_count=2"]))
  port = _free_port()
  outs = [tmp_path / f"process{index}.npz" for index in range(2)]
  procs = [subprocess.Popen(
      [sys.executable, __file__, str(port), str(index), str(prepared), state, str(outs[index])],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for index in range(2)]
  for proc in procs:
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
  results = [np.load(out) for out in outs]
  assert [tuple(r["rows"]) for r in results] == [(0, BATCH // 2), (BATCH // 2, BATCH)]
  for position in range(3):
    union = {key: np.concatenate([r[f"{position}/{key}"] for r in results])
             for key in expected[0]}
    _assert_batches_equal(union, expected[2 + position], f"step {2 + position}")
  saved = [json.loads(str(r["state"])) for r in results]
  assert saved[0] == saved[1] and saved[0]["step"] == 5
  one.set_state(saved[0])  # Back to one process: step 5 of the same global order.
  _assert_batches_equal(next(one), expected[5], "step 5 in one process")


# --- SIGKILL on prepared data ------------------------------------------------------------------


def _bert_config(prep: Path, steps: int) -> ml_collections.ConfigDict:
  import importlib.util

  spec = importlib.util.spec_from_file_location("bert_tiny", REPO / "configs" / "bert_tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  config.data.data_dir, config.data.vocab_size = str(prep), VOCAB
  config.model.num_layers = 1  # Compiling is most of the test's time.
  config.train.steps, config.checkpoint.every_steps = steps, 10
  config.train.log_every_steps = config.train.eval_every_steps = steps
  config.logging.tensorboard = config.logging.progress_bar = False
  return config


@pytest.mark.slow
def test_sigkill_mid_run_on_prepared_data_resumes_identically(tmp_path, prepared):
  """bert-tiny on prepared shards through grain: killed between checkpoints, rerun, it ends
  with the uninterrupted run's parameters."""
  from dsjax.train import train_and_evaluate

  steps = 60
  train_and_evaluate(_bert_config(prepared, steps), tmp_path / "straight")
  workdir = tmp_path / "killed"
  args = [f"--config={REPO}/configs/bert_tiny.py:tiny", "--steps", str(steps),
          f"--config.data.data_dir={prepared}", f"--config.data.vocab_size={VOCAB}",
          "--config.model.num_layers=1",
          "--config.checkpoint.every_steps=10", f"--config.train.log_every_steps={steps}",
          f"--config.train.eval_every_steps={steps}", "--config.logging.tensorboard=False",
          "--config.logging.progress_bar=False", "--workdir", str(workdir)]
  killed_at = kill_after_first_checkpoint(args, workdir)
  assert 0 < killed_at < steps
  train_and_evaluate(_bert_config(prepared, steps), workdir)
  step_a, state_a = final_state(tmp_path / "straight")
  step_b, state_b = final_state(workdir)
  assert step_a == step_b == steps
  assert_trees_equal(state_a, state_b)


# --- image folders -----------------------------------------------------------------------------


def _write_images(root: Path, counts: dict[str, int], size=(8, 8), seed=0) -> None:
  rng = np.random.default_rng(seed)
  for name, count in counts.items():
    (root / name).mkdir(parents=True, exist_ok=True)
    for index in range(count):
      pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
      suffix = ".png" if index % 2 else ".PNG"
      Image.fromarray(pixels).save(root / name / f"{index:03d}{suffix}")


def _image_config(data_dir: Path, **overrides) -> ml_collections.ConfigDict:
  fields = dict(name="image-folder", data_dir=str(data_dir), val_fraction=0.25, split_seed=0,
                image_size=8, augment=True, loader="auto", workers=0, prefetch=2)
  return ml_collections.ConfigDict({**fields, **overrides})


def test_image_folder_round_trip(tmp_path):
  """Split folders: decoded pixels, labels by sorted class name, a resized non-square image,
  augmentation per example in the loader (the same however the rows are split), and val
  carved from train without a val/ folder."""
  _write_images(tmp_path / "a" / "train", {"cat": 4, "ant": 3, "dog": 5})
  _write_images(tmp_path / "a" / "val", {"dog": 2}, seed=1)
  _write_images(tmp_path / "a" / "test", {"ant": 1, "cat": 1}, seed=2)
  Image.new("RGB", (16, 8), (255, 0, 0)).save(tmp_path / "a" / "test" / "cat" / "wide.jpg")
  (tmp_path / "a" / "train" / "ant" / "notes.txt").write_text("not an image")
  dataset = get_dataset(_image_config(tmp_path / "a"))
  assert dataset.num_classes == 3 and dataset.metadata["classes"] == ["ant", "cat", "dog"]
  assert [len(dataset.splits[s]["label"]) for s in ("train", "val", "test")] == [12, 2, 3]
  train = dataset.splits["train"]
  assert train["image"].shape == (12, 8, 8, 3) and train["image"].dtype == np.float32
  np.testing.assert_array_equal(train["label"][:], [0] * 3 + [1] * 4 + [2] * 5)
  first = np.asarray(Image.open(tmp_path / "a" / "train" / "ant" / "000.PNG"), np.float32)
  np.testing.assert_allclose(train["image"][0],
                             (first / 255 - image_folder.MEAN) / image_folder.STD, rtol=1e-6)
  red = dataset.splits["test"]["image"][2]  # wide.jpg: resized to 8 high, centre-cropped.
  assert red.shape == (8, 8, 3)
  np.testing.assert_allclose(red[..., 0], (1 - image_folder.MEAN[0]) / image_folder.STD[0],
                             atol=0.05)
  memory = BatchIterator(train, 4, seed=5)
  halves = []
  for rows in ((0, 2), (2, 4)):
    loader = GrainLoader(train, 4, seed=5, transform=dataset.transform)
    loader.rows = rows
    halves.append([next(loader) for _ in range(4)])
    loader.close()
  for step in range(4):
    whole = memory.batch(step)
    epoch, within = divmod(step, memory.steps_per_epoch)
    indices = memory._order(epoch)[within * 4:(within + 1) * 4]
    expected = dataset.transform(whole, indices, epoch, 5)
    _assert_batches_equal({k: np.concatenate([h[step][k] for h in halves]) for k in whole},
                          expected, f"step {step}")
  offsets, flips = image_folder.CropFlip().draws(np.arange(2000), 0, 5)
  assert offsets.min() == 0 and offsets.max() == 8 and 0.45 < flips.mean() < 0.55
  _write_images(tmp_path / "b", {"x": 6, "y": 6})  # No split folders: val carved.
  flat = get_dataset(_image_config(tmp_path / "b", augment=False))
  assert flat.transform is None and flat.metadata["augmented_in_loader"] is False
  assert [len(flat.splits[s]["label"]) for s in ("train", "val", "test")] == [9, 3, 0]


def test_image_folder_trains(tmp_path):
  """A CNN trains two steps on an image folder: augmented by the loader, not again on
  device; evaluated on its lazily decoded val and test splits."""
  from dsjax.train import tasks, train_and_evaluate

  _write_images(tmp_path / "data" / "train", {"cat": 8, "dog": 8}, size=(12, 10))
  _write_images(tmp_path / "data" / "test", {"cat": 2, "dog": 2}, size=(12, 10), seed=3)
  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-cifar10")
  config.model.features, config.model.dense_features = (4, 8), 16
  config_lib.make_tiny(config, batch_size=4)
  config.data.name, config.data.data_dir = "image-folder", str(tmp_path / "data")
  config.data.image_size, config.data.augment, config.data.val_fraction = 8, True, 0.25
  config.logging.tensorboard = config.logging.progress_bar = False
  dataset = get_dataset(config.data)
  assert not tasks.make_task("classification", config.data, dataset.metadata).augment
  summary = train_and_evaluate(config, tmp_path / "run")
  assert summary["steps"] == 2 and 0 <= summary["test_accuracy"] <= 1
  assert "eval_loss" in summary


def test_search_reads_an_image_folder_batch_by_batch(tmp_path, monkeypatch):
  """dsjax-search on an image folder: its halves are lazy (`lazy.take` gives the rows
  fancy indexing gives), and no read takes more than a batch of rows."""
  from dsjax.data import lazy
  from dsjax.train import search_architecture

  _write_images(tmp_path / "data" / "train", {"cat": 12, "dog": 12})
  split = get_dataset(_image_config(tmp_path / "data", augment=False)).splits["train"]
  indices = np.asarray([5, 0, 17, 3])
  taken = lazy.take(split, indices)
  assert lazy.is_lazy(taken) and len(taken["label"]) == 4
  _assert_batches_equal({k: v[:] for k, v in taken.items()},
                        {k: v[indices] for k, v in split.items()}, "take")
  reads = []
  original = image_folder.ImageFiles.read
  monkeypatch.setattr(image_folder.ImageFiles, "read",
                      lambda self, rows: reads.append(len(rows)) or original(self, rows))
  config = load_config("digits_dnas")
  config.data.name, config.data.data_dir = "image-folder", str(tmp_path / "data")
  config.data.image_size, config.data.augment, config.data.val_fraction = 8, False, 0.25
  config.train.batch_size = 4
  config.logging.tensorboard = config.logging.progress_bar = False
  summary = search_architecture(config, tmp_path / "search")
  assert summary["steps"] == 2 and reads and max(reads) <= 4, reads


def test_image_folder_bad_inputs_are_named(tmp_path):
  with pytest.raises(DataError, match="data_dir is not set"):
    get_dataset(_image_config(""))
  with pytest.raises(DataError, match="missing' does not exist"):
    get_dataset(_image_config(tmp_path / "missing"))
  (tmp_path / "none").mkdir()
  with pytest.raises(DataError, match="holds no class folder"):
    get_dataset(_image_config(tmp_path / "none"))
  _write_images(tmp_path / "empty" / "train", {"cat": 2})
  (tmp_path / "empty" / "train" / "dog").mkdir()
  with pytest.raises(DataError, match=r"class folder .*empty/train/dog holds no"):
    get_dataset(_image_config(tmp_path / "empty"))
  _write_images(tmp_path / "extra" / "train", {"cat": 2})
  _write_images(tmp_path / "extra" / "val", {"cow": 1})
  with pytest.raises(DataError, match="class folder.*cow.*lacks"):
    get_dataset(_image_config(tmp_path / "extra"))
  _write_images(tmp_path / "bad", {"cat": 3})
  broken = tmp_path / "bad" / "cat" / "001.png"
  broken.write_bytes(broken.read_bytes()[:40])  # A truncated PNG.
  dataset = get_dataset(_image_config(tmp_path / "bad", val_fraction=0.0))
  for workers in (0, 1):  # In a worker process, the same error reaches the trainer.
    loader = GrainLoader(dataset.splits["train"], 3, seed=0, workers=workers,
                         transform=dataset.transform)
    with pytest.raises(DataError, match=f"cannot read the image {broken}"):
      next(loader)
    loader.close()


def test_loader_config_is_checked():
  def config(**data):
    config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
    config.data.update(data)
    return config

  for data, message in (
      ({"loader": "stream"}, "data.loader must be one of auto, memory, grain"),
      ({"name": "image-folder", "loader": "memory"}, "data.loader=grain .or auto., not memory"),
      ({"workers": 2}, "data.workers sets the grain loader, but data.loader=auto reads digits"),
      ({"loader": "memory", "prefetch": 4}, "data.prefetch sets the grain loader"),
      ({"loader": "grain", "workers": -1}, "data.workers must be >= 0")):
    with pytest.raises(ConfigError, match=message):
      config_lib.validate(config(**data))
  config_lib.validate(config(loader="grain", workers=2, prefetch=0))


if __name__ == "__main__":  # One process of the two-process test.
  _process_main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6])
