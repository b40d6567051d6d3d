"""`jaxzero train` as 2 processes × 4 CPU devices joined through jax.distributed on
localhost, against 1 process × 8 devices: the same run and HF export, a stop signalled to one
process, and a process killed.

Every run is the demo shrunk to seconds a step: one layer, 8 new tokens, 2 prompts × 4
rollouts, a 2-step warm-up. The mesh is data 2 × fsdp 4, so the processes exchange only the
batch's gradients and a few small values, not every decode step's weights.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import REPO, hf_tensors
from jaxzero.config.files import load_config
from jaxzero.diagnosis.task import make_task
from jaxzero.io.checkpoint import CheckpointStore
from jaxzero.monitor.plots import read_scalars
from jaxzero.rl.trainer import train

pytestmark = pytest.mark.slow

DEMO = REPO / "configs" / "demo.yaml"
# The dead-peer test's bound. The other runs keep the default (100 s): on a loaded 2-core
# machine a process busy compiling has missed 5 s of heartbeats.
PEER_TIMEOUT_S = 10
TINY = ["data.prompts_per_step=2", "rollout.n=4", "rollout.max_new_tokens=8",
        "demo.warmup_steps=2", "demo.warmup_batch=8", "trainer.eval_every=0",
        "trainer.export_hf=null", "model.demo_layers=1", "grpo.entropy_coeff=0.01",
        "mesh.data=2", "mesh.fsdp=4"]
LR = 5e-4  # the demo's optim.lr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pod:
    """The two processes of one `jaxzero train`, each logging to its own file."""

    def __init__(self, run_dir: Path, *extra: str, logs: Path):
        port = _free_port()
        self.logs = [logs / f"{run_dir.name}-{time.monotonic_ns()}-p{i}.log" for i in range(2)]
        self.procs = []
        for i, log in enumerate(self.logs):
            env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
            env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4",
                       JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                       JAXZERO_COORDINATOR=f"127.0.0.1:{port}", JAXZERO_NUM_PROCESSES="2",
                       JAXZERO_PROCESS_ID=str(i), PYTHONUNBUFFERED="1")
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "jaxzero.cli", "train", str(DEMO), *TINY,
                     f"trainer.run_dir={run_dir}", *extra],
                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO))

    def log(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 400) -> None:
        """Until process 0's log has a line matching `pattern`."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log(0), re.M):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.kill()
                pytest.fail(f"no line matching {pattern!r}:\n{self.log(0)[-3000:]}")
            time.sleep(0.2)

    def finish(self, timeout: float = 400) -> list[int]:
        try:
            return [p.wait(timeout=timeout) for p in self.procs]
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def logs_tail(self) -> str:
        return "\n".join(f"--- process {i}\n{self.log(i)[-2500:]}" for i in range(2))


def _params(run_dir: Path, step: int) -> list[np.ndarray]:
    """The parameters of a checkpoint as host arrays, whatever devices wrote it."""
    path = run_dir / "checkpoints" / str(step) / "arrays"
    checkpointer = ocp.PyTreeCheckpointer()
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            checkpointer.metadata(path).item_metadata.tree)
    tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return jax.tree.leaves(tree["params"])


@pytest.fixture(scope="module")
def pod_run(tmp_path_factory):
    """4 steps on 2 processes, a checkpoint each step, and the HF export; its wall time."""
    run_dir = tmp_path_factory.mktemp("pod")
    logs = tmp_path_factory.mktemp("logs")
    t0 = time.monotonic()
    pod = Pod(run_dir, "trainer.max_steps=4", "trainer.save_every=1",
              "trainer.keep_checkpoints=4", f"trainer.export_hf={run_dir / 'hf'}", logs=logs)
    codes = pod.finish()
    assert codes == [0, 0], pod.logs_tail()
    return run_dir, pod, time.monotonic() - t0


def test_two_processes_train_and_export_as_one_does(pod_run, tmp_path):
    run_dir, pod, seconds = pod_run
    print(f"2-process run of 4 steps: {seconds:.1f} s")
    assert "done at step 4." in pod.log(0) and "exported HF model" in pod.log(0)
    assert "Traceback" not in pod.log(0) + pod.log(1)
    one = tmp_path / "one"
    train(load_config(DEMO, TINY + [f"trainer.run_dir={one}", "trainer.max_steps=4",
                                    f"trainer.export_hf={one / 'hf'}"]),
          make_task, log=lambda *_: None)
    two_s, one_s = read_scalars(run_dir), read_scalars(one)

    def logged(scalars, tag):
        assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4], tag
        return np.array([v for _, v in scalars[tag]])

    # Step 1 starts from the same model with the same prompts and sampling keys: the same
    # rollouts, losses and gradient, up to the order in which gloo (across the processes) and
    # XLA (within one) sum the 8 devices' parts.
    for tag in ("losses/entropy", "losses/total", "optim/grad_norm"):
        np.testing.assert_allclose(logged(two_s, tag)[0], logged(one_s, tag)[0], rtol=1e-5,
                                   err_msg=tag)
    # Then they drift apart at the learning rate's scale: the random demo model's gradient
    # (the entropy bonus over a near-uniform 152k-token softmax) is mostly float cancellation,
    # and Adam moves each weight by about lr whatever its gradient's size, rounding noise
    # included. Rollouts stay alike; the KL and gradient norm, made of those moves, within 25%.
    for tag in ("reward/mean", "response/length_mean"):
        np.testing.assert_array_equal(logged(two_s, tag), logged(one_s, tag), err_msg=tag)
    np.testing.assert_allclose(logged(two_s, "losses/entropy"), logged(one_s, "losses/entropy"),
                               rtol=1e-5)
    for tag in ("losses/kl", "optim/grad_norm"):
        np.testing.assert_allclose(logged(two_s, tag), logged(one_s, tag), rtol=0.25,
                                   err_msg=tag)
    moved = 0.0
    for a, b in zip(_params(run_dir, 4), _params(one, 4), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        moved = max(moved, float(np.abs(a - b).max()))
    assert 0 < moved < 2 * 4 * LR * 1.5, moved   # 4 steps of at most ~lr each, either way

    # The 2-process export is the 1-process export of the same checkpoint, bit for bit.
    two_hf = hf_tensors(run_dir / "hf")
    from jaxzero.cli.main import main
    assert main(["convert", "jax-to-hf", str(run_dir), str(tmp_path / "hf1"),
                 "--dtype", "float32"]) == 0
    one_hf = hf_tensors(tmp_path / "hf1")
    assert sorted(two_hf) == sorted(one_hf)
    for name in two_hf:
        assert two_hf[name].tobytes() == one_hf[name].tobytes(), name
    # And the 1-process run's own export has the same tensors, within that drift.
    own = hf_tensors(one / "hf")
    assert sorted(own) == sorted(two_hf)
    for name in own:
        np.testing.assert_allclose(own[name], two_hf[name], atol=2 * 4 * LR * 1.5, err_msg=name)


def test_sigterm_to_one_process_stops_both_after_one_step(pod_run, tmp_path):
    """Only process 1 is signalled; both stop after the same step, save it together, exit 0;
    the rerun resumes from it and reaches the straight run's next step bit for bit."""
    straight, _, _ = pod_run
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    pod = Pod(run_dir, "trainer.max_steps=50", "trainer.save_every=100", logs=tmp_path)
    pod.wait_for(r"^step +1/50 · ")   # printed while step 2 runs
    pod.procs[1].send_signal(signal.SIGTERM)
    codes = pod.finish()
    print(f"2-process run stopped by SIGTERM: {time.monotonic() - t0:.1f} s")
    assert codes == [0, 0], pod.logs_tail()
    stopped = re.search(r"another process received a stop signal: stopping after step (\d+)",
                        pod.log(0))
    assert stopped, pod.logs_tail()
    step = int(stopped.group(1))
    assert 2 <= step <= 3, pod.logs_tail()   # the step running when the signal came, or next
    assert CheckpointStore(run_dir / "checkpoints").all_steps() == [step]

    t0 = time.monotonic()
    resumed = Pod(run_dir, f"trainer.max_steps={step + 1}", "trainer.save_every=100",
                  logs=tmp_path)
    codes = resumed.finish()
    print(f"2-process resume for 1 step: {time.monotonic() - t0:.1f} s")
    assert codes == [0, 0], resumed.logs_tail()
    assert f"(step {step})" in resumed.log(0)
    for a, b in zip(_params(run_dir, step + 1), _params(straight, step + 1), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_signal_during_setup_stops_both_after_the_first_step(tmp_path):
    """SIGTERM to process 1 in the demo's warm-up: setup finishes on both, then both stop
    after step 1 and save it (a process alone would stop at once, with nothing to save)."""
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    pod = Pod(run_dir, "trainer.max_steps=50", "demo.warmup_steps=6", logs=tmp_path)
    pod.wait_for(r"^demo warm-up 1/6")
    pod.procs[1].send_signal(signal.SIGTERM)
    codes = pod.finish()
    print(f"2-process run signalled during setup: {time.monotonic() - t0:.1f} s")
    assert codes == [0, 0], pod.logs_tail()
    assert "another process received a stop signal: stopping after step 1" in pod.log(0)
    assert "demo warm-up 6/6" in pod.log(0)
    assert CheckpointStore(run_dir / "checkpoints").all_steps() == [1]


def test_a_killed_process_stops_the_other_within_the_bound(tmp_path):
    """kill -9 of process 1: process 0 exits non-zero within trainer.peer_timeout_s (plus
    its own exit), naming the lost process; the last committed checkpoint restores. The
    kill lands while step 2's async save may still be writing: then step 1 is the last."""
    run_dir = tmp_path / "run"
    pod = Pod(run_dir, "trainer.max_steps=50", "trainer.save_every=1",
              f"trainer.peer_timeout_s={PEER_TIMEOUT_S}", logs=tmp_path)
    pod.wait_for(r"^checkpoint step 2 -> ")
    os.kill(pod.procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    try:
        code = pod.procs[0].wait(timeout=PEER_TIMEOUT_S + 60)
    finally:
        pod.kill()
    seconds = time.monotonic() - t0
    print(f"the survivor exited {seconds:.1f} s after the kill, status {code} (peer timeout "
          f"{PEER_TIMEOUT_S} s)")
    log = pod.log(0)
    # Named by jaxzero (exit 3), when a collective failed first and its question to the
    # coordination service was answered; or by JAX's own last line (SIGABRT), when the
    # service's error poll came first or nothing had failed yet (the process was between
    # collectives, or in one that waits, as on TPUs and GPUs).
    ours = re.search(r"lost process 1 of 2 \(no heartbeat for trainer\.peer_timeout_s="
                     f"{PEER_TIMEOUT_S}" r" s\)", log)
    theirs = re.search(r"stopped sending heartbeats\):\s+1\s", log)
    assert (code == 3 and ours and "a collective failed (" in log) or \
        (code == -signal.SIGABRT and theirs), pod.logs_tail()
    assert seconds < PEER_TIMEOUT_S + 10, pod.logs_tail()
    store = CheckpointStore(run_dir / "checkpoints")
    committed = store.committed_steps()
    assert committed and committed[-1] >= 1, committed
    assert store.restore_meta(committed[-1])["step"] == committed[-1]
    assert len(_params(run_dir, committed[-1])) > 0
