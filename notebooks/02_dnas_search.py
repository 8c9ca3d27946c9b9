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
# # Differentiable architecture search on the digits
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/dsjax/dsjax/blob/main/notebooks/02_dnas_search.ipynb)
#
# `dsjax.train.search_architecture(config, workdir)` (the `dsjax-search` command) trains a
# supernet whose blocks mix every candidate op (conv and separable conv of each kernel
# size, identity, zero), width (channel masks) and depth (keep/skip gates). Architecture
# logits learn on one half of the training split while the weights learn on the other,
# under a FLOPs budget. The result is `architecture.json`, which `dsjax-train` retrains
# from scratch as the model `dnas-digits`. This notebook runs the search, plots how the
# probabilities move, retrains the derived network and compares it with the
# hand-designed `cnn-digits` baseline.

# %%
REPO_URL = "https://github.com/dsjax/dsjax"

import importlib
import subprocess
import sys

try:
  import dsjax
except ImportError:  # Colab: install dsjax (and matplotlib) from GitHub.
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                         "dsjax[plot] @ git+" + REPO_URL])
  importlib.invalidate_caches()
  import dsjax

import jax

# %matplotlib inline

BACKEND = jax.default_backend()  # "cpu", "gpu" or "tpu".
print(f"dsjax {dsjax.__version__}, jax {jax.__version__}, backend {BACKEND}: {jax.devices()}")

# %% [markdown]
# On an accelerator the search space and schedule are those of `configs/digits_dnas.py`
# (800 search steps over 4 blocks of 6 candidate ops and 3 widths). A CPU gets a narrower
# space (3x3 kernels only, widths 8 or 16, 2-3 blocks) and fewer steps, so the search
# takes well under a minute; its probabilities move less far from uniform.

# %% tags=["parameters"]
ON_CPU = BACKEND == "cpu"
SEARCH_STEPS = 60 if ON_CPU else 800
RETRAIN_STEPS = 120 if ON_CPU else 1000
BATCH_SIZE = 32 if ON_CPU else 64
SPACE = (dict(min_channels=8, max_channels=16, channel_choices=2, depth_range=(2, 3),
              kernel_sizes=(3,), stem_channels=8, strides=(1, 2)) if ON_CPU else
         dict(min_channels=8, max_channels=24, channel_choices=3, depth_range=(2, 4),
              kernel_sizes=(3, 5), stem_channels=16, strides=(1, 2)))
TARGET_FLOPS = 1e5 if ON_CPU else 3e5  # Forward FLOPs per example.
WORKDIR = "runs/dnas"

# %% [markdown]
# ## Search
#
# The config follows `configs/digits_dnas.py`: Gumbel-softmax relaxation (FBNet) with a
# temperature annealed from 2 to 0.5, a frozen-architecture warm-up for the first quarter
# of the steps, and a resource penalty that pulls the expected FLOPs (a differentiable
# function of the logits) towards the target.

# %%
from dsjax import config as config_lib
from dsjax.train import search_architecture

config = config_lib.with_model_defaults(config_lib.base_config(), "dnas-digits")
config.model.backbone.update(SPACE)
config.model.relaxation = "gumbel"
config.search.steps = SEARCH_STEPS
config.search.warmup_steps = SEARCH_STEPS // 4
config.search.arch_learning_rate = 3e-2
config.search.temperature_start, config.search.temperature_end = 2.0, 0.5
config.resource.target_flops = TARGET_FLOPS
config.resource.penalty_weight = 0.1
# The weights' optimizer: the search's, and the retraining's below.
config.train.batch_size = BATCH_SIZE
config.train.log_every_steps = 10
# Short CPU runs take larger steps than digits_dnas.py's 3e-3.
config.optimizer.learning_rate = 1e-2 if ON_CPU else 3e-3
config.optimizer.schedule = "constant"
config.optimizer.warmup_steps = 20
config.checkpoint.every_steps = SEARCH_STEPS
config.logging.progress_bar = False

search = search_architecture(config, WORKDIR)
print(f"{search['steps']} search steps in {search['search_time_s']:.1f} s; derived: depth "
      f"{search['depth']}, {search['flops']:.3g} FLOPs and {search['params']} params per "
      f"example (target {TARGET_FLOPS:.3g} FLOPs)")

# %% [markdown]
# ## How the architecture probabilities evolve
#
# Each block's op and width distributions, and the keep probability of the optional
# blocks, as logged every `train.log_every_steps` steps. They stay put during the warm-up
# (weights only), then the architecture step moves them.

# %%
from dsjax import plots

plots.figure_architecture(plots.load_run(WORKDIR))

# %% [markdown]
# The final probabilities (`probabilities.txt`; `*` marks the derived width) and the
# derived network: each block's most probable op and width; optional blocks are kept when
# their keep probability is at least one half.

# %%
import json
from pathlib import Path

print((Path(WORKDIR) / "probabilities.txt").read_text())
architecture = json.loads(Path(search["architecture"]).read_text())
for block in architecture["blocks"]:
  if block["kept"]:
    kernel = f" {block['kernel_size']}x{block['kernel_size']}" if block["kernel_size"] else ""
    print(f"block {block['index']}: {block['op']}{kernel}, {block['channels']} channels, "
          f"stride {block['stride']}")

# %% [markdown]
# ## Retrain the derived network, and the baseline
#
# The same config with `model.architecture` set trains the discrete network from scratch
# (`dsjax-train --architecture`). The baseline is `cnn-digits` (two stages of two 3x3
# convolutions, 32 and 64 channels, then 128 hidden units), with the same steps, batch
# and optimizer.

# %%
from dsjax.train import train_and_evaluate

retrain_config = config.copy_and_resolve_references()
retrain_config.model.architecture = search["architecture"]
retrain_config.train.steps = RETRAIN_STEPS
retrain_config.train.eval_every_steps = RETRAIN_STEPS // 4
retrain_config.checkpoint.every_steps = RETRAIN_STEPS
derived = train_and_evaluate(retrain_config, WORKDIR + "-retrain")

baseline_config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
for section in ("train", "optimizer", "checkpoint", "logging"):
  baseline_config[section].update(retrain_config[section].to_dict())
baseline = train_and_evaluate(baseline_config, "runs/cnn-baseline")

# %%
plots.figure_curves([WORKDIR + "-retrain", "runs/cnn-baseline"])

# %% [markdown]
# ## Comparison
#
# Parameters are counted from the trained float32 weights (`summary.json`'s
# `memory.params_bytes` / 4); FLOPs are XLA's count of one training step (forward and
# backward) divided by the batch, so both networks are measured the same way.

# %%
from IPython.display import Markdown


def row(name, summary):
  params = summary["memory"]["params_bytes"] // 4
  flops = summary["flops_per_step"] / BATCH_SIZE
  return (f"| {name} | {params:,} | {flops / 1e6:.2f} M | {summary['test_accuracy']:.3f} | "
          f"{summary['test_loss']:.3f} |")


Markdown("\n".join([
    "| network | params | train FLOPs / example | test accuracy | test loss |",
    "| --- | ---: | ---: | ---: | ---: |",
    row("DNAS-derived (`dnas-digits`)", derived),
    row("hand-designed (`cnn-digits`)", baseline)]))
