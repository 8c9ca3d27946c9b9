"""Orbax checkpoints of the train state and the host-side state (data position, plan).

Writes are atomic: orbax writes each step into a temporary folder and renames it when
complete, so a run killed at any moment leaves only whole checkpoints behind (and the
partial folder, which is ignored and cleaned up). Restore never falls back silently: a
checkpoint that cannot be read raises a `CheckpointError` naming its folder, and nothing
in the folder is deleted or overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from dsjax.errors import CheckpointError

log = logging.getLogger(__name__)


class _DropWriterThreadTracebacks(logging.Filter):
  """Drops orbax's log of an exception in one of its writer threads: the same failure
  reaches `Checkpointer.save`/`wait` and is raised as one CheckpointError, so the log
  would only add tracebacks (and more, from its other threads, after the process ends)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "_SignalingThread.run() raised an exception" not in str(record.msg)


_WRITER_FILTER = _DropWriterThreadTracebacks()

class Checkpointer:
  """Saves and restores `(train_state, host_state)` pairs by step.

  The host state is a JSON-serialisable dict: the data iterator's position and the
  precision controller's plan.

  Args:
    directory: where step folders live (`<workdir>/checkpoints`).
    max_to_keep: how many recent checkpoints to keep.
    async_save: write in a background thread while training goes on.
    layout: how the state's arrays are laid out in memory when that differs from the
      saved layout, e.g. a circular pipeline's `dsjax.parallel.pipeline.CircularLayout`:
      an object with `to_scan(tree)`, `from_scan(tree)` and `scan_abstract(abstract)`.
      Checkpoints are written in the scan layout, so any run can restore them.
  """

  def __init__(self, directory: str | Path, *, max_to_keep: int, async_save: bool,
               layout: Any = None):
    self.directory = Path(directory).absolute()
    self._layout = layout
    self._conversions: dict[Any, Any] = {}  # Jitted layout conversions, one per shardings.
    if self.directory.exists() and not self.directory.is_dir():
      raise CheckpointError(f"checkpoint path {self.directory} exists and is not a folder: "
                            "move it aside or use a new --workdir")
    logging.getLogger("absl").addFilter(_WRITER_FILTER)  # Adding it twice keeps one.
    if jax.process_index() == 0:
      _remove_partial_steps(self.directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=("state", "host"))
    except Exception as error:  # noqa: BLE001 - any orbax failure is reported the same way.
      raise CheckpointError(f"cannot open checkpoints in {self.directory}: "
                            f"{_first_line(error)}") from error

  def latest_step(self) -> int | None:
    """Returns the newest complete checkpoint's step, or None if there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any, host_state: dict[str, Any]) -> None:
    """Saves the state at `step` (atomic; a step already saved is left as it is)."""
    if step in self._manager.all_steps():
      return
    if self._layout is not None:
      saved = self._layout.scan_abstract(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
      state = self._convert(self._layout.to_scan, state, saved)
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host_state)), force=True)
    except Exception as error:  # noqa: BLE001 - a disk or permission failure, in any layer.
      raise self._save_failed(step, error) from error

  def _settle(self) -> None:
    """Lets orbax's other writers of a failed save finish, quietly: the save's own error
    is the one reported. The array writes of that save still complete later, into the
    event loop the failure closed, and each would print an unraisable-exception traceback
    at exit; those alone are dropped."""
    try:
      self._manager.wait_until_finished()
    except Exception:  # noqa: BLE001, S110 - already reported by the save.
      pass
    previous_hook = sys.unraisablehook

    def hook(unraisable: Any) -> None:
      if not (isinstance(unraisable.exc_value, RuntimeError)
              and str(unraisable.exc_value) == "Event loop is closed"):
        previous_hook(unraisable)

    sys.unraisablehook = hook

  def _save_failed(self, step: int, error: BaseException) -> CheckpointError:
    """The error of a save that failed part-way: orbax renames a step folder only once it
    is complete, so the checkpoints before it are untouched; it says which one resumes."""
    self._settle()
    previous = [s for s in _complete_steps(self.directory) if s != step]
    kept = (f"the previous checkpoint, {self.directory / str(max(previous))}, is intact and "
            "restorable: free space (or fix the folder) and rerun the same command to resume "
            "from it" if previous else "there is no earlier checkpoint: free space (or fix "
            "the folder) and rerun the same command to start again")
    return CheckpointError(f"saving checkpoint {step} into {self.directory} failed "
                           f"({_first_line(_root_cause(error))}); {kept}")

  def restore(self, step: int, target: Any, *, aliases: Mapping[str, str] | None = None,
              fresh_if_missing: Sequence[str] = ()) -> tuple[Any, dict[str, Any]]:
    """Restores the checkpoint at `step` into the structure, shapes and dtypes of `target`.

    A field of the state that is None in `target` and absent from the checkpoint (one
    written before the field existed, e.g. `arch` of a train run) stays None.

    Args:
      step: a step from `latest_step()`.
      target: a train state (or its `jax.eval_shape`) the checkpoint must match.
      aliases: field -> the name an older checkpoint saved it under (read when the field
        itself is absent), e.g. `{"opt_state": "weight_opt_state"}`.
      fresh_if_missing: fields that take `target`'s values when the checkpoint has none.

    Returns:
      `(state, host_state)`.

    Raises:
      CheckpointError: the checkpoint is corrupt, incomplete or does not match `target`.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    saved = abstract if self._layout is None else self._layout.scan_abstract(abstract)
    folder = self.directory / str(step)
    metadata = self._saved_metadata(step)  # Read once: the form and the shape check use it.
    saved, rebuild = self._saved_form(step, metadata, saved, aliases or {}, fresh_if_missing)
    self._check_shapes(step, metadata, saved)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(saved), host=ocp.args.JsonRestore()))
      state, host_state = restored["state"], restored["host"]
      _check_match(state, saved)
      state = rebuild(state, target)
      if self._layout is not None:
        state = self._convert(self._layout.from_scan, state, abstract)
    except CheckpointError:
      raise
    except Exception as error:  # noqa: BLE001 - corrupt files fail in many different ways.
      raise CheckpointError(
          f"checkpoint {folder} cannot be restored ({_first_line(error)}); it is corrupt or "
          "was written by a different model/config. It was left untouched: move it aside to "
          "resume from an earlier checkpoint, or use a new --workdir") from error
    log.info("restored checkpoint %s", folder)
    return state, host_state

  def _saved_form(self, step: int, metadata: Any, abstract: Any, aliases: Mapping[str, str],
                  fresh: Sequence[str]) -> tuple[Any, Any]:
    """The restore target in the checkpoint's own top-level fields, and
    `rebuild(restored, target) -> state` back to `abstract`'s form.

    A state whose fields all appear in the checkpoint restores as it is.
    """
    names = set(metadata) if isinstance(metadata, Mapping) else None
    if names is None or not dataclasses.is_dataclass(abstract):
      return abstract, lambda restored, target: restored
    fields = [f.name for f in dataclasses.fields(abstract) if f.metadata.get("pytree_node", True)]
    if set(fields) == names:
      return abstract, lambda restored, target: restored
    form, sources, kept = {}, {}, []
    for name in fields:
      value = getattr(abstract, name)
      source = name if name in names else aliases.get(name)
      if source in names:
        form[source], sources[name] = value, source
      elif value is None or name in fresh:
        kept.append(name)
      else:
        raise CheckpointError(
            f"checkpoint {self.directory / str(step)} has no {name!r}: it was written by a "
            "different program (or version) than this run's. It was left untouched: use a "
            "new --workdir, or resume with the original command")

    def rebuild(restored: dict[str, Any], target: Any) -> Any:
      values = {name: restored[source] for name, source in sources.items()}
      values.update({name: getattr(target, name) for name in kept})
      return target.replace(**values)

    return form, rebuild

  def _saved_metadata(self, step: int) -> Any:
    """The saved state's metadata tree (None: unreadable; the restore then decides)."""
    absl_log = logging.getLogger("absl")  # Orbax warns about missing metadata files.
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
      saved = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
      saved = getattr(saved, "item_metadata", saved)
      return getattr(saved, "tree", saved)
    except Exception:  # noqa: BLE001 - no usable metadata: the restore decides.
      return None
    finally:
      absl_log.setLevel(level)

  def _convert(self, convert: Any, state: Any, target: Any) -> Any:
    """`convert(state)` under jit, into `target`'s shardings; compiled once per layout of
    the state and shardings, not at every save."""
    shardings = jax.tree.map(lambda x: x.sharding, target)
    key = (convert, jax.tree.structure(state), tuple(jax.tree.leaves(shardings)))
    if key not in self._conversions:
      self._conversions[key] = jax.jit(convert, out_shardings=shardings)
    return self._conversions[key](state)

  def _check_shapes(self, step: int, tree: Any, abstract: Any) -> None:
    """Refuses a checkpoint whose array shapes differ from `abstract`'s, from its metadata.

    Checked before reading any array: a restore that fails half-way leaves orbax's other
    reads pending. Compares the multisets of shapes (structure and dtypes are checked by
    the restore itself); unreadable metadata (`tree` None) is left to the restore.
    """
    if tree is None:
      return
    try:
      leaves = jax.tree.leaves(tree)
      saved_shapes = sorted(tuple(leaf.shape) for leaf in leaves)
    except Exception:  # noqa: BLE001 - no usable metadata: the restore decides.
      return
    if leaves and saved_shapes != sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(abstract)):
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} cannot be restored: its arrays have "
          "other shapes than this run's model and optimizer (it was written by a different "
          "config). It was left untouched: use a new --workdir, or resume with the original "
          "config")

  def wait(self) -> None:
    """Blocks until any background save is on disk.

    Raises:
      CheckpointError: the background save failed (see `save`).
    """
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001 - as in `save`.
      raise self._save_failed(self._manager.latest_step() or -1, error) from error

  def close(self) -> None:
    self._manager.close()


def _check_match(state: Any, abstract: Any) -> None:
  """Raises if restored arrays differ in shape or dtype from what the model expects."""
  got = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  want = jax.tree.map(lambda x: (x.shape, x.dtype), abstract)
  if got != want:
    raise CheckpointError(
        "checkpoint arrays do not match the model (shapes or dtypes differ): the workdir "
        "holds a run of a different config; use a new --workdir")


def _complete_steps(directory: Path) -> list[int]:
  """The steps whose folders are complete on disk (orbax's temporary ones are not)."""
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _remove_partial_steps(directory: Path, *, attempts: int = 50) -> None:
  """Deletes the temporary folders of saves that never completed, before orbax opens the
  folder (orbax would too, but in one pass). A save that failed earlier in this process
  may still have array writes landing in its folder for a moment; one pass can then meet
  a file that appears as its folder is removed (ENOTEMPTY), so this retries until the
  folders stay gone."""
  for _ in range(attempts):
    partial = ([p for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name]
               if directory.is_dir() else [])
    if not partial:
      return
    for path in partial:
      shutil.rmtree(path, ignore_errors=True)
    time.sleep(0.05)
  raise CheckpointError(f"cannot remove the partial checkpoint folders {partial}: something "
                        "keeps writing into them; stop the other run using this --workdir")


def _root_cause(error: BaseException) -> BaseException:
  """The innermost cause: orbax wraps an OSError from a write in its own errors."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return error


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _differs(saved: Any, current: Any, default: Any) -> bool:
  """Whether a saved config value differs from the current one, a key missing from the
  saved side counting as equal where the current value is the default."""
  if not (isinstance(saved, dict) and isinstance(current, dict)):
    return saved != current
  default = default if isinstance(default, dict) else {}
  for key in saved.keys() | current.keys():
    if key not in saved and key in current and key in default:
      if current[key] != default[key]:
        return True
    elif key not in saved or key not in current:
      return True
    elif _differs(saved[key], current[key], default.get(key)):
      return True
  return False


def check_resumable(workdir: Path, config: Any, sections: Sequence[str], *,
                    ignore: Mapping[str, Sequence[str]] | None = None,
                    defaults: Any = None) -> dict[str, Any] | None:
  """Refuses to resume a workdir whose saved config differs in a resume-invariant section.

  Args:
    workdir: the run folder, holding the `config.json` of the run that checkpointed.
    config: this invocation's ConfigDict.
    sections: top-level config keys that must be unchanged (they give the checkpointed
      arrays, the data positions and the objective their meaning).
    ignore: keys inside those sections that may change, e.g. `{"search": ["steps"]}`.
    defaults: the config schema's defaults (a ConfigDict): a key the saved config lacks
      (a field added to dsjax since that run) is unchanged while this run leaves it at
      its default.

  Returns:
    The saved config (for warnings about changed lengths), or None if there is none.

  Raises:
    CheckpointError: config.json is unreadable, or a section changed.
  """
  saved_path = workdir / "config.json"
  if not saved_path.exists():
    return None  # The restore still refuses arrays of other shapes.
  try:
    saved = json.loads(saved_path.read_text())
  except json.JSONDecodeError as error:
    raise CheckpointError(f"{saved_path} is not valid JSON ({error}); move the workdir "
                          "aside or use a new --workdir") from error
  current = json.loads(config.to_json())
  default = json.loads(defaults.to_json()) if defaults is not None else {}

  def section(tree: dict[str, Any], key: str) -> Any:
    value = tree.get(key)
    if isinstance(value, dict) and ignore and key in ignore:
      value = {k: v for k, v in value.items() if k not in ignore[key]}
    return value

  changed = [key for key in sections
             if _differs(section(saved, key), section(current, key), default.get(key))]
  if changed:
    raise CheckpointError(
        f"workdir {workdir} holds checkpoints of a run with different {', '.join(changed)} "
        "settings; resuming would mix two experiments. Use a new --workdir, or restore the "
        f"original settings (see {saved_path})")
  return saved
