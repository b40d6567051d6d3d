"""The memory planner counts the sampler's own KV-cache layout, from the sharding table, and the
log-prob passes a micro-batch at a time."""

import numpy as np
import pytest

from helpers import TINY
from jaxzero.parallel.sharding import make_mesh
from jaxzero.rl.plan import PlanInputs, logprob_activations, plan_memory


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


def _inputs(**changes):
    base = dict(prompts_per_step=8, n=4, prompt_len=64, response_len=64, micro_batches=1,
                param_dtype="float32", compute_dtype="float32", ref_dtype="float32",
                remat=True, use_kl=True)
    return PlanInputs(**{**base, **changes})


def test_logprob_passes_are_counted_a_micro_batch_at_a_time():
    mesh = make_mesh(1, 4, 2)
    whole = logprob_activations(TINY, _inputs(), mesh)
    quarter = logprob_activations(TINY, _inputs(micro_batches=4), mesh)
    # All but the [B, R] output shrinks with the micro-batch.
    out = 8 * 4 * 64 * 4 / 4
    np.testing.assert_allclose(quarter - out, (whole - out) / 4, rtol=1e-6)
    # A packed micro-batch is one row of the token budget per device: 8 rows of 128 over 4
    # shards are 2 rows, so at 256 tokens the (linear) stream terms match, scores do not.
    assert _inputs(micro_batch_tokens=256).train_rows(4) == (1, 256)
    assert _inputs().train_rows(4) == (8, 128)


@pytest.mark.slow  # three more compiles of the tiny model
def test_packed_runs_are_planned_on_their_rows():
    report = plan_memory(TINY, _inputs(micro_batch_tokens=256), make_mesh(1, 4, 2))
    assert report.logprob_temp > 0 and report.train_temp > 0
    assert report.peak >= report.total_logprob_phase > report.params + report.opt_state
