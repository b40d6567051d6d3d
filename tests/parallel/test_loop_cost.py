"""Loops counted for their trip counts: a scanned program costs what its unrolled twin does."""

import importlib.util

import jax
import jax.numpy as jnp
import pytest

from jaxzero.parallel.loop_cost import loop_cost

D, LAYERS, MICRO = 128, 6, 3


def _layers(x, w_LDD, unroll: bool):
    return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, w_LDD, unroll=unroll)[0]


def _micro_batches(x, w_LDD, unroll: bool = False):
    """MICRO passes over LAYERS layers: two nested scans."""
    return jax.lax.scan(lambda c, _: (_layers(c, w_LDD, unroll), None), x, None,
                        length=MICRO, unroll=unroll)[0]


def _compiled(fn, device, **static):
    sharding = jax.sharding.SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((D, D), jnp.float32, sharding=sharding)
    w = jax.ShapeDtypeStruct((LAYERS, D, D), jnp.float32, sharding=sharding)
    return jax.jit(lambda x, w: fn(x, w, **static)).lower(x, w).compile()


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    return (analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"]


def _check_nested_scans(device):
    scanned = _compiled(_micro_batches, device, unroll=False)
    unrolled = _compiled(_micro_batches, device, unroll=True)
    matmuls = 2 * D ** 3 * LAYERS * MICRO
    # XLA's own analysis charges one layer of one micro-batch ...
    assert _flops(scanned) < 1.1 * matmuls / (LAYERS * MICRO)
    # ... the counted cost is the unrolled program's (its tanh and adds included).
    cost = loop_cost(scanned)
    assert cost.flops == pytest.approx(_flops(unrolled), rel=5e-3)
    assert cost.flops >= matmuls and cost.uncounted == ()
    assert loop_cost(unrolled).flops == _flops(unrolled)  # nothing to count in a flat program


def test_nested_scans_are_counted_as_often_as_they_run_on_cpu():
    _check_nested_scans(jax.devices("cpu")[0])


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu: pip install -e '.[test,tpu]'")
def test_nested_scans_are_counted_as_often_as_they_run_on_tpu():
    from jaxzero.parallel import target as tgt
    spec = tgt.parse_target("tpu:v5e:2x2")
    tgt.prepare_environment(spec)
    _check_nested_scans(tgt.target_devices(spec)[0])


def test_a_loop_that_stops_on_data_keeps_one_count_and_is_listed():
    """A `while_loop` bounded by a counter *and* a data test (as the sampler's chunk loops
    are) has no trip count; its `i < N` is not taken for one."""
    def stops_early(x, w_LDD):
        def body(s):
            i, c = s
            return i + 1, jnp.tanh(c @ w_LDD[0])
        return jax.lax.while_loop(lambda s: (s[0] < 100) & (s[1].sum() < 1e6), body,
                                  (0, x))[1]
    compiled = _compiled(stops_early, jax.devices("cpu")[0])
    cost = loop_cost(compiled)
    assert cost.flops == _flops(compiled) and len(cost.uncounted) == 1
