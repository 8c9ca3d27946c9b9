"""The run folder: created and checked before anything is written into it.

A folder that cannot be created, is not a folder, is read-only or sits on a full disk is
a user error with one clear message, found before any data loads or anything compiles.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from dsjax.errors import ConfigError

_FIX = "choose another --workdir"


def prepare_workdir(workdir: str | Path) -> Path:
  """Creates `workdir` (and its parents) if needed and checks that files can be written.

  Args:
    workdir: the run folder (`--workdir`).

  Returns:
    Its absolute path.

  Raises:
    ConfigError: it exists and is not a folder, cannot be created, or cannot be written
      (permissions, a read-only file system, no space left).
  """
  path = Path(workdir).expanduser().absolute()
  if path.exists() and not path.is_dir():
    raise ConfigError(f"--workdir {path} exists and is not a folder: {_FIX}")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise ConfigError(f"--workdir {path} cannot be created ({describe_os_error(error)}): "
                      f"{_FIX}") from error
  probe = path / f".dsjax-write-check-{uuid.uuid4().hex}"
  try:
    with probe.open("wb") as f:  # A byte written and flushed: a full disk shows here.
      f.write(b"0")
      f.flush()
      os.fsync(f.fileno())
  except OSError as error:
    raise ConfigError(f"--workdir {path} is not writable ({describe_os_error(error)}): "
                      f"{_FIX}") from error
  finally:
    probe.unlink(missing_ok=True)
  return path


def describe_os_error(error: OSError) -> str:
  """`strerror` with the errno's name, e.g. `No space left on device (ENOSPC)`."""
  name = errno.errorcode.get(error.errno or 0)
  text = error.strerror or str(error)
  return f"{text} ({name})" if name else text
