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
# # dsjax quickstart: a CNN on the digits, from Python
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/dsjax/dsjax/blob/main/notebooks/01_quickstart.ipynb)
#
# `dsjax-train` is a thin layer over one function, `dsjax.train.train_and_evaluate(config,
# workdir)`. This notebook calls it on scikit-learn's 8x8 handwritten digits (shipped with
# the package: nothing is downloaded), plots the curves it logged, restores the checkpoint
# it wrote and classifies a few test images with it. On a CPU it takes well under a
# minute; on a GPU or TPU runtime it trains longer.

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
# Sizes: small enough for a 2-core CPU, longer runs on an accelerator.

# %% tags=["parameters"]
STEPS = 200 if BACKEND == "cpu" else 1000
BATCH_SIZE = 64 if BACKEND == "cpu" else 128
WORKDIR = "runs/quickstart"

# %% [markdown]
# ## Train
#
# A config starts from `dsjax.config.base_config()` plus the model's own fields from the
# registry; any field can then be set, as `--config.a.b=value` does on the command line.
# The run writes `metrics.jsonl`, TensorBoard events, `config.json`, `summary.json` and
# orbax checkpoints into the workdir. Rerunning the cell on the same workdir resumes from
# the newest checkpoint (here: trains nothing more); delete the folder to start over.

# %%
from dsjax import config as config_lib
from dsjax.train import train_and_evaluate

config = config_lib.with_model_defaults(config_lib.base_config(), "cnn-digits")
config.train.steps = STEPS
config.train.batch_size = BATCH_SIZE
config.train.eval_every_steps = STEPS // 4
config.checkpoint.every_steps = STEPS // 2
config.optimizer.learning_rate = 3e-3
config.optimizer.schedule = "constant"  # As configs/digits_cnn.py.
config.optimizer.warmup_steps = 20
config.logging.progress_bar = False

summary = train_and_evaluate(config, WORKDIR)
print(f"test accuracy {summary['test_accuracy']:.3f}, test loss {summary['test_loss']:.3f} "
      f"after {summary['steps']} steps; compiled in {summary['compile_time_s']:.1f} s, "
      f"{summary['flops_per_step']:.3g} FLOPs per step")

# %% [markdown]
# ## Curves
#
# `dsjax.plots` reads a workdir back (`load_run`) and draws its logged metrics: training
# loss and accuracy every `train.log_every_steps`, validation ones every
# `train.eval_every_steps`, and the learning rate (linear warm-up, then constant).

# %%
from dsjax import plots

run = plots.load_run(WORKDIR)
plots.figure_curves([run])

# %%
plots.figure_learning_rate([run])

# %% [markdown]
# ## Restore the checkpoint
#
# `dsjax.train.checkpoint.Checkpointer` restores a step into the structure, shapes and
# dtypes of a target train state: here a fresh one from the same config, as the trainer
# does when it resumes. A checkpoint of another model would be refused with a message
# naming its folder.

# %%
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from dsjax import data, models
from dsjax.train import checkpoint, create_train_state
from dsjax.train.optim import build_optimizer

dataset = data.get_dataset(config.data)
model = models.get_spec(config.model.name).build(config.model, dataset.num_classes, jnp.float32)
tx, _ = build_optimizer(config.optimizer, config.train.steps)
target = create_train_state(model, tx, dataset.input_shape, config.seed)

checkpointer = checkpoint.Checkpointer(Path(WORKDIR) / "checkpoints",
                                       max_to_keep=config.checkpoint.max_to_keep,
                                       async_save=False)
step = checkpointer.latest_step()
state, host_state = checkpointer.restore(step, target)
checkpointer.close()
print(f"restored step {int(state.step)}; host state {host_state}")

# %% [markdown]
# ## Predict
#
# The restored parameters classify the whole test split as the run's own final evaluation
# did (in one batch here, in batches of `train.eval_batch_size` there).

# %%
test = dataset.splits["test"]
logits = jax.jit(model.apply)({"params": state.params, **state.model_state}, test["image"])
predicted = np.asarray(jnp.argmax(logits, -1))
accuracy = float(np.mean(predicted == test["label"]))
print(f"test accuracy of the restored model: {accuracy:.3f} ({len(predicted)} images)")
assert abs(accuracy - summary["test_accuracy"]) <= 1 / len(predicted)

# %%
import matplotlib.pyplot as plt

fig, axes = plt.subplots(2, 8, figsize=(10, 3.4))
for index, ax in enumerate(axes.flat):
  right = predicted[index] == test["label"][index]
  ax.imshow(test["image"][index, :, :, 0], cmap="gray_r")
  ax.set_title(f"{predicted[index]}" + ("" if right else f" (is {test['label'][index]})"),
               color="black" if right else "red", fontsize=10)
  ax.axis("off")
fig.suptitle("Test images and predicted labels (red: wrong)")
fig.tight_layout()
