"""The memory planner counts the sampler's own KV-cache layout, from the sharding table."""

import numpy as np

from helpers import TINY
from jaxzero.parallel.sharding import make_mesh
from jaxzero.rl.plan import PlanInputs, plan_memory


def test_kv_cache_is_counted_on_the_samplers_shardings():
    """B = 8 rows over fsdp=4, S = 8 + 4 slots, K = 2 heads over tensor=2: per device each of
    k and v is L·2·S·1·H float32, plus the [2, S] valid mask and the end counter."""
    inputs = PlanInputs(prompts_per_step=4, n=2, prompt_len=8, response_len=4, micro_batches=1,
                        param_dtype="float32", compute_dtype="float32", ref_dtype="float32",
                        remat=False, use_kl=False)
    report = plan_memory(TINY, inputs, make_mesh(1, 4, 2))
    layers, rows, slots, heads, h = TINY.num_hidden_layers, 8 // 4, 12, 2 // 2, TINY.head_dim
    kv = 2 * layers * rows * slots * heads * h * np.dtype(np.float32).itemsize
    assert report.kv_cache == kv + rows * slots + 4
