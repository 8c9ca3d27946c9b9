"""Command-line entry points: `dsjax-train` (also `python -m dsjax.train`),
`dsjax-profile` (also `python -m dsjax.profile`), `dsjax-search` (also
`python -m dsjax.nas`), `dsjax-export`, `dsjax-plot` and `dsjax-data` (also
`python -m dsjax.data`).

  dsjax-train --model cnn-digits --precision fp32 --batch-size 64 \\
      --gradient-accumulation 2 --steps 300 --workdir runs/digits
  dsjax-train --config configs/digits_cnn.py --config.optimizer.learning_rate=1e-3 \\
      --workdir runs/digits

The short flags are shorthands for config fields. Without `--config`, the model's own
experiment file from `configs/` (installed as `dsjax.configs`) is the starting point.
Each command takes only the flags that act in it (`--help` lists them) and refuses the
others. Every user error ends the process with one line on stderr and exit status 2,
never a traceback; a process of a multi-process run whose peer died ends with one line
and status 3 (`dsjax.parallel.watchdog`).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import re
import sys
import textwrap
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from dsjax import precision
from dsjax.errors import ConfigError, DsjaxError
from dsjax.models import registry
from dsjax.parallel import watchdog
from dsjax.train.workdir import describe_os_error

# The repository's `configs/`, which an installed package carries as `dsjax.configs`.
CONFIGS_DIR = Path(str(importlib.resources.files("dsjax.configs")))

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
_HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")
_RUN_FLAGS = ("config", "model", "precision", "batch-size", "gradient-accumulation", "steps",
              "seed", "workdir", "architecture", "init-from", "grad-compression", "mesh",
              "coordinator", "num-processes", "process-id")


@dataclasses.dataclass(frozen=True)
class Command:
  """What one entry point does and which flags act in it.

  Attributes:
    name: the program name, e.g. `dsjax-train`.
    summary: what it does, for `--help`.
    flags: the flags it takes; any other flag of `FLAGS` is refused.
    refused: why a flag it does not take cannot act there (the error names the reason).
    example: one command line, for `--help`.
    default_model: the model whose experiment file is used without --model or --config.
  """

  name: str
  summary: str
  flags: tuple[str, ...]
  refused: dict[str, str]
  example: str
  default_model: str = "cnn-digits"


_SEARCH_FIX = "retrain the searched architecture with it in dsjax-train"
TRAIN = Command(
    "dsjax-train", "Trains a registered model and evaluates it; writes checkpoints, "
    "metrics.jsonl, TensorBoard events, config.json and summary.json into --workdir. "
    "Rerunning on the same workdir resumes from its last checkpoint.",
    _RUN_FLAGS, {"trace": "a jax.profiler trace is taken by dsjax-profile"},
    "dsjax-train --model cnn-digits --precision mixed --steps 300 --workdir runs/digits")
PROFILE = Command(
    "dsjax-profile", "Runs a short training job (--steps, default 20) and reports the step "
    "time, its breakdown (compute, communication, data wait), FLOPs, MFU and memory; "
    "writes WORKDIR/profile.json, and with --trace a jax.profiler trace.",
    (*_RUN_FLAGS, "trace"), {},
    "dsjax-profile --model bert-tiny --mesh data=2,model=2 --steps 10 --workdir runs/prof")
SEARCH = Command(
    "dsjax-search", "Runs the differentiable architecture search (DNAS) of a dnas-* model: "
    "weights on train batches, architecture logits on validation batches; writes "
    "WORKDIR/architecture.json and probabilities.txt. Retrain the result with "
    "dsjax-train --architecture WORKDIR/architecture.json.",
    ("config", "model", "precision", "batch-size", "steps", "seed", "workdir", "mesh",
     "coordinator", "num-processes", "process-id"),
    {"gradient-accumulation": f"the search takes whole batches: {_SEARCH_FIX}",
     "grad-compression": f"the search step exchanges its gradients densely: {_SEARCH_FIX}",
     "init-from": "a search starts its supernet from scratch",
     "architecture": "it retrains a searched network: use dsjax-train",
     "trace": "a jax.profiler trace is taken by dsjax-profile"},
    "dsjax-search --model dnas-digits --mesh data=4 --precision mixed --workdir runs/search",
    "dnas-digits")
_METAVARS = {"config": "FILE[:variant]", "model": "NAME", "precision": "{fp32,bf16,fp16,mixed}",
             "workdir": "DIR", "architecture": "FILE", "init-from": "DIR",
             "grad-compression": "SPEC", "mesh": "AXIS=SIZE,...", "coordinator": "HOST:PORT"}
# dsjax-search's --steps is the search's own step count.
_SEARCH_SHORTHANDS = {"steps": "search.steps"}


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """Reads `--name=value` or `--name value` from raw argv (before absl parses it)."""
  for index, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and index + 1 < len(argv):
      return argv[index + 1]
  return None


def _with_default_config(argv: list[str], default_model: str = "cnn-digits") -> list[str]:
  """Adds `--config=<the model's experiment file>` when no --config was given."""
  config_arg = _flag_value(argv, "config")
  if config_arg is not None:
    name, colon, variant = config_arg.partition(":")
    path = _find_config_file(Path(name).expanduser())
    if path is None:
      raise ConfigError(f"config file {name} not found, neither here nor among dsjax's "
                        f"configs in {CONFIGS_DIR} (--config takes a path such as "
                        "configs/digits_cnn.py:tiny)")
    rest, skip = [], False
    for arg in argv[1:]:  # Every other flag, in order; `--config FILE` drops both parts.
      if not skip and arg != "--config" and not arg.startswith("--config="):
        rest.append(arg)
      skip = arg == "--config"
    return [argv[0], f"--config={path}{colon}{variant}", *rest]
  name = _flag_value(argv, "model") or default_model
  path = CONFIGS_DIR / registry.get_spec(name).config_file  # May end in ":ARG".
  if not path.with_name(path.name.split(":", 1)[0]).exists():
    raise ConfigError(f"the default config of model {name!r} is missing ({path}); "
                      "pass --config FILE")
  return [argv[0], f"--config={path}", *argv[1:]]


def _find_config_file(path: Path) -> Path | None:
  """An experiment file by its path, else among the installed configs (`digits_cnn.py`
  or `configs/digits_cnn.py` work from any folder once dsjax is installed)."""
  if path.is_file():
    return path
  if path.is_absolute():
    return None
  parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
  candidate = CONFIGS_DIR.joinpath(*parts) if parts else None
  return candidate if candidate is not None and candidate.is_file() else None


def _parse(command: Command, argv: list[str]):
  """Parses flags into the resolved config; user errors become ConfigError."""
  try:
    FLAGS(_with_default_config(argv, command.default_model))
    for name in FLAGS:  # `--config.a.b` overrides are flags of their own, named so.
      if FLAGS[name].present and name.split(".")[0] not in command.flags:
        reason = command.refused.get(name, "it has no effect there")
        raise ConfigError(f"{command.name} does not take --{name}: {reason}")
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
  shorthands = {**_SHORTHANDS, **(_SEARCH_SHORTHANDS if command is SEARCH else {})}
  for flag, field in shorthands.items():
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


def usage(command: Command, full: bool = False) -> str:
  """The `--help` text of a command: what it does, its flags with their meanings and
  defaults, the registered models, how configs and overrides work, and an example.

  Args:
    command: the entry point.
    full: also list absl's own flags (`--helpfull`).

  Returns:
    The text, ready to print.
  """
  wrap = lambda text, indent: textwrap.fill(  # noqa: E731
      " ".join(text.split()), 92, initial_indent=indent, subsequent_indent=indent)
  lines = [f"usage: {command.name} [--model NAME | --config FILE[:variant]] --workdir DIR "
           "[flags] [--config.a.b=value ...]", "", wrap(command.summary, ""), "", "flags:"]
  for name in command.flags:
    flag = FLAGS[name]
    meta = "" if flag.boolean else " " + _METAVARS.get(name, "N")
    lines.append(f"  --{name}{meta}")
    lines.append(wrap(f"{flag.help} (default: {_default_text(command, name)})", "      "))
  lines += ["", "models (--model NAME; its default experiment file in "
            f"{CONFIGS_DIR}):"]
  for name in registry.known_models():
    spec = registry.get_spec(name)
    if command is SEARCH and not spec.searchable:
      continue
    lines.append(f"  {name:<13} {spec.task:<15} data {spec.dataset:<14} "
                 f"config {spec.config_file}")
  lines += ["", "configs:", wrap(
      "--config FILE[:variant] loads an experiment file, a Python file whose get_config(arg) "
      "returns an ml_collections ConfigDict; the text after ':' is its argument, e.g. "
      "digits_cnn.py:tiny for the test-size variant. Any field can then be overridden "
      "with --config.section.field=value (e.g. --config.optimizer.learning_rate=3e-4, "
      "--config.model.features='(16,32)'); an unknown key is an error that names it. "
      "The short flags above set the config fields named in their defaults.", "  "),
            "", "example:", f"  {command.example}"]
  if full:
    lines += ["", "all flags (absl):", FLAGS.get_help()]
  return "\n".join(lines) + "\n"


def _default_text(command: Command, name: str) -> str:
  """What a flag's default is, in words: most short flags leave the config's field."""
  fields = {**_SHORTHANDS, **(_SEARCH_SHORTHANDS if command is SEARCH else {}),
            "architecture": "model.architecture", "mesh": "mesh.*"}
  if command is PROFILE and name == "steps":
    return f"{_PROFILE_STEPS} profiled steps"
  if name in fields:
    return f"the config's {fields[name]}"
  return {"model": f"{command.default_model}, or the config file's model.name",
          "config": "the model's own experiment file",
          "workdir": "none, it is required"}.get(name, str(FLAGS[name].default))


def _help_requested(argv: Sequence[str]) -> str | None:
  """The help flag in argv (before a `--` terminator), if any."""
  for arg in argv[1:]:
    if arg == "--":
      return None
    if arg in _HELP_FLAGS or arg.startswith("--helpfull="):
      return arg
  return None


def _run(command: Command, argv: Sequence[str] | None, action):
  """Parses flags, runs `action(config)`, and turns user errors into one line + exit 2.
  `-h`/`--help` prints the usage and exits 0."""
  argv = list(sys.argv if argv is None else argv)
  help_flag = _help_requested(argv)
  if help_flag is not None:
    print(usage(command, full=help_flag.startswith("--helpfull")), end="")
    sys.exit(0)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("dsjax").setLevel(logging.INFO)
  watchdog.program = command.name
  # In a multi-process run, an error of a failed collective waits for the coordination
  # service's verdict: a peer that died ends this process with the watchdog's one line.
  try:
    return action(_parse(command, argv))
  except DsjaxError as error:
    watchdog.hold(error)
    message = " ".join(str(error).split())
  except KeyboardInterrupt:
    message = "interrupted; rerun the same command to resume from the last checkpoint"
  except OSError as error:  # A write that fails outside a checkpoint (a full disk, say).
    watchdog.hold(error)
    where = f" ({error.filename})" if error.filename else ""
    message = (f"{describe_os_error(error)}{where}; fix that (free space, permissions) and "
               "rerun the same command to resume from the last checkpoint")
  except Exception as error:
    watchdog.hold(error)
    raise
  print(f"{command.name}: error: {message}", file=sys.stderr)
  watchdog.exit_process(2)


def train_main(argv: Sequence[str] | None = None) -> None:
  """Entry point of `dsjax-train`."""

  def train(config):
    from dsjax.parallel import overlap  # noqa: PLC0415 - imports jax (not the backend).
    from dsjax.train import train_and_evaluate  # Heavy (jax, orbax): import after parsing.

    # Before anything starts the backend: XLA reads its flags once.
    overlap.apply_overlap_flags(overlap.detect_backend(), bool(config.parallel.overlap))

    return train_and_evaluate(config, FLAGS.workdir)

  summary = _run(TRAIN, argv, train)
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

  _run(PROFILE, argv, profile)


def search_main(argv: Sequence[str] | None = None) -> None:
  """Entry point of `dsjax-search`: search a DNAS config, write WORKDIR/architecture.json."""

  def search(config):
    from dsjax.train import search_architecture  # Heavy: import after parsing.

    summary = search_architecture(config, FLAGS.workdir)
    print((Path(FLAGS.workdir) / "probabilities.txt").read_text().rstrip())
    print(f"derived: depth {summary['depth']}, {summary['params']:,} params, "
          f"{summary['flops']:,.0f} FLOPs per example; search took "
          f"{summary['search_time_s']:.0f} s"
          + (f" (resumed at step {summary['start_step']})" if summary.get("start_step") else ""))
    print(f"wrote {summary['architecture']}; retrain it with dsjax-train --config ... "
          f"--architecture {summary['architecture']}")

  _run(SEARCH, argv, search)


PLOT_FLAGS = flags.FlagValues()
flags.DEFINE_string("out", None, "Folder for the PNGs (default: the first WORKDIR).",
                    flag_values=PLOT_FLAGS)
_PLOT_USAGE = """usage: dsjax-plot WORKDIR [WORKDIR ...] [--out DIR]

Draws the runs' metrics.jsonl as PNGs with matplotlib: train and eval curves (several
workdirs overlaid to compare runs), learning rate, loss scale and skipped steps, the
per-layer precision plan (promoted layers, fp16 FLOP share), throughput and MFU, and the
architecture probabilities of a dsjax-search run. Kinds a run has no data for are skipped.
Python: dsjax.plots.write_plots(workdirs, out_dir); a run draws its own at the end with
--config.logging.plots=True.

flags:
  --out DIR
      Folder for the PNGs (default: the first WORKDIR)

example:
  dsjax-plot runs/fp32 runs/mixed --out runs/compare
"""


def plot_main(argv: Sequence[str] | None = None) -> None:
  """Entry point of `dsjax-plot`: PNG plots of one or more workdirs."""
  argv = list(sys.argv if argv is None else argv)
  if _help_requested(argv) is not None:
    print(_PLOT_USAGE, end="")
    sys.exit(0)
  try:
    try:
      workdirs = PLOT_FLAGS(argv)[1:]
    except flags.Error as error:
      raise ConfigError(str(error)) from error
    if not workdirs:
      raise ConfigError("give at least one WORKDIR (a folder with metrics.jsonl); "
                        "see dsjax-plot --help")
    from dsjax import plots  # noqa: PLC0415 - imports matplotlib.

    written = plots.write_plots(workdirs, PLOT_FLAGS.out)
  except DsjaxError as error:
    print(f"dsjax-plot: error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(2)
  for path in written:
    print(f"wrote {path}")


EXPORT_FLAGS = flags.FlagValues()
flags.DEFINE_string("workdir", None, "The trained run's folder.", flag_values=EXPORT_FLAGS)
flags.DEFINE_string("format", "stablehlo,onnx", "Formats to write.", flag_values=EXPORT_FLAGS)
flags.DEFINE_string("out", None, "Output folder.", flag_values=EXPORT_FLAGS)
flags.DEFINE_bool("int8", False, "Also an int8 ONNX model.", flag_values=EXPORT_FLAGS)
flags.DEFINE_integer("max-test-examples", None, "Test examples scored per runtime.",
                     flag_values=EXPORT_FLAGS)
_EXPORT_USAGE = """usage: dsjax-export --workdir DIR [--format stablehlo,onnx] [--out DIR] [--int8]

Exports the newest checkpoint of a trained run (any registered model, a retrained DNAS
network included) for inference: StableHLO through jax.export and ONNX through jax2onnx,
both with a symbolic batch dimension, and with --int8 a post-training static int8 ONNX
model (onnxruntime, QDQ, per-channel weights, calibrated on training batches). Each file is
reloaded and checked against dsjax on a test batch; OUT/export.json records the files and
sizes, the largest difference from dsjax, the test metrics and the CPU latency per
example in each runtime (onnxruntime with 1 thread and with all). ONNX and int8 need the
export extra: pip install 'dsjax[export]'. Python: dsjax.export.export(workdir, ...).

flags:
  --workdir DIR
      The trained run's folder, as given to dsjax-train (default: none, it is required)
  --format FORMATS
      Comma-separated formats: stablehlo, onnx (default: stablehlo,onnx)
  --out DIR
      Where the files and export.json go (default: WORKDIR/export)
  --int8
      Also write model.int8.onnx; needs onnx among the formats (default: False)
  --max-test-examples N
      Score only the first N test examples in each runtime (default: all)

example:
  dsjax-export --workdir runs/digits --int8
"""


def export_main(argv: Sequence[str] | None = None) -> None:
  """Entry point of `dsjax-export`: a trained run as StableHLO/ONNX (and int8) files."""
  argv = list(sys.argv if argv is None else argv)
  if _help_requested(argv) is not None:
    print(_EXPORT_USAGE, end="")
    sys.exit(0)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  try:
    try:
      extra = EXPORT_FLAGS(argv)[1:]
    except flags.Error as error:
      raise ConfigError(str(error)) from error
    if extra:
      raise ConfigError(f"unexpected argument {extra[0]!r}; see dsjax-export --help")
    if not EXPORT_FLAGS.workdir:
      raise ConfigError("--workdir is required: the folder of a trained run")
    from dsjax import export  # noqa: PLC0415 - imports jax (and the converters).

    report = export.export(EXPORT_FLAGS.workdir, export.parse_formats(EXPORT_FLAGS.format),
                           EXPORT_FLAGS.out, EXPORT_FLAGS.int8,
                           max_test_examples=EXPORT_FLAGS["max-test-examples"].value)
  except DsjaxError as error:
    print(f"dsjax-export: error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(2)
  out = Path(EXPORT_FLAGS.out or Path(report["workdir"]) / "export").absolute()
  print(f"{report['model']} step {report['step']}: wrote {out} (export.json)")
  for name, entry in report["formats"].items():
    files = ", ".join(f"{file} {size / 1024:,.1f} KB" for file, size in entry["files"].items())
    metrics = ", ".join(f"{key} {value:.4f}" for key, value in entry["test"].items()
                        if isinstance(value, float))
    print(f"  {name:<10} {files}; max |diff| from dsjax {entry['max_abs_diff']:.2e}; "
          f"test {metrics}")


DATA_FLAGS = flags.FlagValues()
flags.DEFINE_multi_string("input", None, "Input glob, file or folder (repeatable).",
                          flag_values=DATA_FLAGS)
flags.DEFINE_string("out", None, "Output folder.", flag_values=DATA_FLAGS)
flags.DEFINE_integer("vocab-size", None, "WordPiece vocabulary to train.", flag_values=DATA_FLAGS)
flags.DEFINE_string("vocab-file", None, "Pretrained vocab.txt to use.", flag_values=DATA_FLAGS)
flags.DEFINE_float("vocab-sample-mb", None, "MB of documents to train the vocabulary on.",
                   flag_values=DATA_FLAGS)
flags.DEFINE_integer("workers", 1, "Tokenizing processes.", flag_values=DATA_FLAGS)
flags.DEFINE_integer("shard-tokens", None, "Tokens per shard.", flag_values=DATA_FLAGS)
_DATA_USAGE = """usage: dsjax-data prepare-text --input GLOB --out PREP
           [--vocab-size N | --vocab-file FILE] [--vocab-sample-mb M] [--workers K]
           [--shard-tokens T]

prepare-text tokenizes a text corpus once, so that training reads token shards instead of
re-tokenizing at every start: --config.data.name=text --config.data.data_dir=PREP gives
the same sequences and splits as the documents in memory. It trains the lowercasing BERT
WordPiece tokenizer of data.name=text on the corpus, streaming (or uses --vocab-file),
tokenizes in --workers processes, and writes PREP/shard-*.tokens.bin (uint16 or uint32
ids), shard-*.offsets.npy (document starts), vocab.txt, tokenizer.json and, last,
manifest.json (counts, sha256 of every file, format version). Rerunning the same command
skips finished shards and redoes missing or damaged ones. Python:
dsjax.data.prepare.prepare_text(inputs, out, ...).

flags:
  --input GLOB
      A glob (quote it; ** is recursive), file or folder of .txt (blank-line-separated
      paragraphs are documents), .jsonl (field "text", one document per line), .parquet
      (column "text") or a Hugging Face datasets save_to_disk folder; repeatable.
      Parquet and datasets folders need pyarrow: pip install 'dsjax[data]'
  --out PREP
      The output folder: new, empty, or one this command wrote from the same inputs
  --vocab-size N
      Vocabulary to train, special tokens included (default: 8192)
  --vocab-file FILE
      A pretrained BERT vocab.txt instead of training one
  --vocab-sample-mb M
      Train the vocabulary on every k-th document, k the smallest that brings the inputs
      under M MB; 0 trains on every document (default: 256)
  --workers K
      Tokenizing processes (default: 1)
  --shard-tokens T
      A shard ends with the document that takes it to T tokens (default: 67108864)

example:
  dsjax-data prepare-text --input 'corpus/**/*.txt' --out prep --vocab-size 30522 --workers 8
"""


def data_main(argv: Sequence[str] | None = None) -> None:
  """Entry point of `dsjax-data` (also `python -m dsjax.data`): `prepare-text`."""
  argv = list(sys.argv if argv is None else argv)
  if _help_requested(argv) is not None:
    print(_DATA_USAGE, end="")
    sys.exit(0)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  start = time.perf_counter()
  try:
    DATA_FLAGS.unparse_flags()  # In-process callers (tests) parse more than once.
    try:
      rest = DATA_FLAGS(argv)[1:]
    except flags.Error as error:
      raise ConfigError(str(error)) from error
    if not rest or rest[0] != "prepare-text":
      raise ConfigError("give a command: dsjax-data prepare-text --input GLOB --out PREP; see "
                        "dsjax-data --help")
    if rest[1:]:
      raise ConfigError(f"unexpected argument {rest[1]!r}; quote the --input pattern so that "
                        "the shell passes it on unexpanded, or repeat --input per file")
    if not DATA_FLAGS.input:
      raise ConfigError("--input is required: a glob such as 'DIR/**/*.txt', a file or a folder")
    if not DATA_FLAGS.out:
      raise ConfigError("--out is required: the folder to write the prepared corpus to")
    from dsjax.data import prepare  # noqa: PLC0415 - imports the tokenizer and numpy.

    manifest_file = Path(DATA_FLAGS.out).expanduser() / "manifest.json"
    before = manifest_file.stat().st_mtime_ns if manifest_file.is_file() else None
    shard_tokens = DATA_FLAGS["shard-tokens"].value or prepare.DEFAULT_SHARD_TOKENS
    sample_mb = DATA_FLAGS["vocab-sample-mb"].value
    if sample_mb is not None and DATA_FLAGS["vocab-file"].value:
      raise ConfigError("--vocab-sample-mb sets what a vocabulary is trained on, and "
                        "--vocab-file trains none; drop one of them")
    sample_mb = prepare.DEFAULT_VOCAB_SAMPLE_MB if sample_mb is None else sample_mb
    manifest = prepare.prepare_text(
        DATA_FLAGS.input, DATA_FLAGS.out, vocab_size=DATA_FLAGS["vocab-size"].value,
        vocab_file=DATA_FLAGS["vocab-file"].value, workers=DATA_FLAGS.workers,
        vocab_sample_mb=sample_mb,
        shard_tokens=shard_tokens, progress=sys.stderr.isatty())
  except DsjaxError as error:
    message = " ".join(str(error).split())
  except KeyboardInterrupt:
    message = "interrupted; rerun the same command to continue (finished shards are kept)"
  except OSError as error:  # A full disk, say.
    where = f" ({error.filename})" if error.filename else ""
    message = f"{describe_os_error(error)}{where}; fix that and rerun the same command"
  else:
    message = None
  if message is not None:
    print(f"dsjax-data: error: {message}", file=sys.stderr)
    sys.exit(2)
  counts, vocabulary = manifest["counts"], manifest["vocabulary"]
  seconds = time.perf_counter() - start
  rate = ("already prepared; nothing to do" if before == manifest_file.stat().st_mtime_ns
          else f"{seconds:.1f} s, {counts['text_bytes'] / 1e6 / seconds:.2f} MB/s of text")
  print(f"{DATA_FLAGS.out}: {counts['documents']:,} documents, {counts['tokens']:,} tokens "
        f"({counts['text_bytes'] / 1e6:,.1f} MB of text) in {counts['shards']} "
        f"{manifest['token_dtype']} shard(s), vocabulary {vocabulary['vocab_size']:,}; {rate}")
  size = ("--config.data.vocab_file=" + str(Path(DATA_FLAGS.out) / vocabulary["file"])
          if vocabulary["source"] == "vocab_file"
          else f"--config.data.vocab_size={vocabulary['requested_size']}")
  print(f"train on it with --config.data.name=text --config.data.data_dir={DATA_FLAGS.out} "
        f"{size}")
