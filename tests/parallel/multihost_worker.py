"""One process of the 2-process test: a sharded GRPO update over 2 x 4 CPU devices."""

import os
import sys

process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
os.environ.update(JAXZERO_COORDINATOR=f"127.0.0.1:{port}", JAXZERO_NUM_PROCESSES="2",
                  JAXZERO_PROCESS_ID=str(process_id))

from jaxzero.parallel import distributed  # noqa: E402

distributed.initialize()

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from multihost_case import run_update  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 8
metrics, params = run_update(jax.devices())
flat = {str(i): np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        for i, leaf in enumerate(jax.tree.leaves(params))}
if distributed.is_main_process():
    np.savez(out, loss=np.asarray(metrics["loss"]), **flat)
