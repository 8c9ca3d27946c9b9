# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     notebook_metadata_filter: kernelspec,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Data, tensor and pipeline parallelism on 8 devices
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/dsjax/dsjax/blob/main/notebooks/04_parallelism.ipynb)
#
# One `jax.sharding.Mesh` with axes `pipe`, `data`, `fsdp` and `model` spans every device.
# Parameters carry logical axis names (`embed`, `mlp`, `heads`, `vocab`, `layers`) and the
# rules in `dsjax/parallel/sharding.py` map them to mesh axes: tensor parallelism splits
# MLP units, attention heads and the vocabulary on `model`, the batch is split over
# `data`, and BERT's stacked layers run as a GPipe pipeline over `pipe`. This notebook
# builds a `data=2, model=2, pipe=2` mesh, shows where each parameter lives, trains
# `bert-tiny` on it and reads the bytes its collectives move per step.
#
# Without 8 accelerator devices (a CPU runtime, or a Colab GPU runtime with its one GPU)
# the 8 devices are simulated on the CPU; on a Colab TPU v2-8 runtime they are its 8 cores.

# %%
REPO_URL = "https://github.com/dsjax/dsjax"

import importlib
import subprocess
import sys

try:
  import dsjax  # Imports no jax: the device count below is still open.
except ImportError:  # Colab: install dsjax (and matplotlib) from GitHub.
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                         "dsjax[plot] @ git+" + REPO_URL])
  importlib.invalidate_caches()
  import dsjax

# %% [markdown]
# XLA fixes the number of CPU devices when jax starts, so the runtime is detected, and
# `XLA_FLAGS` set, before jax is imported.

# %%
import glob
import os
import shutil

DEVICES = 8


def mesh_platform() -> str:
  """Where the 8 devices come from, judged from the machine alone (importing jax would
  start XLA): a TPU runtime's cores, 8 or more GPUs, or else simulated CPU devices."""
  if (os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_ACCELERATOR_TYPE")
      or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")):
    return "tpu"
  if shutil.which("nvidia-smi"):
    gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    if gpus.count("GPU ") >= DEVICES:
      return "gpu"
  return "cpu"


PLATFORM = mesh_platform()
if PLATFORM == "cpu":
  if "jax" in sys.modules:
    print("jax is imported already: restart the runtime for 8 simulated devices")
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={DEVICES}").strip()

import jax

# %matplotlib inline

BACKEND = jax.default_backend()
print(f"dsjax {dsjax.__version__}, jax {jax.__version__}, backend {BACKEND}, "
      f"{jax.device_count()} devices: {jax.devices()}")
if jax.device_count() != DEVICES:
  raise RuntimeError(f"this runtime has {jax.device_count()} {BACKEND} devices; the mesh "
                     f"needs {DEVICES}: pick a CPU runtime (simulated devices) or a TPU v2-8")

# %% tags=["parameters"]
MESH = {"data": 2, "model": 2, "pipe": 2}
STEPS = 20 if BACKEND == "cpu" else 300
BATCH_SIZE = 16 if BACKEND == "cpu" else 64  # Split over data, then into 4 micro-batches.
SEQ_LEN = 32 if BACKEND == "cpu" else 64
VOCAB_SIZE = 512 if BACKEND == "cpu" else 4096
WORKDIR = "runs/bert-tiny-3d"

# %% [markdown]
# ## The mesh and the parameters' shardings
#
# The config is `configs/bert_tiny.py`'s, at the sizes above: masked-LM pretraining of
# `bert-tiny` (2 layers, hidden 128, 2 heads) on the embedded text corpus, whose WordPiece
# tokenizer is trained on first use and cached in the workdir.

# %%
from dsjax import config as config_lib

config = config_lib.with_model_defaults(config_lib.base_config(), "bert-tiny")
config.data.name = "text"
config.data.seq_len, config.data.vocab_size = SEQ_LEN, VOCAB_SIZE
config.data.cache_dir = WORKDIR  # The tokenizer, shared by the cells below.
config.mesh.update(MESH)
config.train.steps, config.train.batch_size = STEPS, BATCH_SIZE
config.train.log_every_steps = 5
config.train.eval_every_steps = config.checkpoint.every_steps = STEPS
config.train.eval_batch_size = 128
config.optimizer.learning_rate = 1e-3
config.optimizer.warmup_steps = STEPS // 4
config.optimizer.weight_decay = 0.01
config.optimizer.grad_clip_norm = 1.0
config.logging.progress_bar = False

# %% [markdown]
# `create_train_state` with a mesh creates the parameters (and the optimizer state)
# directly in their shardings: `jax.eval_shape` of the init gives the logical axes,
# the rules turn them into `PartitionSpec`s and the init is jitted with those
# `out_shardings`, so no device ever holds the whole model. The layer stack is built as a
# 2-stage pipeline with 4 micro-batches (`parallel.microbatches`, default 2 x pipe), as
# the trainer builds it.

# %%
import jax.numpy as jnp

from dsjax import data, models
from dsjax.parallel import mesh as mesh_lib
from dsjax.parallel import sharding
from dsjax.train import create_train_state, tasks
from dsjax.train.optim import build_optimizer

mesh = mesh_lib.make_mesh(config.mesh)
rules = sharding.config_rules(config.parallel)
print("mesh", mesh_lib.describe(mesh))
dataset = data.get_dataset(config.data)
task = tasks.make_task("mlm", config.data, dataset.metadata)
model = models.get_spec("bert-tiny").build(config.model, dataset.num_classes, jnp.float32)
model = model.clone(num_stages=MESH["pipe"], num_microbatches=2 * MESH["pipe"])
tx, _ = build_optimizer(config.optimizer, STEPS)
with sharding.context(mesh, rules):
  state = create_train_state(model, tx, task.example_batch(dataset.splits["train"]),
                             config.seed, task=task, mesh=mesh, rules=rules)

for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
  name = jax.tree_util.keystr(path, simple=True, separator="/")
  print(f"{name:40s} {str(leaf.shape):18s} {str(leaf.sharding.spec):34s} "
        f"per device {leaf.addressable_shards[0].data.shape}")

# %% [markdown]
# The token embedding `[vocab, embed]` splits its vocabulary over `model`: each half sits
# on four devices, its replicas along `data` and `pipe` (the embedding is used before the
# pipeline, so every stage keeps a copy). The figure names the devices of each block.

# %%
jax.debug.visualize_array_sharding(state.params["word_embeddings"]["embedding"])

# %% [markdown]
# The first MLP kernel of the stacked layers, `[layers, embed, mlp]`, viewed as
# `[layers x embed, mlp]`: the layers split over `pipe` (the top half of the rows, layer
# 0, lives on the first stage's devices, layer 1 on the second's) and the MLP units over
# `model` (Megatron's column split); each block is held by its two `data` replicas.

# %%
mlp_in = state.params["encoder"]["layers"]["mlp_in"]["kernel"]
jax.debug.visualize_array_sharding(jax.jit(lambda x: x.reshape(-1, x.shape[-1]))(mlp_in))

# %% [markdown]
# ## Train on data x model x pipe
#
# `train_and_evaluate` builds the same mesh from `config.mesh` (`--mesh
# data=2,model=2,pipe=2` on the command line) and runs one jitted step with explicit
# shardings. Inside the pipeline schedule only activations move between the stages.

# %%
from dsjax.train import train_and_evaluate

del state  # The trainer creates its own.
summary = train_and_evaluate(config, WORKDIR)
print(f"mesh {summary['mesh']}: test loss {summary['test_loss']:.3f}, masked-token accuracy "
      f"{summary['test_accuracy']:.3f} after {summary['steps']} steps; compiled in "
      f"{summary['compile_time_s']:.1f} s")

# %%
from dsjax import plots

run = plots.load_run(WORKDIR)
plots.figure_curves([run])

# %% [markdown]
# ## Collective bytes per step
#
# Read from the compiled HLO of the train step: for each collective, its operand bytes x
# the devices taking part. The all-reduces sum the gradients over `data` and the partial
# products of the row-split matmuls over `model`; the collective-permutes carry the
# activations (and their gradients) from one pipeline stage to the next. On simulated
# CPU devices these are copies in one memory; on a TPU they cross the interconnect.

# %%
from IPython.display import Markdown

collectives = summary["collective_bytes"]
rows = ["| collective | bytes per step |", "| --- | ---: |"]
rows += [f"| {kind} | {collectives[kind]:,.0f} |" for kind in collectives if kind != "total"]
rows.append(f"| **total** (`comm_bytes`) | **{summary['comm_bytes']:,}** |")
Markdown("\n".join(rows))
