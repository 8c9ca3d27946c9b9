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
# # Mixed precision: fp32, bf16 and the adaptive `mixed` policy
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/dsjax/dsjax/blob/main/notebooks/03_mixed_precision.ipynb)
#
# `--precision` picks a policy; master weights and optimizer state stay float32 in all of
# them. `bf16` computes in bfloat16. `mixed` computes in float16 on a GPU (bfloat16
# elsewhere) with dynamic loss scaling in float16, and runs the adaptive controller of
# `dsjax.precision.adaptive`: it watches each layer's output range, overflows and, every
# `precision.controller.error_check_every_steps`, its error against a float32 pass, and
# promotes a layer to float32 when it overflows or drifts. This notebook trains the same
# small CNN under each policy and plots what `metrics.jsonl` logs about them:
# `loss_scale`, `skipped_steps`, `promoted_layers` and `fp16_matmul_flops_fraction` (the
# share of matmul FLOPs run in half precision).

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
# Off a GPU, `mixed` computes in bfloat16, which needs no loss scaling; a fourth run,
# `mixed-fp16` (policy `fp16` with the controller on), then shows what `mixed` is on a
# GPU: float16 compute, dynamic loss scaling and the controller.

# %% tags=["parameters"]
STEPS = 60 if BACKEND == "cpu" else 1000
BATCH_SIZE = 64 if BACKEND == "cpu" else 256
FEATURES, DENSE_FEATURES = ((16, 32), 64) if BACKEND == "cpu" else ((32, 64), 128)
# The controller's tolerance for a layer's relative error against float32 (default 0.05),
# set below what bfloat16 rounding (8 significant bits) costs a layer of this CNN
# (~0.003-0.005), so that the controller has something to promote here.
ERROR_TOLERANCE = 0.003
RUNS = {"fp32": ("fp32", None), "bf16": ("bf16", None), "mixed": ("mixed", None)}
if BACKEND != "gpu":
  RUNS["mixed-fp16"] = ("fp16", True)

# %% [markdown]
# ## Train
#
# Every run has the same model, data order and seed. Loss scaling starts at its largest
# value (2^24), so the float16 run overflows at first: each non-finite gradient skips
# its step (params and optimizer state untouched) and halves the scale; after
# `growth_interval` finite steps the scale doubles again. The controller checks the
# layers' ranges every 10 steps and their errors every `STEPS // 4`; each new plan
# recompiles the step once. Its decisions are logged; here they are printed.

# %%
import logging

from dsjax import config as config_lib
from dsjax.train import train_and_evaluate

# The controller's decisions ("promoted conv1_0 to fp32 (relative error ...)").
plan_log = logging.getLogger("dsjax.train.loop")
plan_log.setLevel(logging.INFO)
plan_log.addHandler(logging.StreamHandler(sys.stdout))
plan_log.propagate = False

summaries = {}
for name, (policy, adaptive) in RUNS.items():
  config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
  config.model.features, config.model.dense_features = FEATURES, DENSE_FEATURES
  config.precision.policy = policy
  config.precision.adaptive = adaptive
  config.precision.loss_scale.initial_scale = 2.0**24
  config.precision.loss_scale.growth_interval = STEPS // 4
  config.precision.controller.check_every_steps = 10
  config.precision.controller.error_check_every_steps = STEPS // 4
  config.precision.controller.error_tolerance = ERROR_TOLERANCE
  config.train.steps, config.train.batch_size = STEPS, BATCH_SIZE
  config.train.log_every_steps = 5
  config.train.eval_every_steps = config.checkpoint.every_steps = STEPS // 2
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 20
  config.logging.progress_bar = False
  print(f"--- {name}: precision.policy={policy}, adaptive={adaptive}")
  summaries[name] = train_and_evaluate(config, f"runs/{name}")

# %% [markdown]
# The policies end close to each other: the same updates, computed in other dtypes (the
# float16 run a few steps behind, for the steps it skipped). `train s` is the wall time
# of the steps, a new plan's recompilation included; on a CPU half precision is emulated
# and brings no speed-up, on a GPU or TPU it does.

# %%
from IPython.display import Markdown

rows = ["| run | test accuracy | test loss | train s | compile s |",
        "| --- | ---: | ---: | ---: | ---: |"]
rows += [f"| {name} | {s['test_accuracy']:.3f} | {s['test_loss']:.4f} | "
         f"{s['train_time_s']:.1f} | {s['compile_time_s']:.1f} |" for name, s in summaries.items()]
Markdown("\n".join(rows))

# %%
from dsjax import plots

runs = [plots.load_run(f"runs/{name}") for name in RUNS]
plots.figure_curves(runs)

# %% [markdown]
# ## Loss scale and skipped steps
#
# Only runs with loss scaling are drawn (float16 compute). The scale halves at each
# overflow until the scaled gradients fit in float16, then grows every `growth_interval`
# clean steps; the skipped steps are those overflows.

# %%
plots.figure_loss_scale(runs)

# %% [markdown]
# ## The per-layer precision plan
#
# Layers promoted to float32 by the controller, and the share of matmul FLOPs still run in
# half precision (100% for `bf16`, whose plan is pinned; fp32 runs are left out). A
# promoted layer goes back to half precision after `stable_checks` calm checks in a row.
# float16 keeps 3 more significant bits than bfloat16, so the float16 run's errors stay
# under the same tolerance.

# %%
plots.figure_precision_plan(runs)
