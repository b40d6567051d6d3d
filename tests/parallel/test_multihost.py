"""Two processes on localhost, joined through jax.distributed, run one sharded update."""

import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from multihost_case import run_update

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    port, out = _free_port(), tmp_path / "multi.npz"
    procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), str(i),
                               str(port), str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]

    metrics, params = run_update(jax.devices()[:8])
    got = np.load(out)
    np.testing.assert_allclose(got["loss"], np.asarray(metrics["loss"]), rtol=1e-6, atol=1e-7)
    for i, leaf in enumerate(jax.tree.leaves(params)):
        np.testing.assert_allclose(got[str(i)], np.asarray(leaf), rtol=1e-6, atol=1e-7)
