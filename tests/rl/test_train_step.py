"""The jitted update's metrics: what it logs does not depend on whether a term is trained."""

import dataclasses

import jax
import numpy as np
from flax import nnx

from jaxzero.model.qwen2 import init_model
from jaxzero.parallel.sharding import make_mesh
from jaxzero.rl.train_step import build_step_functions, init_opt_state, make_optimizer

from helpers import LOSS, R, TINY, grpo_batch


def _update(loss_config, **step_options):
    """(log-probs, update metrics, updated params) of one update from a fresh model."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, params = nnx.split(init_model(TINY, seed=1))  # fresh: the update donates
    optimizer = make_optimizer(lr=1e-3, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                               grad_clip=None)
    fns = build_step_functions(graphdef, params, optimizer, loss_config, mesh, response_len=R,
                               **step_options)
    params = jax.device_put(params, fns.param_shardings)
    batch = grpo_batch()
    logp = fns.logprobs(params, batch.tokens_BT, batch.valid_BT)
    new_params, _, metrics = fns.update(params, init_opt_state(optimizer, params,
                                                               fns.opt_shardings), batch)
    return jax.device_get((logp, metrics, new_params))


def test_entropy_is_logged_without_a_bonus_and_trained_only_with_one():
    _, with_bonus, params_bonus = _update(LOSS)
    _, without, params_plain = _update(dataclasses.replace(LOSS, entropy_coeff=0.0))
    # Near log(V) for a random model; the same figure whether or not it is in the loss.
    assert 0.5 * np.log(TINY.vocab_size) < without["entropy"] <= np.log(TINY.vocab_size)
    np.testing.assert_allclose(without["entropy"], with_bonus["entropy"], rtol=1e-6)
    np.testing.assert_allclose(without["pg_loss"], with_bonus["pg_loss"], rtol=1e-6)
    # The bonus changes the update; without it the entropy term adds no gradient.
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), params_bonus,
                                         params_plain))
    assert max(moved) > 0


def test_logit_chunk_changes_no_result():
    """Chunks of 1, 4 (the last one padded) and all 6 positions: the same log-probs, metrics
    and updated parameters."""
    results = [_update(LOSS, logit_chunk=chunk, micro_batches=2) for chunk in (1, 4, R)]
    for other in results[1:]:
        for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
