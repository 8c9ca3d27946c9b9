"""Command-line entry points: `dsjax-train` (also `python -m dsjax.train`) and
`dsjax-profile` (also `python -m dsjax.profile`), `dsjax-search` (also
`python -m dsjax.nas`).

  dsjax-train --model cnn-digits --precision fp32 --batch-size 64 \\
      --gradient-accumulation 2 --steps 300 --workdir runs/digits
  dsjax-train --config configs/digits_cnn.py --config.optimizer.learning_rate=1e-3 \\
      --workdir runs/digits

The short flags are shorthands for config fields. Without `--config`, the model's own
experiment file from `configs/` is the starting point. Every user error ends the process
with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from dsjax import precision
from dsjax.errors import ConfigError, DsjaxError
from dsjax.models import registry

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"

# Short flag -> config field it sets.
_SHORTHANDS = {
    "precision": "precision.policy",
    "batch-size": "train.batch_size",
    "gradient-accumulation": "train.grad_accum_steps",
    "steps": "train.steps",
    "seed": "seed",
    "init-from": "train.init_from",
    "grad-compression": "parallel.grad_compression",
    "coordinator": "distributed.coordinator",
    "num-processes": "distributed.num_processes",
    "process-id": "distributed.process_id",
}

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file(
    "config", None, "Experiment file `configs/NAME.py[:variant]`; override fields with "
    "--config.section.field=value.", flag_values=FLAGS)
flags.DEFINE_string("model", None, "Model name from the registry; picks its default config "
                    "when --config is not given.", flag_values=FLAGS)
flags.DEFINE_enum("precision", None, list(precision.PRESETS), "Precision preset.",
                  flag_values=FLAGS)
flags.DEFINE_integer("batch-size", None, "Global batch per optimizer step.", flag_values=FLAGS)
flags.DEFINE_integer("gradient-accumulation", None, "Micro-batches per step (K).",
                     flag_values=FLAGS)
flags.DEFINE_integer("steps", None, "Optimizer steps to train for.", flag_values=FLAGS)
flags.DEFINE_integer("seed", None, "Random seed.", flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "Run folder; rerunning on it resumes.", flag_values=FLAGS)
flags.DEFINE_string("architecture", None, "dsjax-train of a DNAS model: the "
                    "architecture.json dsjax-search wrote (model.architecture).",
                    flag_values=FLAGS)
flags.DEFINE_string("init-from", None, "Start from a pretrained checkpoint (bert-*: a Hugging "
                    "Face BERT folder with config.json, model.safetensors, vocab.txt).",
                    flag_values=FLAGS)
flags.DEFINE_string("grad-compression", None, "Data-parallel gradient exchange: none, local, "
                    "topk:DENSITY, threshold:T or powersgd:RANK (parallel.grad_compression).",
                    flag_values=FLAGS)
flags.DEFINE_string("mesh", None, "Device mesh, e.g. data=2,model=2,pipe=2 (axes pipe, data, "
                    "fsdp, model; -1 takes the rest); sets config.mesh.", flag_values=FLAGS)
flags.DEFINE_string("coordinator", None, "Multi-process runs: host:port of process 0 "
                    "(config.distributed.coordinator).", flag_values=FLAGS)
flags.DEFINE_integer("num-processes", None, "Multi-process runs: number of processes.",
                     flag_values=FLAGS)
flags.DEFINE_integer("process-id", None, "Multi-process runs: this process's index, "
                     "0..num-processes-1.", flag_values=FLAGS)
flags.DEFINE_bool("trace", False, "dsjax-profile: also write a jax.profiler trace to "
                  "WORKDIR/trace (TensorBoard profile plugin or Perfetto).", flag_values=FLAGS)

_PROFILE_STEPS = 20


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """Reads `--name=value` or `--name value` from raw argv (before absl parses it)."""
  for index, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and index + 1 < len(argv):
      return argv[index + 1]
  return None


def _with_default_config(argv: list[str]) -> list[str]:
  """Adds `--config=<the model's experiment file>` when no --config was given."""
  config_arg = _flag_value(argv, "config")
  if config_arg is not None:
    path = Path(config_arg.split(":", 1)[0]).expanduser()
    if not path.is_file():
      raise ConfigError(f"config file {path} not found (--config takes a path such as "
                        f"{CONFIGS_DIR / 'digits_cnn.py'})")
    return argv
  name = _flag_value(argv, "model") or "cnn-digits"
  path = CONFIGS_DIR / registry.get_spec(name).config_file  # May end in ":ARG".
  if not path.with_name(path.name.split(":", 1)[0]).exists():
    raise ConfigError(f"the default config of model {name!r} is missing ({path}); "
                      "pass --config FILE")
  return [argv[0], f"--config={path}", *argv[1:]]


def _parse(argv: list[str]):
  """Parses flags into the resolved config; user errors become ConfigError."""
  try:
    FLAGS(_with_default_config(argv))
    config = FLAGS.config
    config.get("model")  # config_flags defers load errors to the first access.
  except DsjaxError:
    raise
  except flags.Error as error:
    raise ConfigError(str(error)) from error
  except (AttributeError, KeyError) as error:
    raise ConfigError(_unknown_override(argv, error)) from error
  except Exception as error:  # noqa: BLE001 - the config file is user code: any error.
    cause = error.__cause__ or error
    raise ConfigError(f"config file {_flag_value(argv, 'config')} failed to load: "
                      f"{_describe(cause)}") from error
  if FLAGS.model is not None and FLAGS.model != config.model.name:
    registry.get_spec(FLAGS.model)  # Unknown names get the list of known ones.
    raise ConfigError(f"--model {FLAGS.model} differs from the config file's model.name "
                      f"{config.model.name!r}: drop --model, or drop --config to start from "
                      "the model's default config")
  if FLAGS.architecture is not None:
    if "architecture" not in config.model:
      raise ConfigError(f"--architecture applies to DNAS models (dnas-*), not "
                        f"{config.model.name}")
    config.model.architecture = FLAGS.architecture
  if FLAGS.mesh is not None:
    from dsjax.parallel.mesh import parse_mesh  # noqa: PLC0415 - imports jax.

    for axis, size in parse_mesh(FLAGS.mesh).items():
      config.mesh[axis] = size
  for flag, field in _SHORTHANDS.items():
    if FLAGS[flag].value is not None:
      section, _, key = field.rpartition(".")
      (config[section] if section else config)[key] = FLAGS[flag].value
  if not FLAGS.workdir:
    raise ConfigError("--workdir is required: the folder for checkpoints and logs "
                      "(rerunning on the same folder resumes)")
  return config


def _unknown_override(argv: Sequence[str], error: Exception) -> str:
  """Names the `--config.*` override whose key does not exist, with config_flags' hint."""
  while error.args and isinstance(error.args[0], Exception):  # AttributeError(KeyError(...))
    error = error.args[0]
  text = str(error.args[0] if error.args else error)
  key = re.search(r"'([^']+)'", text)
  key = key.group(1) if key else text
  hint = re.search(r'Did you mean "([^"]+)"', text)
  flag = next((arg.split("=", 1)[0] for arg in argv
               if arg.startswith("--config.") and f".{key}" in arg.split("=", 1)[0]), "--config.*")
  return (f"{flag}: the config has no key {key!r}"
          + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))


def _describe(error: BaseException) -> str:
  """`Type: message (file:line)` of the innermost frame, e.g. inside a config file."""
  if isinstance(error, SyntaxError):
    return f"SyntaxError: {error.msg} ({error.filename}:{error.lineno})"
  frames = traceback.extract_tb(error.__traceback__)
  where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
  return f"{type(error).__name__}: {error}{where}"


def _run(program: str, argv: Sequence[str] | None, action):
  """Parses flags, runs `action(config)`, and turns user errors into one line + exit 2."""
  argv = list(sys.argv if argv is None else argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("dsjax").setLevel(logging.INFO)
  try:
    return action(_parse(argv))
  except DsjaxError as error:
    message = " ".join(str(error).split())
  except KeyboardInterrupt:
    message = "interrupted; rerun the same command to resume from the last checkpoint"
  print(f"{program}: error: {message}", file=sys.stderr)
  sys.exit(2)


def train_main(argv: Sequence[str] | None = None) -> None:
  """Entry point of `dsjax-train`."""

  def train(config):
    from dsjax.parallel import overlap  # noqa: PLC0415 - imports jax (not the backend).
    from dsjax.train import train_and_evaluate  # Heavy (jax, orbax): import after parsing.

    # Before anything starts the backend: XLA reads its flags once.
    overlap.apply_overlap_flags(overlap.detect_backend(), bool(config.parallel.overlap))

    return train_and_evaluate(config, FLAGS.workdir)

  summary = _run("dsjax-train", argv, train)
  parts = [f"{key}={summary[key]:.4f}" for key in ("test_accuracy", "eval_accuracy",
                                                   "test_loss") if key in summary]
  print(f"final ({summary['steps']} steps): {', '.join(parts)}")


def profile_main(argv: Sequence[str] | None = None) -> None:
  """Entry point of `dsjax-profile`: a short run, then `WORKDIR/profile.json` and a table."""

  def profile(config):
    from dsjax.profile import report  # Heavy: import after parsing.

    steps = FLAGS.steps or _PROFILE_STEPS
    result = report.run_profile(config, FLAGS.workdir, steps=steps, trace=FLAGS.trace)
    print(report.format_report(result))
    print(f"wrote {FLAGS.workdir}/profile.json" + (f" and {FLAGS.workdir}/trace"
                                                   if FLAGS.trace else ""))

  _run("dsjax-profile", argv, profile)


def search_main(argv: Sequence[str] | None = None) -> None:
  """Entry point of `dsjax-search`: search a DNAS config, write WORKDIR/architecture.json."""

  def search(config):
    from dsjax.nas.run import search_architecture  # Heavy: import after parsing.

    summary = search_architecture(config, FLAGS.workdir)
    print((Path(FLAGS.workdir) / "probabilities.txt").read_text().rstrip())
    print(f"derived: depth {summary['depth']}, {summary['params']:,} params, "
          f"{summary['flops']:,.0f} FLOPs per example; search took "
          f"{summary['search_time_s']:.0f} s"
          + (f" (resumed at step {summary['start_step']})" if summary.get("start_step") else ""))
    print(f"wrote {summary['architecture']}; retrain it with dsjax-train --config ... "
          f"--architecture {summary['architecture']}")

  _run("dsjax-search", argv, search)
