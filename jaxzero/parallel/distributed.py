"""Multi-host start-up through JAX's own multi-controller runtime, driven by the environment;
the per-step stop agreement; and naming the processes a run lost."""

from __future__ import annotations

import logging
import os
import threading

import jax
import numpy as np

from jaxzero.errors import JaxzeroError, PeerLostError

log = logging.getLogger(__name__)

# Explicit settings for clusters JAX does not detect by itself (a hand-rolled multi-node CUDA
# launch). TPU pods, SLURM and Open MPI are detected by jax.distributed.initialize() itself.
ENV_COORDINATOR = "JAXZERO_COORDINATOR"      # host:port of process 0
ENV_NUM_PROCESSES = "JAXZERO_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXZERO_PROCESS_ID"
ENV_LOCAL_DEVICES = "JAXZERO_LOCAL_DEVICE_IDS"  # optional, e.g. "0,1,2,3"
ENV_DISTRIBUTED = "JAXZERO_DISTRIBUTED"       # "1" forces auto-detection, "0" disables it

# Exit status of a process whose peer was lost: its state cannot be saved, and JAX's own
# shutdown barrier would wait for the lost peer and then abort.
EXIT_PEER_LOST = 3

_initialized = False
_peer_timeout_s: int | None = None


def _auto_detectable() -> bool:
    return any(k in os.environ for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                                         "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID",
                                         "MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(peer_timeout_s: int = 100) -> None:
    """Joins the multi-process run described by the environment; a no-op for one process.

    `peer_timeout_s` bounds how long a dead peer goes unnoticed: JAX's coordination service
    marks a process lost after that long without a heartbeat, and the exit barrier waits no
    longer for it. Must run before anything touches a device. Idempotent.
    """
    global _initialized, _peer_timeout_s
    if _initialized:
        return
    if peer_timeout_s < 1:
        raise ValueError(f"peer_timeout_s must be at least 1, got {peer_timeout_s}")
    forced = os.environ.get(ENV_DISTRIBUTED)
    if forced == "0":
        return
    timeouts = dict(heartbeat_timeout_seconds=peer_timeout_s,
                    shutdown_timeout_seconds=peer_timeout_s)
    if ENV_COORDINATOR in os.environ:
        local = os.environ.get(ENV_LOCAL_DEVICES)
        jax.distributed.initialize(
            coordinator_address=os.environ[ENV_COORDINATOR],
            num_processes=int(os.environ[ENV_NUM_PROCESSES]),
            process_id=int(os.environ[ENV_PROCESS_ID]),
            local_device_ids=[int(i) for i in local.split(",")] if local else None,
            **timeouts)
    elif forced == "1" or (_auto_detectable() and _multi_host_hint()):
        jax.distributed.initialize(**timeouts)
    else:
        return
    _initialized, _peer_timeout_s = True, peer_timeout_s
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def _multi_host_hint() -> bool:
    """True when the scheduler says there is more than one process (SLURM, MPI, TPU pods)."""
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if key in os.environ:
            return int(os.environ[key]) > 1
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def launched_processes() -> int | None:
    """How many processes the environment says this launch has (None: it does not say), as
    `initialize` reads it; JAXZERO_DISTRIBUTED=0 counts as one."""
    if os.environ.get(ENV_DISTRIBUTED) == "0":
        return 1
    if ENV_NUM_PROCESSES in os.environ:
        return int(os.environ[ENV_NUM_PROCESSES])
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if key in os.environ:
            return int(os.environ[key])
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return len(hosts) or None


def require_one_process(command: str) -> None:
    """Refuses to run `command` as one of several processes: it never joins the others, so
    each would work alone on its own devices (and a TPU pod's workers would wait on each
    other). Says how to run it on one."""
    count = launched_processes()
    if count is not None and count > 1:
        raise JaxzeroError(
            f"jaxzero {command} runs on one process, but this launch has {count} (from "
            f"{ENV_NUM_PROCESSES}, SLURM_NTASKS, OMPI_COMM_WORLD_SIZE or TPU_WORKER_HOSTNAMES). "
            "Run it on one host: without the multi-process launcher (e.g. `srun --ntasks=1`, "
            "or one TPU VM's own shell), or set JAXZERO_DISTRIBUTED=0 for a process that "
            "may use its local devices alone")


def is_main_process() -> bool:
    """Process 0 writes logs, plots and HF exports; every process takes part in checkpoints."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across every process (a no-op for one): e.g. all look before process 0 writes."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------- agreement

def agree_max(values: list[float]) -> list[float]:
    """Each value's maximum over the processes, by one small all-gather: every process gets
    the same answer, so decisions made from it agree. A no-op for one process."""
    if jax.process_count() == 1:
        return list(values)
    from jax.experimental import multihost_utils
    every = multihost_utils.process_allgather(np.asarray(values, np.float32))
    return [float(v) for v in np.asarray(every).reshape(-1, len(values)).max(axis=0)]


def agree_stop(asked: bool) -> bool:
    """Whether any process was asked to stop: one collective, called after every step, so
    all processes finish the same step."""
    return agree_max([float(asked)])[0] > 0


# ---------------------------------------------------------------------------- lost peers

def lost_processes() -> list[int] | None:
    """The processes JAX's coordination service no longer counts alive, once it has decided
    (within the peer timeout); None when it cannot tell: the coordinator itself (process 0)
    is gone, or it did not answer within the timeout (no process is lost: the error that led
    here was something else)."""
    if jax.process_count() == 1 or _peer_timeout_s is None:
        return None
    from jax._src import distributed as jax_distributed  # the only handle on the live set
    client = jax_distributed.global_state.client
    everyone = list(range(jax.process_count()))
    answer: dict = {}

    def ask():
        try:
            answer["live"] = client.get_live_nodes(everyone)
        except Exception as err:  # the coordination service is gone with process 0
            answer["error"] = err

    # get_live_nodes waits for every live process to ask; a process that is alive but not
    # asking (this error was not a lost peer) would keep it waiting forever.
    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(_peer_timeout_s + 10)
    if "live" not in answer:
        return None if "error" not in answer or is_main_process() else [0]
    return sorted(set(everyone) - set(answer["live"]))


def peer_lost(err: BaseException, last_checkpoint: str) -> PeerLostError | None:
    """A PeerLostError naming the processes lost, when losing them explains `err` (a failed
    collective); None when no process is lost.

    Says at once (on stderr, from every process) that a peer has probably died, since the
    answer takes up to the peer timeout, and JAX's coordination service may end this process
    first: then its own last line names the lost tasks ("stopped sending heartbeats").
    """
    import sys
    print(f"a collective failed ({_first_line(err)}): another process has probably died. "
          f"Waiting at most trainer.peer_timeout_s={_peer_timeout_s} s for JAX's coordination "
          f"service to name it; the last committed checkpoint is {last_checkpoint}",
          file=sys.stderr, flush=True)
    lost = lost_processes()
    if not lost:
        return None
    names = ", ".join(map(str, lost))
    return PeerLostError(
        f"lost process{'es' if len(lost) > 1 else ''} {names} of {jax.process_count()} "
        f"(no heartbeat for trainer.peer_timeout_s={_peer_timeout_s} s). This process stops "
        f"too; the last committed checkpoint is {last_checkpoint}. Restart every process to "
        "resume from it", lost)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def abandon(code: int = EXIT_PEER_LOST) -> None:
    """Exits now, skipping JAX's exit barrier (it would wait for the lost peer and abort).
    Process 0 hosts the coordination service: it lingers a moment so the other survivors'
    answers from `lost_processes` reach them first."""
    import sys
    import time
    sys.stdout.flush()
    sys.stderr.flush()
    if is_main_process() and jax.process_count() > 1:
        time.sleep(1.0)
    os._exit(code)
