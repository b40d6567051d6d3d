"""Trimmed and packed rows give the padded batch's log-probs, loss, gradient and metrics; the
old-log-prob pass can be skipped with one update per step; the log-prob passes micro-batch.

Tolerances: log-probs agree to 1e-6 (the same tokens attend to the same keys; only where in
the row differs), the loss and metrics to rtol 1e-5 (float32 sums in another order), the
gradients (read as an SGD step at rate 1) to 1e-5 of their largest entry.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import LOSS, R, TINY, grpo_batch
from jaxzero.model.qwen2 import init_model
from jaxzero.parallel.sharding import make_mesh, put_global
from jaxzero.rl import grpo, layout
from jaxzero.rl.train_step import build_step_functions, init_opt_state

# By default the seed's mode on packed rows: its weights carry a per-group normaliser and the
# rows several rollouts, the hardest case; every other pair is slow.
CASES = [(grpo.SEED_AGG, "packed"), *[
    pytest.param(mode, name, marks=pytest.mark.slow)
    for mode in (grpo.SEED_AGG, "seq-mean-token-mean", "token-mean", "seq-mean-token-sum",
                 "seq-mean-token-sum-norm") for name in ("trimmed", "packed")
    if (mode, name) != (grpo.SEED_AGG, "packed")]]


def _host_batch(seed=0, b=8):
    return jax.tree.map(np.asarray, grpo_batch(seed=seed, b=b))


def _layouts(host):
    return {"trimmed": layout.trimmed(host.valid_BT, R, micro_batches=2, width_multiple=4,
                                      rows_multiple=2),
            "packed": layout.packed(host.valid_BT, R, width=32, rows=2, micro_batches=4,
                                    width_multiple=4)}


# ---- the host layouts ----------------------------------------------------------------------

def test_each_rollout_is_one_segment_of_its_real_tokens():
    host = _host_batch(seed=4)
    p = host.tokens_BT.shape[1] - R
    for name, lay in _layouts(host).items():
        rows = lay.rows_of(host.tokens_BT)
        tokens = rows.tokens_MBW.reshape(-1, lay.width)
        segments = rows.segments_MBW.reshape(-1, lay.width)
        positions = rows.positions_MBW.reshape(-1, lay.width)
        for b in range(host.tokens_BT.shape[0]):
            real = host.tokens_BT[b][host.valid_BT[b]]
            row, off = lay.row_B[b], lay.offset_B[b]
            np.testing.assert_array_equal(tokens[row, off:off + real.size], real, err_msg=name)
            assert len(set(segments[row, off:off + real.size])) == 1
            np.testing.assert_array_equal(positions[row, off:off + real.size],
                                          np.arange(real.size))
        assert (segments > 0).sum() == host.valid_BT.sum()
        # Every scored slot's target is the token after the position that scores it.
        pick = rows.pick_MBN.reshape(-1, lay.slots)
        targets = rows.targets_MBN.reshape(-1, lay.slots)
        live = lay.scatter(np.ones((len(host.valid_BT), R), bool) & host.valid_BT[:, p:],
                           fill=False).reshape(-1, lay.slots)
        rows_S, slots_S = np.nonzero(live)
        np.testing.assert_array_equal(tokens[rows_S, pick[rows_S, slots_S] + 1],
                                      targets[rows_S, slots_S])
        # scatter and gather are inverse on the response tokens.
        x_BR = np.random.RandomState(0).randn(len(host.valid_BT), R).astype(np.float32)
        back = lay.gather(lay.scatter(x_BR), R)
        np.testing.assert_array_equal(np.where(host.valid_BT[:, p:], back, 0),
                                      np.where(host.valid_BT[:, p:], x_BR, 0))


def test_packing_fills_few_rows_and_refuses_what_does_not_fit():
    host = _host_batch(seed=5, b=16)
    lay = layout.packed(host.valid_BT, R, width=48, rows=1, micro_batches=16)
    fill = np.bincount(lay.row_B, lay.prompt_len_B + lay.response_len_B)
    assert fill.max() <= 48 and fill.size == np.ceil(fill.sum() / 48)
    trimmed = layout.trimmed(host.valid_BT, R, micro_batches=1, width_multiple=1)
    assert lay.padding_fraction < 0.5 * trimmed.padding_fraction
    with pytest.raises(ValueError, match="raise the token budget"):
        layout.packed(host.valid_BT, R, width=8, rows=2, micro_batches=8)
    with pytest.raises(ValueError, match="at most 1 were allowed"):
        layout.packed(host.valid_BT, R, width=32, rows=2, micro_batches=1)


def test_packed_rows_narrow_to_the_fewest_micro_batches_budget():
    """Narrowing spreads the last row's empty tail: the same micro-batches, rows a multiple
    of width_multiple no wider than the budget, less padding; it never needs more rows."""
    for seed in range(6):
        host = _host_batch(seed=seed, b=16)
        wide = layout.packed(host.valid_BT, R, width=64, rows=2, micro_batches=16)
        narrow = layout.packed(host.valid_BT, R, width=64, rows=2, micro_batches=16,
                               width_multiple=4)
        used = lambda lay: np.unique(lay.row_B // lay.rows).size
        assert used(narrow) == used(wide) and narrow.width % 4 == 0 and narrow.width <= 64
        fill = np.bincount(narrow.row_B, narrow.prompt_len_B + narrow.response_len_B)
        assert fill.max() <= narrow.width
        assert narrow.padding_fraction <= wide.padding_fraction
    assert narrow.width < 64  # the batches above do narrow


# ---- the model on laid-out rows -----------------------------------------------------------

def test_packed_segments_are_causal_and_blind_to_each_other():
    """By gradient (nanodo's test_causality): a token's hidden state depends on its own
    segment's earlier tokens only, whatever shares its row."""
    model = init_model(TINY, seed=2)
    segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    positions = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]])
    x = model.embed(jnp.array([[5, 9, 3, 7, 7, 1, 4, 0]]))

    @jax.jit
    def sensitivity(x_BTD):
        hidden = lambda x, t: model.hidden_states_from_embeddings(
            x, segments > 0, positions, segments_BT=segments)[0][0, t].sum()
        return [jax.grad(hidden)(x_BTD, t) for t in (1, 5)]

    for grad, seen in zip(sensitivity(x), ({0, 1}, {3, 4, 5})):
        moved = np.abs(np.asarray(grad)[0]).sum(-1) > 0
        assert set(np.flatnonzero(moved)) == seen


def _fresh(loss_config, mesh, optimizer, **options):
    graphdef, params = nnx.split(init_model(TINY, seed=1))
    fns = build_step_functions(graphdef, params, optimizer, loss_config, mesh, response_len=R,
                               **options)
    params = jax.device_put(params, fns.param_shardings)
    return fns, params, init_opt_state(optimizer, params, fns.opt_shardings)


def _close(got, want, *, what):
    for key in want[0]:
        np.testing.assert_allclose(got[0][key], want[0][key], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{what}: {key}")
    largest = max(np.abs(g).max() for g in jax.tree.leaves(want[1]))
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * largest, err_msg=what)


@pytest.mark.parametrize("mode,name", CASES)
def test_trimmed_and_packed_rows_give_the_padded_update(mode, name):
    config = dataclasses.replace(LOSS, agg=mode,
                                 group_rows=2 if mode == grpo.SEED_AGG else None)
    mesh = make_mesh(1, 2, 1, devices=jax.devices()[:2])
    sgd = optax.sgd(1.0)  # the step is minus the gradient
    host = _host_batch(seed=1)

    def stepped(run):
        fns, params, opt_state = _fresh(config, mesh, sgd, micro_batches=2)
        before = jax.device_get(params)
        logp, new, metrics = run(fns, params, opt_state)
        return jax.device_get(metrics), jax.tree.map(np.subtract, before,
                                                     jax.device_get(new)), logp

    def padded(fns, params, opt_state):
        logp = np.asarray(fns.logprobs(params, host.tokens_BT, host.valid_BT))
        return (logp, *fns.update(params, opt_state, grpo_batch(seed=1))[::2])

    lay = _layouts(host)[name]

    def laid_out(fns, params, opt_state):
        rows = put_global(lay.rows_of(host.tokens_BT), fns.row_shardings)
        logp = lay.gather(np.asarray(fns.row_logprobs(params, rows)), R)
        loss = lay.loss_of(host.response_mask_BR, host.advantages_B, config)._replace(
            old_logp_MBN=lay.scatter(host.old_logp_BR),
            ref_logp_MBN=lay.scatter(host.ref_logp_BR))
        return (logp, *fns.row_update(params, opt_state, rows, loss)[::2])

    want, got = stepped(padded), stepped(laid_out)
    valid_BR = host.valid_BT[:, -R:]
    np.testing.assert_allclose(np.where(valid_BR, got[2], 0), np.where(valid_BR, want[2], 0),
                               atol=1e-6)
    _close(got, want, what=f"{name} {mode}")


def test_one_update_per_step_needs_no_old_logprob_pass():
    """Old log-probs None (the update's own, detached) against a recompute of them: the
    same loss, gradient and metrics; the ratio is exactly 1, so approx_kl and clipfrac are 0."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    sgd = optax.sgd(1.0)
    batch = grpo_batch(seed=2)
    results = []
    for recompute in (True, False):
        fns, params, opt_state = _fresh(LOSS, mesh, sgd, micro_batches=2)
        before = jax.device_get(params)
        old = fns.logprobs(params, batch.tokens_BT, batch.valid_BT) if recompute else None
        new, _, metrics = fns.update(params, opt_state, batch._replace(old_logp_BR=old))
        results.append((jax.device_get(metrics),
                        jax.tree.map(np.subtract, before, jax.device_get(new))))
    _close(results[1], results[0], what="old log-probs as the current ones")
    assert float(results[1][0]["approx_kl"]) == 0.0 and float(results[1][0]["clipfrac"]) == 0.0
    assert float(results[1][0]["grad_norm"]) > 0


def test_logprob_passes_in_micro_batches_match_one_go():
    mesh = make_mesh(1, 2, 1, devices=jax.devices()[:2])
    batch = grpo_batch(seed=3)
    logp = []
    for micro_batches in (1, 4):
        fns, params, _ = _fresh(LOSS, mesh, optax.sgd(1.0), micro_batches=micro_batches)
        logp.append(np.asarray(fns.logprobs(params, batch.tokens_BT, batch.valid_BT)))
    np.testing.assert_allclose(logp[1], logp[0], rtol=0, atol=1e-6)
