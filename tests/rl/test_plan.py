"""The memory planner counts the rollout as the trainer runs it (its decode copy of the policy
and the KV cache on the decode layout's shardings, and the compiled decode loop) and the
log-prob passes a micro-batch at a time."""

import numpy as np
import pytest

from helpers import TINY
from jaxzero.errors import ConfigError
from jaxzero.parallel.sharding import make_mesh
from jaxzero.rl.plan import PlanInputs, format_report, logprob_activations, plan_memory


@pytest.mark.parametrize("layout", ["replicated", pytest.param("tensor", marks=pytest.mark.slow)])
def test_decode_copy_and_kv_cache_are_counted_on_the_decode_layout(layout):
    """B = 8 rows (16 replicated), S = 32 slots (8 + 4, the first token then one chunk of 3,
    in whole SLOT_MULTIPLEs), bfloat16 compute.
    Replicated: the whole copy per device, rows over all 8 devices, K = 2 heads whole.
    Tensor over (fsdp 4 × tensor 2): heads, MLP and vocab over 8 devices where they divide
    (K = 2 does not), rows over data = 1."""
    inputs = PlanInputs(prompts_per_step=4, n=2, prompt_len=8, response_len=4, micro_batches=1,
                        param_dtype="float32", compute_dtype="bfloat16", ref_dtype="bfloat16",
                        remat=False, use_kl=False, decode_layout=layout)
    report = plan_memory(TINY, inputs, make_mesh(1, 4, 2))
    layers, slots, h = TINY.num_hidden_layers, 32, TINY.head_dim
    # Replicated: the 4 prompts are padded to one per device (as Sampler.generate pads them),
    # 16 rows over 8 devices.
    rows, heads = (16 // 8, 2) if layout == "replicated" else (8, 2)
    kv = 2 * layers * rows * slots * heads * h * 2
    assert report.decode_layout == layout
    assert report.kv_cache == kv + rows * slots + 4
    whole = TINY.num_params() * 2
    if layout == "replicated":
        assert report.decode_copy == whole
    else:
        assert whole / 8 < report.decode_copy < whole / 2  # K-head weights and norms stay whole
    resident = report.params + report.opt_state + report.reference
    for name in ("prefill", "decode loop"):
        phase = report.phase(name)
        # XLA's figure holds the copy and the cache as the program's arguments.
        assert phase.xla > resident + report.decode_copy + report.kv_cache
        assert phase.computed > resident + report.decode_copy + report.kv_cache
    assert report.platform == "cpu" and report.peak == max(p.computed for p in report.phases)
    assert "rollout copy of policy" in format_report("tiny", report, inputs)


def _inputs(**changes):
    base = dict(prompts_per_step=8, n=4, prompt_len=64, response_len=64, micro_batches=1,
                param_dtype="float32", compute_dtype="float32", ref_dtype="float32",
                remat=True, use_kl=True)
    return PlanInputs(**{**base, **changes})


def test_logprob_passes_are_counted_a_micro_batch_at_a_time():
    mesh = make_mesh(1, 4, 2)
    whole = logprob_activations(TINY, _inputs(), mesh)
    quarter = logprob_activations(TINY, _inputs(micro_batches=4), mesh)
    # All but the [B, R] output and the gathered lm_head weight shrinks with the micro-batch.
    out = 8 * 4 * 64 * 4 / 4 + TINY.vocab_size / 2 * TINY.hidden_size * 4
    np.testing.assert_allclose(quarter - out, (whole - out) / 4, rtol=1e-6)
    # A packed micro-batch is one row of the token budget per device: 8 rows of 128 over 4
    # shards are 2 rows, so at 256 tokens the (linear) stream terms match, scores do not.
    assert _inputs(micro_batch_tokens=256).train_rows(4) == (1, 256)
    assert _inputs().train_rows(4) == (8, 128)


@pytest.mark.slow  # three more compiles of the tiny model
def test_packed_runs_are_planned_on_their_rows():
    report = plan_memory(TINY, _inputs(micro_batch_tokens=256), make_mesh(1, 4, 2))
    logprob = report.phase("log-prob pass")
    assert logprob.xla > report.opt_state and report.phase("update").cost.flops > 0
    assert report.peak >= logprob.computed > report.params + report.opt_state


def test_a_decode_layout_the_mesh_cannot_take_is_refused_before_any_train_compile(monkeypatch):
    """On a pod the train programs take minutes to compile: a tensor decode layout wider than
    a host is refused first (seen on the 7B's plan for v5e:4x4, refused after 6:45)."""
    from jaxzero.rl import plan

    def compiled_too_early(*_):
        raise AssertionError("the train programs compiled before the layout was checked")

    monkeypatch.setattr(plan, "_train_lowered", compiled_too_early)
    inputs = PlanInputs(prompts_per_step=4, n=2, prompt_len=8, response_len=4, micro_batches=1,
                        param_dtype="float32", compute_dtype="bfloat16", ref_dtype="bfloat16",
                        remat=False, use_kl=False, decode_layout="tensor")
    with pytest.raises(ConfigError, match="more than one host's 4"):
        plan_memory(TINY, inputs, make_mesh(1, 4, 2), host_devices=4)


def test_an_out_of_memory_refusal_becomes_the_bytes_it_names_and_other_errors_pass():
    """XLA:TPU's two refusals (its early estimate and its allocator's "Used X of Y"), in
    GiB/MiB as it prints them; an error that is not about memory is raised as it was."""
    import jax

    from jaxzero.rl.plan import Refused, _compiled_or_refused, refused_needs
    early = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
             "temporaries (16.94G) exceeds available HBM (15.75G).")
    late = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran "
            "out of memory in memory space hbm. Used 20.90M of 17.00M hbm. Exceeded hbm "
            "capacity by 3.90M.\n\nTotal hbm usage >= 278.90M:")
    assert refused_needs(early) == int(16.94 * 2 ** 30)
    assert refused_needs(late) == int(20.90 * 2 ** 20)
    assert refused_needs("RESOURCE_EXHAUSTED: something else") is None

    def raising(message):
        def thunk():
            raise jax.errors.JaxRuntimeError(message)
        return thunk

    refused = _compiled_or_refused(raising(late))
    assert refused == Refused(int(20.90 * 2 ** 20), late.splitlines()[0])
    with pytest.raises(jax.errors.JaxRuntimeError, match="INVALID_ARGUMENT"):
        _compiled_or_refused(raising("INVALID_ARGUMENT: bad sharding"))
