"""DiagnosisZero's own update arithmetic, against a numpy port of its verl fork written here.

The port follows the seed's code, not grpo.py: `seqlen_balancing.karmarkar_karp` and
`ray_trainer._balance_batch` (rows to ranks), `fsdp_workers` (batch sizes per GPU),
`dp_actor.update_policy` (micro-batch token means over the gradient accumulation, summed; the
ranks' gradients averaged), `core_algos` (clipped surrogate, low_var_kl), `clip_grad_norm_`
and torch's AdamW. The model's Jacobian is the one thing taken from jaxzero: the port's
gradient with respect to every token's log-prob and entropy (numerical, by central
differences) is pulled back through the model with a VJP.
"""

import heapq
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import R, TINY, grpo_batch
from jaxzero.model.qwen2 import init_model
from jaxzero.model.sampler import Sampler
from jaxzero.parallel.sharding import make_mesh
from jaxzero.rl import grpo
from jaxzero.rl.train_step import (TrainBatch, build_step_functions, clip_by_global_norm_as_torch,
                                   completion_logprobs, init_opt_state, make_optimizer)

T = 0.7  # a rollout temperature other than 1


# ---- the port: Karmarkar-Karp as the seed's seqlen_balancing.py runs it --------------------

class _Part:
    def __init__(self):
        self.total, self.items = 0, []

    def sort_key(self):
        return (self.total, len(self.items), self.items)


class _State:
    def __init__(self, items, k):
        self.k = k
        self.parts = [_Part() for _ in range(k)]
        for part, (idx, size) in zip(self.parts, items):
            part.items.append((idx, size))
            part.total += size
        self.parts.sort(key=_Part.sort_key, reverse=True)

    def spread(self):
        return self.parts[0].total - self.parts[-1].total

    def __lt__(self, other):  # the state popped first: larger spread, then larger first part
        if self.spread() != other.spread():
            return self.spread() > other.spread()
        return other.parts[0].sort_key() < self.parts[0].sort_key()

    def absorb(self, other):
        for i in range(self.k):
            donor = other.parts[self.k - 1 - i]
            self.parts[i].items.extend(donor.items)
            self.parts[i].total += donor.total
        self.parts.sort(key=_Part.sort_key, reverse=True)


def port_partitions(sizes, k):
    ordered = sorted((s, i) for i, s in enumerate(sizes))
    heap = []
    for offset in range(0, len(ordered), k):
        heapq.heappush(heap, _State([(i, s) for s, i in ordered[offset:offset + k]], k))
    while len(heap) > 1:
        first, second = heapq.heappop(heap), heapq.heappop(heap)
        first.absorb(second)
        heapq.heappush(heap, first)
    return [sorted(i for i, _ in part.items) for part in heap[0].parts]


def port_balance_order(seqlens, ranks):
    return [i for part in port_partitions(list(seqlens), ranks) for i in part]


def test_karmarkar_karp_matches_the_seed_with_its_ties():
    rng = random.Random(0)
    for trial in range(300):
        k = rng.choice([1, 2, 3, 4, 8])
        n = k * rng.randint(1, 6)
        top = rng.choice([1, 3, 50, 2000])  # small ranges force ties
        sizes = [rng.randint(0, top) for _ in range(n)]
        assert grpo.karmarkar_karp(sizes, k) == port_partitions(sizes, k), (sizes, k)
    # By hand: pairs by size, the two largest-led pairs merged first, largest with smallest;
    # equal sums and lengths are ordered by their (index, size) items.
    assert grpo.karmarkar_karp([10, 1, 9, 2, 8, 3, 7, 4], 2) == [[2, 3, 4, 5], [0, 1, 6, 7]]
    with pytest.raises(ValueError, match="equal parts"):
        grpo.karmarkar_karp([1, 2, 3], 2)
    order = grpo.seed_row_order(np.array([5, 1, 4, 2]), 2)
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    assert order.tolist() == port_balance_order([5, 1, 4, 2], 2)


# ---- the port: one seed update ------------------------------------------------------------

def port_loss(logp, ent, old, ref, adv, mask, order, *, ranks, micro_rows, mini_rows,
              clip=0.2, entropy_coeff=0.001, kl_coef=0.001):
    """The loss whose gradient FSDP hands the optimizer: the mean over ranks of each rank's
    sum over micro-batches of policy_loss / gradient_accumulation."""
    grad_accum = mini_rows // micro_rows
    rows = np.asarray(order)
    per_rank = len(rows) // ranks
    total = 0.0
    for r in range(ranks):
        mine = rows[r * per_rank:(r + 1) * per_rank]
        rank_loss = 0.0
        for start in range(0, len(mine), micro_rows):
            b = mine[start:start + micro_rows]
            m = mask[b]
            masked_mean = lambda v: (v * m).sum() / m.sum()
            ratio = np.exp(logp[b] - old[b])
            a = adv[b][:, None] * m
            pg = masked_mean(np.maximum(-a * ratio, -a * np.clip(ratio, 1 - clip, 1 + clip)))
            kl = ref[b] - logp[b]
            kld = np.clip(np.exp(kl) - kl - 1, -10, 10)
            policy = pg - masked_mean(ent[b]) * entropy_coeff + masked_mean(kld) * kl_coef
            rank_loss += policy / grad_accum
        total += rank_loss
    return total / ranks


def numerical_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        g[idx] = (f(up) - f(down)) / (2 * h)
    return g


def torch_clip(g_list, max_norm):
    norm = np.sqrt(sum((g ** 2).sum() for g in g_list))
    coef = min(max_norm / (norm + 1e-6), 1.0)
    return [g * coef for g in g_list], norm


def torch_adamw_first_step(p, g, *, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    m, v = (1 - b1) * g, (1 - b2) * g * g
    p = p * (1 - lr * wd)
    denom = np.sqrt(v) / np.sqrt(1 - b2) + eps
    return p - lr / (1 - b1) * m / denom


# Seed-shaped sizes, shrunk: 2 GPUs, train_batch_size 2 prompts × n 8 = 16 rows;
# ppo_mini_batch_size 4 → 4·8/2 = 16 rows per GPU; ppo_micro_batch_size 8 → 4 per GPU.
# Each GPU holds 8 rows (2 micro-batches); gradient accumulation 16/4 = 4; the seed's scale
# is then 4 micro-batches / (2 GPUs × 4) = 1/2 of the mean of the micro-batch token means.
RANKS, MICRO_ROWS, MINI_ROWS, B = 2, 4, 16, 16
SCALE = (B // MICRO_ROWS) / (RANKS * (MINI_ROWS // MICRO_ROWS))
LR, WD, KL, ENT = 1e-3, 0.01, 0.1, 0.001


def _fresh():
    graphdef, params = nnx.split(init_model(TINY, seed=1))
    return graphdef, params


def _seed_update(optimizer, micro_batches):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, params = _fresh()
    config = grpo.LossConfig(agg=grpo.SEED_AGG, group_rows=MICRO_ROWS, loss_scale=SCALE,
                             entropy_coeff=ENT, kl_coef=KL, use_kl_loss=True)
    fns = build_step_functions(graphdef, params, optimizer, config, mesh, response_len=R,
                               micro_batches=micro_batches, temperature=T)
    params = jax.device_put(params, fns.param_shardings)
    host = jax.tree.map(np.asarray, grpo_batch(seed=3, b=B))
    order = grpo.seed_row_order(host.valid_BT.sum(-1), RANKS)  # what the trainer applies
    batch = TrainBatch(*(jnp.asarray(x[order]) for x in host))
    before = jax.device_get(params)
    new, _, metrics = fns.update(params, init_opt_state(optimizer, params, fns.opt_shardings),
                                 batch)
    return before, jax.device_get(new), jax.device_get(metrics)


@pytest.fixture(scope="module")
def port():
    """The seed's loss, gradient norm, clipped gradient and AdamW step for the batch."""
    graphdef, params = _fresh()
    host = jax.tree.map(np.asarray, grpo_batch(seed=3, b=B))

    def outputs(p):
        model = nnx.merge(graphdef, p)
        return completion_logprobs(model, jnp.asarray(host.tokens_BT),
                                   jnp.asarray(host.valid_BT), R, with_entropy=True,
                                   temperature=T)

    (logp, ent), vjp = jax.vjp(outputs, params)
    logp, ent = np.asarray(logp, np.float64), np.asarray(ent, np.float64)
    args = dict(old=host.old_logp_BR.astype(np.float64), ref=host.ref_logp_BR.astype(np.float64),
                adv=host.advantages_B.astype(np.float64),
                mask=host.response_mask_BR.astype(np.float64),
                order=port_balance_order(host.valid_BT.sum(-1).tolist(), RANKS),
                ranks=RANKS, micro_rows=MICRO_ROWS, mini_rows=MINI_ROWS, kl_coef=KL,
                entropy_coeff=ENT)
    loss = port_loss(logp, ent, **args)
    d_logp = numerical_grad(lambda x: port_loss(x, ent, **args), logp)
    d_ent = numerical_grad(lambda x: port_loss(logp, x, **args), ent)
    (grads,) = vjp((jnp.asarray(d_logp, jnp.float32), jnp.asarray(d_ent, jnp.float32)))
    flat, tree = jax.tree.flatten(jax.tree.map(lambda g: np.asarray(g, np.float64), grads))
    norm = float(np.sqrt(sum((g ** 2).sum() for g in flat)))
    max_norm = 0.5 * norm  # so the clip acts
    clipped, _ = torch_clip(flat, max_norm)
    # Adam's first step is lr·g/(|g| + eps): blind to the gradient's scale unless entries
    # are near eps, as a 1/32-scaled, clipped gradient of a large model's are. Clipping to
    # largest entries of 10·eps puts this one there, so the step tests scale, clip and eps.
    adam_max_norm = norm * 1e-7 / max(np.abs(g).max() for g in flat)
    p_flat = [np.asarray(p, np.float64) for p in jax.tree.leaves(params)]
    stepped = [torch_adamw_first_step(p, g, lr=LR, wd=WD)
               for p, g in zip(p_flat, torch_clip(flat, adam_max_norm)[0])]
    return dict(loss=loss, norm=norm, max_norm=max_norm, clipped=clipped, tree=tree,
                adam_max_norm=adam_max_norm, stepped=stepped)


@pytest.mark.parametrize("micro_batches", [1, 4])
def test_loss_and_gradient_norm_before_and_after_the_clip(port, micro_batches):
    clip_then_sgd = optax.chain(clip_by_global_norm_as_torch(port["max_norm"]), optax.sgd(1.0))
    before, after, metrics = _seed_update(clip_then_sgd, micro_batches)
    np.testing.assert_allclose(metrics["loss"], port["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], port["norm"], rtol=1e-4)
    # With plain SGD at rate 1 the parameter change is minus the clipped gradient.
    step = [np.asarray(b, np.float64) - np.asarray(a, np.float64)
            for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    largest = max(np.abs(g).max() for g in port["clipped"])
    for got, want in zip(step, port["clipped"]):
        # float32 parameters: the step is read back to ~1e-4 of the largest entry.
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * largest)
    clipped_norm = np.sqrt(sum((s ** 2).sum() for s in step))
    np.testing.assert_allclose(clipped_norm, port["max_norm"] / (1 + 1e-6 / port["norm"]),
                               rtol=1e-4)


def test_parameters_after_one_adamw_step(port):
    adamw = make_optimizer(lr=LR, weight_decay=WD, b1=0.9, b2=0.999, eps=1e-8,
                           grad_clip=port["adam_max_norm"])
    before, after, _ = _seed_update(adamw, micro_batches=2)
    moves = []
    for p0, got, want in zip(jax.tree.leaves(before), jax.tree.leaves(after), port["stepped"]):
        p0, got = np.asarray(p0, np.float64), np.asarray(got, np.float64)
        np.testing.assert_allclose(got - p0, want - p0, rtol=0, atol=LR * 5e-3)
        moves.append(np.abs(want - p0).max())
    assert 0.5 * LR < max(moves) < LR  # the steps are eps-limited, not lr·sign(g)


@pytest.mark.slow  # a control of the port, not of jaxzero
def test_whole_batch_token_mean_is_not_the_seed_loss(port):
    """The corrected mode differs from the seed's: a check that the port can tell them apart."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, params = _fresh()
    optimizer = optax.sgd(1.0)
    config = grpo.LossConfig(entropy_coeff=ENT, kl_coef=KL, use_kl_loss=True)
    fns = build_step_functions(graphdef, params, optimizer, config, mesh, response_len=R,
                               temperature=T)
    _, _, metrics = fns.update(jax.device_put(params, fns.param_shardings),
                               init_opt_state(optimizer, params, fns.opt_shardings),
                               grpo_batch(seed=3, b=B))
    assert abs(float(metrics["loss"]) - port["loss"]) > 1e-3 * abs(port["loss"])


# ---- temperature in every log-prob pass ------------------------------------------------------

@pytest.fixture(scope="module")
def sampled():
    graphdef, params = _fresh()
    sampler = Sampler(graphdef, TINY, max_new_tokens=R, stop_ids=(TINY.vocab_size - 1,),
                      pad_id=0, buckets=(8,))
    prompts = [[5, 17, 33, 9, 61, 2, 44], [70, 3, 12, 50]]
    out = jax.device_get(sampler.generate(params, prompts, key=jax.random.key(0), n=4,
                                          temperature=T))
    tokens = np.concatenate([out.prompt_tokens, out.tokens], 1)
    valid = np.concatenate([out.prompt_mask, out.mask], 1)
    return out, jnp.asarray(tokens), jnp.asarray(valid)


def _fns(temperature, optimizer=None):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, params = _fresh()
    optimizer = optimizer or make_optimizer(lr=1e-3, weight_decay=0.0, b1=0.9, b2=0.999,
                                            eps=1e-8, grad_clip=1.0)
    fns = build_step_functions(graphdef, params, optimizer, grpo.LossConfig(), mesh,
                               response_len=R, temperature=temperature)
    return fns, jax.device_put(params, fns.param_shardings), optimizer


def test_recomputed_logprobs_are_the_samplers_at_its_temperature(sampled):
    out, tokens, valid = sampled
    mask = np.asarray(out.mask)
    fns, params, _ = _fns(T)
    recomputed = np.asarray(fns.logprobs(params, tokens, valid))
    np.testing.assert_allclose(np.where(mask, recomputed, 0), np.where(mask, out.logprobs, 0),
                               atol=1e-4)
    # At temperature 1 the same pass scores another distribution.
    fns1, params1, _ = _fns(1.0)
    untempered = np.asarray(fns1.logprobs(params1, tokens, valid))
    assert np.abs(np.where(mask, untempered - out.logprobs, 0)).max() > 1e-2


def test_the_first_update_on_sampler_logprobs_has_ratio_one(sampled):
    out, tokens, valid = sampled
    fns, params, optimizer = _fns(T)
    mask = jnp.asarray(out.mask, jnp.float32)
    adv = jnp.asarray(np.linspace(-1.0, 1.0, mask.shape[0]), jnp.float32)
    batch = TrainBatch(tokens, valid, mask, adv, jnp.asarray(out.logprobs),
                       jnp.asarray(out.logprobs))
    _, _, metrics = fns.update(params, init_opt_state(optimizer, params, fns.opt_shardings),
                               batch)
    assert abs(float(metrics["approx_kl"])) < 1e-5 and float(metrics["clipfrac"]) == 0.0
    assert abs(float(metrics["kl"])) < 1e-6
