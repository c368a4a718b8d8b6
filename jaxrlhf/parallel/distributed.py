"""Multi-process start-up: call ``jax.distributed.initialize`` when, and only when, it is needed.

One process per host (TPU pods, multi-node GPU) must join the JAX distributed
system before anything touches a device. ``initialize_distributed`` does that:

- with an explicit coordinator (``coordinator_address``, ``num_processes``,
  ``process_id``: what a launcher passes on flags) it uses those;
- otherwise it looks at the environment: a SLURM job step with more than one
  task, or a multi-host TPU slice (``TPU_WORKER_HOSTNAMES`` /
  ``TPU_PROCESS_ADDRESSES`` listing several hosts, or a Megascale multislice
  coordinator), and lets JAX's own cluster detection fill in the details;
- ``force=True`` calls the auto-detecting ``jax.distributed.initialize()`` anyway:
  for TPU VMs started with ``gcloud ... ssh --worker=all``, whose shells carry no
  hint and where JAX asks the metadata server instead;
- a plain single-process run does nothing.

Multi-process on CPU (tests, laptops) needs gloo collectives, which are set
whenever a distributed system is started (the setting only affects the CPU backend).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

__all__ = ["detect_cluster", "initialize_distributed"]


def _count_hosts(value: str | None) -> int:
    return len([host for host in (value or "").split(",") if host.strip()])


def detect_cluster(env: Mapping[str, str]) -> str | None:
    """``"slurm"`` or ``"tpu"`` when ``env`` shows a multi-process job JAX can configure itself, else None."""
    slurm_keys = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    # The same variables JAX's SlurmCluster reads; one task is an ordinary single-process run.
    if all(key in env for key in slurm_keys) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    hosts = max(_count_hosts(env.get("TPU_WORKER_HOSTNAMES")), _count_hosts(env.get("TPU_PROCESS_ADDRESSES")))
    if hosts > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    force: bool = False,
    env: Mapping[str, str] | None = None,
) -> bool:
    """Start the JAX distributed system if this is a multi-process run; True if it is (now) running.

    Must run before the first JAX computation. Safe to call twice.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = (coordinator_address, num_processes, process_id)
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise ValueError(
                "explicit multi-process start needs coordinator_address, num_processes and process_id together, "
                f"got coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
                f"process_id={process_id!r}"
            )
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        )
        return True
    if force or detect_cluster(os.environ if env is None else env) is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()
        return True
    return False
