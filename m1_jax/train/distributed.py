"""Multi-host start-up: call `jax.distributed.initialize()` when launched as one of several processes.

Must run before anything touches a jax backend (jax.devices(), any array). With no arguments jax finds
the coordinator itself on TPU pods (from the TPU metadata) and under SLURM (from SLURM_* variables),
or from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID when set.
"""

from __future__ import annotations

import os
from typing import Mapping

from absl import logging

MODES = ("auto", "on", "off")


def multi_host_reason(env: Mapping[str, str] | None = None) -> str | None:
    """Why the environment looks like a multi-process launch, or None if it looks like a single host."""
    env = os.environ if env is None else env

    def count(name):
        try:
            return int(env.get(name, "1") or "1")
        except ValueError:
            return 1

    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS is set"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return f"TPU_WORKER_HOSTNAMES lists {len(hosts)} TPU workers"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "MEGASCALE_COORDINATOR_ADDRESS is set (multi-slice TPU)"
    if count("SLURM_NTASKS") > 1 or count("SLURM_NPROCS") > 1:
        return f"SLURM_NTASKS={env.get('SLURM_NTASKS', env.get('SLURM_NPROCS'))}"
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return f"OMPI_COMM_WORLD_SIZE={env['OMPI_COMM_WORLD_SIZE']}"
    return None


def should_initialize(mode: str, env: Mapping[str, str] | None = None) -> bool:
    if mode not in MODES:
        raise ValueError(f"--distributed must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return False
    return mode == "on" or multi_host_reason(env) is not None


def maybe_initialize(mode: str = "auto") -> bool:
    """Initialises the multi-host runtime if `mode` (auto|on|off) says so; returns whether it did."""
    if not should_initialize(mode):
        return False
    import jax  # noqa: PLC0415  (imported late so this module stays importable before XLA_FLAGS are set)

    logging.info("jax.distributed.initialize() (%s)", multi_host_reason() or "--distributed=on")
    jax.distributed.initialize()
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True
