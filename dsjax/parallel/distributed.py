"""Multi-host start-up: `jax.distributed.initialize` from flags or the cluster environment.

  # Two processes on one machine (or one per host), then the same command on each:
  dsjax-train ... --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0
  dsjax-train ... --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 1

Without flags, JAX's own cluster detection fills them in on Slurm, Kubernetes (JobSet)
and Cloud TPU pods. Every process runs the same program over the same global mesh; each
loads only its rows of every batch, and only process 0 writes logs and summaries.

A process that dies ends the others too, within about `distributed.peer_timeout_s`
(JAX's heartbeat timeout), each with one line naming it (`dsjax.parallel.watchdog`);
rerunning the whole job resumes from the last complete checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

from dsjax.errors import ConfigError
from dsjax.parallel import watchdog

log = logging.getLogger(__name__)

# Environment variables that tell JAX's cluster detection it runs in a multi-host job.
_CLUSTER_ENV = ("SLURM_JOB_ID", "JOBSET_NAME", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS")


def initialize(distributed_config: Any) -> bool:
  """Joins the multi-process job the config (or the cluster environment) describes.

  Must run before anything touches a device. A config with `num_processes` 0 and no
  cluster environment is a single-process run: nothing happens.

  Args:
    distributed_config: the `distributed` config section (coordinator, num_processes,
      process_id, initialization_timeout, peer_timeout_s, cluster_detection).

  Returns:
    Whether this is a multi-process run.

  Raises:
    ConfigError: an incomplete or inconsistent set of flags, or a coordinator that
      cannot be reached in time.
  """
  cfg = distributed_config
  explicit = bool(cfg.coordinator) or cfg.num_processes > 0 or cfg.process_id >= 0
  detect = cfg.cluster_detection and any(var in os.environ for var in _CLUSTER_ENV)
  if not explicit and not detect:
    return False
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  peer_timeout = cfg.peer_timeout_s
  if not isinstance(peer_timeout, int) or isinstance(peer_timeout, bool) or peer_timeout < 1:
    raise ConfigError(f"distributed.peer_timeout_s must be a whole number of seconds >= 1, "
                      f"got {peer_timeout!r}")
  # A process silent for peer_timeout_s is declared dead by the coordination service.
  kwargs: dict[str, Any] = {"initialization_timeout": int(cfg.initialization_timeout),
                            "heartbeat_timeout_seconds": peer_timeout}
  if explicit:
    missing = [name for name, unset in (("--coordinator", not cfg.coordinator),
                                        ("--num-processes", cfg.num_processes < 1),
                                        ("--process-id", cfg.process_id < 0)) if unset]
    if missing:
      raise ConfigError(f"multi-process run needs --coordinator, --num-processes and "
                        f"--process-id together; missing {', '.join(missing)}")
    if cfg.process_id >= cfg.num_processes:
      raise ConfigError(f"--process-id {cfg.process_id} is not below --num-processes "
                        f"{cfg.num_processes}; number the processes 0..{cfg.num_processes - 1}")
    kwargs.update(coordinator_address=cfg.coordinator, num_processes=int(cfg.num_processes),
                  process_id=int(cfg.process_id))
  # Cross-process collectives of the CPU backend need an implementation; gloo ships with
  # jaxlib. Harmless for GPU/TPU runs (it configures the CPU client only).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as error:  # noqa: BLE001 - timeouts and refusals surface in many types.
    text = " ".join(str(error).split())[:300]
    raise ConfigError(f"jax.distributed.initialize failed ({type(error).__name__}: {text}); "
                      "check that --coordinator is reachable from every process and that all "
                      f"{cfg.num_processes or 'the'} processes were started") from error
  if jax.process_count() > 1:
    watchdog.install(jax.process_index(), jax.process_count(), peer_timeout)
  log.info("process %d of %d; %d local and %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def is_primary() -> bool:
  """Whether this process writes logs, summaries and other single-writer files."""
  return jax.process_index() == 0
