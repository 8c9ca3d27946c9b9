"""When a process of a multi-process run dies, the others end with one clear line.

A `jax.distributed` job cannot go on without any of its processes: the next collective
waits for the one that is gone, and with NCCL (or gloo, when its host vanished without
closing its sockets) it waits for ever (jax#22740, #38503). JAX's coordination service
notices the silence: a process whose heartbeats stop for `heartbeat_timeout_seconds`
(`distributed.peer_timeout_s`, passed on by `dsjax.parallel.distributed`) is declared
dead, and the client in every other process then ends its process with a fatal log:
several screens of gRPC status and C++ stack frames, at once on a worker whose
coordinator (process 0, which hosts the service) died. The client's own hook for that
moment, `missed_heartbeat_callback`, cannot be used from Python in jaxlib 0.10: the
status it passes has no Python form (the process aborts with std::bad_cast).

So the watchdog reads what native code writes to stderr: file descriptor 2 goes through
a pipe that one thread forwards to the real stderr, holding back the coordination
service's error records. When the client's fatal record arrives, the thread names the
process that stopped, writes one line, and ends this process with `EXIT_STATUS` before
the client's abort does. Python's `sys.stderr` keeps writing to the real stderr directly
(a progress bar keeps its terminal; a last error line never waits on the thread).

A collective can fail in the main thread first (gloo: "Connection reset by peer", the
moment a local peer is killed). `hold(error)` keeps such an error back until the
service's verdict, so that the user reads why, not a gloo traceback.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import re
import select
import sys
import threading
import time
from typing import Any, NoReturn

# Exit status of a process whose peer stopped (the CLI's user errors exit with 2).
EXIT_STATUS = 3
# Program name for the error line; the CLI sets its own.
program = "dsjax"

# An absl log record's first line: severity, date, time, thread, file:line.
_RECORD = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ (?P<file>[\w.]+):\d+\] ")
_COORDINATION = re.compile(rb"coordination|preemption|^client\.(h|cc)$|grpc")
_FATAL = b"Terminating process because the JAX distributed service detected fatal errors"
# How long held-back coordination records wait for the fatal one before they are shown.
_CAPTURE_S = 5.0
# How long process 0 waits before it ends after an error of its own.
_LINGER_S = 1.0
# Errors of a collective or of the coordination service (lower case).
_PEER_FAILURE = ("gloo", "nccl", "connection reset", "connection closed", "socket closed",
                 "broken pipe", "unavailable", "deadline exceeded", "deadline_exceeded",
                 "barrier", "coordination service", "heartbeat")


@dataclasses.dataclass
class _Watch:
  process_id: int
  num_processes: int
  timeout_s: float
  real_fd: int
  read_fd: int
  stderr: Any
  thread: threading.Thread | None = None


_watch: _Watch | None = None


def install(process_id: int, num_processes: int, timeout_s: float) -> None:
  """Starts watching for the coordination service's verdict that a peer stopped.

  Call once, right after `jax.distributed.initialize` (with `heartbeat_timeout_seconds`
  set to `timeout_s`); a second call does nothing.

  Args:
    process_id: this process's index.
    num_processes: processes in the job.
    timeout_s: the heartbeat timeout: a peer silent that long is declared dead.
  """
  global _watch
  if _watch is not None:
    return
  sys.stderr.flush()
  real_fd = os.dup(2)
  read_fd, write_fd = os.pipe()
  os.dup2(write_fd, 2)
  os.close(write_fd)
  stderr = sys.stderr
  sys.stderr = open(real_fd, "w", buffering=1, encoding=getattr(stderr, "encoding", None),  # noqa: SIM115
                    errors="backslashreplace", closefd=False)
  _watch = _Watch(process_id, num_processes, timeout_s, real_fd, read_fd, stderr)
  _watch.thread = threading.Thread(target=_forward, args=(_watch,), name="dsjax-watchdog",
                                   daemon=True)
  _watch.thread.start()
  atexit.register(_uninstall)


def _uninstall() -> None:
  """At exit: native writes go straight to stderr again, after what is in the pipe."""
  global _watch
  watch, _watch = _watch, None
  if watch is None:
    return
  sys.stderr.flush()
  os.dup2(watch.real_fd, 2)  # Closes the pipe's last write end: the thread reads to EOF.
  if watch.thread is not None:
    watch.thread.join(timeout=2.0)
  sys.stderr = watch.stderr


def hold(error: BaseException) -> None:
  """Keeps back an error that a dead peer may have caused until the service decides.

  In a watched run, an error whose text (or cause's) is that of a failed collective or
  coordination call waits up to twice the heartbeat timeout: if a peer stopped, the
  watchdog ends the process with its line meanwhile; otherwise this returns and the
  caller reports the error as usual. Any other error returns at once.

  Args:
    error: the exception the caller is about to report.
  """
  watch = _watch
  if watch is None or not _is_peer_failure(error):
    return
  time.sleep(2 * watch.timeout_s + 10)


def exit_process(status: int) -> NoReturn:
  """Ends the process after its own error line, with `status`.

  In a watched run this skips JAX's shutdown barrier, which would keep a process that
  failed alone waiting for peers that still train (up to JAX's shutdown timeout, then a
  fatal log); the peers end within the peer timeout, naming it. Process 0 (whose exit
  takes the coordination service along) waits a moment first, so that peers failing alike
  print their own error rather than that process 0 stopped.

  Args:
    status: the exit status.
  """
  watch = _watch
  if watch is None:
    sys.exit(status)
  if watch.process_id == 0:
    time.sleep(_LINGER_S)
  sys.stdout.flush()
  _uninstall()
  os._exit(status)


def _is_peer_failure(error: BaseException | None) -> bool:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    text = f"{type(error).__name__} {error}".lower()
    if any(marker in text for marker in _PEER_FAILURE):
      return True
    error = error.__cause__ or error.__context__
  return False


def _forward(watch: _Watch) -> None:
  """The thread: forwards the pipe to stderr and acts on the client's fatal record."""
  pending = b""  # A line not yet complete.
  held: list[bytes] = []  # Coordination records (and what follows them), held back.
  held_since, fatal = None, False
  while True:
    ready, _, _ = select.select([watch.read_fd], [], [], 0.05)
    now = time.monotonic()
    if ready:
      chunk = os.read(watch.read_fd, 65536)
      if not chunk:
        break
      *lines, pending = (pending + chunk).split(b"\n")
      for line in lines:
        line += b"\n"
        record = _RECORD.match(line)
        if held_since is None and record and line[:1] in b"WEF" and (
            _COORDINATION.search(record.group("file")) or _FATAL in line):
          held_since = now
        if held_since is None:
          _write(watch.real_fd, line)
          continue
        held.append(line)
        fatal = fatal or _FATAL in line
      if fatal or _FATAL in pending:  # One write: its status (naming who stopped) with it.
        _stop(watch, b"".join(held) + pending)
    elif pending and held_since is None:
      _write(watch.real_fd, pending)  # A partial line that stays partial.
      pending = b""
    if held_since is not None and now - held_since > _CAPTURE_S:
      _write(watch.real_fd, b"".join(held))  # Not the end of the process: show them.
      held, held_since = [], None
  _write(watch.real_fd, b"".join(held) + pending)


def _stop(watch: _Watch, record: bytes) -> None:
  """Writes the one line that says which process stopped, and ends this process."""
  stopped = stopped_processes(record.decode("utf-8", "replace"), watch.process_id)
  _write(watch.real_fd, (message(stopped, watch.process_id, watch.num_processes) + "\n")
         .encode())
  os._exit(EXIT_STATUS)


def stopped_processes(status: str, process_id: int) -> list[int]:
  """The processes a coordination-service error says stopped (other than this one).

  Args:
    status: the text of the client's fatal record (and the records before it).
    process_id: this process's index.

  Returns:
    Their indices, sorted; empty when the text names none.
  """
  found: set[int] = set()
  for match in re.finditer(r"stopped sending heartbeats\):\s*([\d,\s]+)", status):
    found.update(int(index) for index in re.findall(r"\d+", match.group(1)))
  found.update(int(index) for index in re.findall(r"Task (\d+) heartbeat timeout", status))
  if not found and re.search(r"leader task|Failed to send RPC to coordination service", status):
    found.add(0)  # Process 0 hosts the coordination service.
  found.discard(process_id)
  return sorted(found)


def message(stopped: list[int], process_id: int, num_processes: int) -> str:
  """The one error line of a process whose peers `stopped`."""
  if stopped:
    names = ", ".join(str(index) for index in stopped)
    who = (f"process {names} of {num_processes}" if len(stopped) == 1
           else f"processes {names} of {num_processes}")
    if 0 in stopped:
      who += " (the coordinator)"
  else:
    who = f"another process of this {num_processes}-process run"
  return (f"{program}: error: {who} stopped responding: killed, crashed, or its host or "
          f"network went down (its own log says which). Process {process_id} cannot go on "
          "without it and exits. Rerun the whole job (every process, the same command) to "
          "resume from the last complete checkpoint")


def _write(fd: int, data: bytes) -> None:
  while data:
    try:
      data = data[os.write(fd, data):]
    except OSError:
      return
