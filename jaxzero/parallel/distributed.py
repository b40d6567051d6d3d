"""Multi-host start-up through JAX's own multi-controller runtime, driven by the environment."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

# Explicit settings for clusters JAX does not detect by itself (a hand-rolled multi-node CUDA
# launch). TPU pods, SLURM and Open MPI are detected by jax.distributed.initialize() itself.
ENV_COORDINATOR = "JAXZERO_COORDINATOR"      # host:port of process 0
ENV_NUM_PROCESSES = "JAXZERO_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXZERO_PROCESS_ID"
ENV_LOCAL_DEVICES = "JAXZERO_LOCAL_DEVICE_IDS"  # optional, e.g. "0,1,2,3"
ENV_DISTRIBUTED = "JAXZERO_DISTRIBUTED"       # "1" forces auto-detection, "0" disables it

_initialized = False


def _auto_detectable() -> bool:
    return any(k in os.environ for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                                         "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID",
                                         "MEGASCALE_COORDINATOR_ADDRESS"))


def initialize() -> None:
    """Joins the multi-process run described by the environment; a no-op for one process.

    Must run before anything touches a device. Idempotent.
    """
    global _initialized
    if _initialized:
        return
    forced = os.environ.get(ENV_DISTRIBUTED)
    if forced == "0":
        return
    if ENV_COORDINATOR in os.environ:
        local = os.environ.get(ENV_LOCAL_DEVICES)
        jax.distributed.initialize(
            coordinator_address=os.environ[ENV_COORDINATOR],
            num_processes=int(os.environ[ENV_NUM_PROCESSES]),
            process_id=int(os.environ[ENV_PROCESS_ID]),
            local_device_ids=[int(i) for i in local.split(",")] if local else None)
    elif forced == "1" or (_auto_detectable() and _multi_host_hint()):
        jax.distributed.initialize()
    else:
        return
    _initialized = True
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def _multi_host_hint() -> bool:
    """True when the scheduler says there is more than one process (SLURM, MPI, TPU pods)."""
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if key in os.environ:
            return int(os.environ[key]) > 1
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def is_main_process() -> bool:
    """Process 0 writes logs, plots and HF exports; every process takes part in checkpoints."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across every process (a no-op for one): e.g. all look before process 0 writes."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
