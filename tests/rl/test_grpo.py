"""GRPO math against an independent, loop-based numpy reference of verl's definitions."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxzero.rl import grpo

MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KINDS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")


# ---- numpy reference: plain loops, written from the definitions, not from grpo.py ----

def ref_advantages(scores, group_size, eps=1e-6, scale_by_std=True):
    out = np.zeros(len(scores), np.float64)
    for start in range(0, len(scores), group_size):
        group = [float(s) for s in scores[start:start + group_size]]
        if len(group) == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(group) / len(group)
            std = math.sqrt(sum((g - mean) ** 2 for g in group) / (len(group) - 1))
        for i, s in enumerate(group):
            out[start + i] = (s - mean) / (std + eps) if scale_by_std else s - mean
    return out


def ref_kl(logp, ref, kind):
    out = np.zeros(logp.shape, np.float64)
    for idx in np.ndindex(logp.shape):
        d = float(logp[idx]) - float(ref[idx])
        if kind in ("k1", "kl"):
            out[idx] = d
        elif kind == "abs":
            out[idx] = abs(d)
        elif kind in ("k2", "mse"):
            out[idx] = 0.5 * d * d
        else:
            x = min(max(-d, -20.0), 20.0)
            out[idx] = min(max(math.exp(x) - x - 1.0, -10.0), 10.0)
    return out


def ref_aggregate(x, mask, mode):
    rows, cols = x.shape
    row_sums = [sum(float(x[b, t]) * float(mask[b, t]) for t in range(cols)) for b in range(rows)]
    row_counts = [sum(float(mask[b, t]) for t in range(cols)) for b in range(rows)]
    nonempty = sum(1 for c in row_counts if c > 0)
    if mode == "token-mean":
        total = sum(row_counts)
        return sum(row_sums) / total if total else 0.0
    if mode == "seq-mean-token-sum":
        return sum(row_sums) / nonempty if nonempty else 0.0
    if mode == "seq-mean-token-mean":
        per_row = [s / c for s, c in zip(row_sums, row_counts) if c > 0]
        return sum(per_row) / nonempty if nonempty else 0.0
    return sum(row_sums) / (rows * cols)


def ref_policy_loss(logp, old, adv, mask, clip_low, clip_high, clip_c, mode):
    rows, cols = logp.shape
    loss = np.zeros((rows, cols))
    clipped = np.zeros((rows, cols))
    lower = np.zeros((rows, cols))
    neg_log_ratio = np.zeros((rows, cols))
    for b in range(rows):
        for t in range(cols):
            a = float(adv[b])
            lr = min(max(float(logp[b, t]) - float(old[b, t]), -20.0), 20.0)
            r = math.exp(lr)
            l1 = -a * r
            l2 = -a * min(max(r, 1 - clip_low), 1 + clip_high)
            value = max(l1, l2)
            clipped[b, t] = float(l2 > l1)
            if clip_c is not None and a < 0:
                lower[b, t] = float(value > -a * clip_c)
                value = min(value, -a * clip_c)
            loss[b, t] = value
            neg_log_ratio[b, t] = -lr
    metrics = {"clipfrac": ref_aggregate(clipped, mask, "token-mean"),
               "clipfrac_lower": ref_aggregate(lower, mask, "token-mean"),
               "approx_kl": ref_aggregate(neg_log_ratio, mask, "token-mean")}
    return ref_aggregate(loss, mask, mode), metrics


def ref_log_softmax(logits):
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ---- fixtures ----

def random_batch(seed, rows=16, cols=12):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.5, 0.6, (rows, cols)).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, (rows, cols))).astype(np.float32)
    ref = (logp + rng.normal(0, 0.5, (rows, cols))).astype(np.float32)
    adv = rng.normal(0, 1, rows).astype(np.float32)
    lengths = rng.integers(1, cols + 1, rows)
    mask = (np.arange(cols)[None, :] < lengths[:, None]).astype(np.float32)
    mask[3] = 0.0   # an all-masked row
    mask[10] = 0.0
    entropy = rng.uniform(0, 3, (rows, cols)).astype(np.float32)
    return logp, old, ref, adv, mask, entropy


# ---- advantages ----

@pytest.mark.parametrize("group_size", [1, 2, 4, 8])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages(group_size, scale_by_std):
    scores = np.random.default_rng(0).integers(0, 3, 16).astype(np.float32) * 0.5
    scores[:group_size] = 1.0   # a zero-spread group
    got = jax.jit(functools.partial(grpo.group_advantages, group_size=group_size,
                                    scale_by_std=scale_by_std))(scores)
    np.testing.assert_allclose(got, ref_advantages(scores, group_size, scale_by_std=scale_by_std),
                               rtol=1e-5, atol=1e-5)
    assert got.dtype == jnp.float32


def test_group_advantages_hand_computed():
    got = grpo.group_advantages(np.array([1.0, 0.0, 1.0, 0.0]), 4, eps=0.0)
    std = math.sqrt(1 / 3)   # unbiased: Σ(0.5²)·4 / 3
    np.testing.assert_allclose(got, [0.5 / std, -0.5 / std, 0.5 / std, -0.5 / std], rtol=1e-6)
    np.testing.assert_allclose(grpo.group_advantages(np.array([2.0, 5.0]), 1), [2.0, 5.0],
                               rtol=1e-5)


def test_group_advantages_rejects_ragged_batch():
    with pytest.raises(ValueError, match="divide"):
        grpo.group_advantages(np.zeros(6), 4)


# ---- KL ----

@pytest.mark.parametrize("kind", KINDS)
def test_kl_penalty(kind):
    logp, _, ref, *_ = random_batch(1)
    logp[0, 0], ref[0, 0] = -40.0, 0.0    # exercise both clips of k3
    logp[0, 1], ref[0, 1] = 0.0, -40.0
    got = jax.jit(functools.partial(grpo.kl_penalty, kind=kind))(logp, ref)
    np.testing.assert_allclose(got, ref_kl(logp, ref, kind), rtol=1e-5, atol=1e-5)


def test_kl_penalty_unknown_kind_names_valid_ones():
    with pytest.raises(ValueError, match="low_var_kl"):
        grpo.kl_penalty(jnp.zeros(2), jnp.zeros(2), "full")


# ---- aggregation ----

@pytest.mark.parametrize("mode", MODES)
def test_aggregate(mode):
    logp, *_, mask, _ = random_batch(2)
    got = jax.jit(functools.partial(grpo.aggregate, mode=mode))(logp, mask)
    np.testing.assert_allclose(got, ref_aggregate(logp, mask, mode), rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_all_masked_is_zero_not_nan(mode):
    x = jnp.full((4, 5), jnp.nan)
    assert float(grpo.aggregate(x, jnp.zeros((4, 5)), mode)) == 0.0


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        grpo.aggregate(jnp.zeros((2, 2)), jnp.ones((2, 2)), "sum")


def micro_slices(rows, parts=4):
    step = rows // parts
    return [slice(i * step, (i + 1) * step) for i in range(parts)]


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_micro_batches_sum_to_full(mode):
    logp, *_, mask, _ = random_batch(3)
    mask[4:8] = 0.0   # a micro-batch with no valid token at all
    norm = grpo.aggregation_norms(mask, mode)
    parts = sum(float(grpo.aggregate(logp[s], mask[s], mode, norm=norm))
                for s in micro_slices(len(logp)))
    np.testing.assert_allclose(parts, float(grpo.aggregate(logp, mask, mode)), rtol=1e-6)


# ---- policy loss ----

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clips", [(0.2, 0.2, None), (0.2, 0.28, None), (0.2, 0.2, 3.0),
                                   (0.1, 0.3, 1.5)])
def test_policy_loss(mode, clips):
    clip_low, clip_high, clip_c = clips
    logp, old, _, adv, mask, _ = random_batch(4)
    shift = np.array([1.5, -1.5, 0.0])[np.arange(old.shape[1]) % 3]   # clip both ways
    old = (old + shift).astype(np.float32)
    # Eager: jit-ability is covered by the grpo_loss tests, and 16 compiles are slow.
    loss, metrics = grpo.policy_loss(logp, old, adv, mask, clip_low=clip_low,
                                     clip_high=clip_high, clip_c=clip_c, agg=mode)
    want_loss, want = ref_policy_loss(logp, old, adv, mask, clip_low, clip_high, clip_c, mode)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    for key, value in want.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert 0 < float(metrics["clipfrac"]) < 1
    if clip_c is not None:
        assert float(metrics["clipfrac_lower"]) > 0


def test_policy_loss_token_advantages_match_row_advantages():
    logp, old, _, adv, mask, _ = random_batch(5)
    adv_BT = np.repeat(adv[:, None], logp.shape[1], axis=1)
    a, _ = grpo.policy_loss(logp, old, adv, mask)
    b, _ = grpo.policy_loss(logp, old, adv_BT, mask)
    assert float(a) == float(b)


def test_policy_loss_hand_computed():
    # ratio e^0.5 ≈ 1.65 with A = 1 clips at 1.2; ratio e^-1 ≈ 0.37 with A = -2 clips at 0.8
    # and then the dual clip (c = 3) does not bind; loss = mean(-1.2, 2·0.8) = 0.2.
    logp = jnp.array([[0.5, -1.0]])
    old = jnp.zeros((1, 2))
    adv = jnp.array([[1.0, -2.0]])
    loss, m = grpo.policy_loss(logp, old, adv, jnp.ones((1, 2)), clip_c=3.0)
    np.testing.assert_allclose(loss, 0.2, rtol=1e-6)
    np.testing.assert_allclose(m["clipfrac"], 1.0)
    np.testing.assert_allclose(m["approx_kl"], 0.25, rtol=1e-6)
    # ratio e^2 with A = -1: unclipped −A·r = 7.39 exceeds the cap 3.
    loss, m = grpo.policy_loss(jnp.array([[2.0]]), jnp.zeros((1, 1)), jnp.array([-1.0]),
                               jnp.ones((1, 1)), clip_c=3.0)
    np.testing.assert_allclose(loss, 3.0, rtol=1e-6)
    np.testing.assert_allclose(m["clipfrac_lower"], 1.0)


# ---- logits → log-probs and entropy ----

def test_token_logprobs_and_entropy():
    rng = np.random.default_rng(6)
    logits = (rng.normal(0, 4, (3, 5, 33)) + 50.0).astype(np.float32)
    tokens = rng.integers(0, 33, (3, 5))
    logsm = ref_log_softmax(logits)
    want_logp = np.take_along_axis(logsm, tokens[..., None], -1)[..., 0]
    want_ent = -(np.exp(logsm) * logsm).sum(-1)
    logp = jax.jit(grpo.token_logprobs)(logits, tokens)
    ent = jax.jit(grpo.token_entropy)(logits)
    assert logp.dtype == ent.dtype == jnp.float32
    np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)


def test_token_logprobs_and_entropy_from_bfloat16():
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(0, 3, (2, 4, 17)), jnp.bfloat16)
    tokens = rng.integers(0, 17, (2, 4))
    logsm = ref_log_softmax(np.asarray(logits.astype(jnp.float32)))
    np.testing.assert_allclose(grpo.token_logprobs(logits, tokens),
                               np.take_along_axis(logsm, tokens[..., None], -1)[..., 0],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grpo.token_entropy(logits), -(np.exp(logsm) * logsm).sum(-1),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grpo.token_entropy(jnp.zeros((1, 1, 8))), [[math.log(8)]],
                               rtol=1e-6)


# ---- the composed loss ----

def config_for(mode, **kw):
    return grpo.LossConfig(clip_low=0.2, clip_high=0.28, clip_c=3.0, agg=mode,
                           entropy_coeff=0.01, use_kl_loss=True, kl_coef=0.1,
                           kl_kind="low_var_kl", **kw)


@pytest.mark.parametrize("mode", MODES)
def test_grpo_loss_composition(mode):
    logp, old, ref, adv, mask, entropy = random_batch(8)
    config = config_for(mode)
    loss, m = jax.jit(functools.partial(grpo.grpo_loss, config=config))(
        logp, old, ref, adv, mask, entropy_BR=entropy)
    pg, _ = ref_policy_loss(logp, old, adv, mask, 0.2, 0.28, 3.0, mode)
    ent = ref_aggregate(entropy, mask, mode)
    kl = ref_aggregate(ref_kl(logp, ref, "low_var_kl"), mask, mode)
    np.testing.assert_allclose(m["pg_loss"], pg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["entropy"], ent, rtol=1e-5)
    np.testing.assert_allclose(m["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(loss, pg - 0.01 * ent + 0.1 * kl, rtol=1e-5, atol=1e-6)


def test_grpo_loss_without_kl():
    logp, old, _, adv, mask, entropy = random_batch(9)
    config = grpo.LossConfig(use_kl_loss=False, entropy_coeff=0.0)
    loss, m = grpo.grpo_loss(logp, old, None, adv, mask, entropy_BR=entropy, config=config)
    assert float(m["kl"]) == 0.0
    assert float(loss) == float(m["pg_loss"])


def test_loss_config_validates():
    with pytest.raises(ValueError, match="token-mean"):
        grpo.LossConfig(agg="mean")
    with pytest.raises(ValueError, match="low_var_kl"):
        grpo.LossConfig(kl_kind="k4")
    with pytest.raises(ValueError, match="clip_c"):
        grpo.LossConfig(clip_c=1.0)
    hash(grpo.LossConfig())   # usable as a static jit argument


@pytest.mark.parametrize("mode", MODES)
def test_micro_batch_gradients_and_metrics_sum_to_full(mode):
    logp, old, ref, adv, mask, entropy = random_batch(10)
    mask[4:8] = 0.0
    config = config_for(mode)

    @jax.jit
    def value_and_grad(logp, old, ref, adv, mask, entropy, norm):
        f = lambda lp, ent: grpo.grpo_loss(lp, old, ref, adv, mask, entropy_BR=ent,
                                           config=config, norm=norm)
        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(logp, entropy)

    norm = grpo.aggregation_norms(mask, mode)
    (loss, metrics), (g_logp, g_ent) = value_and_grad(logp, old, ref, adv, mask, entropy, norm)
    loss_sum, metric_sums = 0.0, {k: 0.0 for k in metrics}
    g_logp_parts, g_ent_parts = [], []
    for s in micro_slices(len(logp)):
        (l, m), (gl, ge) = value_and_grad(logp[s], old[s], ref[s], adv[s], mask[s],
                                          entropy[s], norm)
        loss_sum += float(l)
        metric_sums = {k: metric_sums[k] + float(m[k]) for k in metrics}
        g_logp_parts.append(gl)
        g_ent_parts.append(ge)
    # Scalars differ only by float32 summation order over O(1) terms of both signs.
    np.testing.assert_allclose(loss_sum, loss, rtol=1e-6, atol=1e-6)
    for k in metrics:
        np.testing.assert_allclose(metric_sums[k], metrics[k], rtol=1e-6, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(np.concatenate(g_logp_parts), g_logp, rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.concatenate(g_ent_parts), g_ent, rtol=1e-6, atol=0)
    assert np.all(np.asarray(g_logp)[mask == 0] == 0)


# ---- seed-micro-token-mean: DiagnosisZero's per-micro-batch token means ----

def ref_seed_aggregate(x, mask, group_rows):
    """Mean over consecutive blocks of group_rows rows of each block's token mean."""
    means = []
    for start in range(0, x.shape[0], group_rows):
        block = slice(start, start + group_rows)
        means.append(ref_aggregate(x[block], mask[block], "token-mean"))
    return sum(means) / len(means)


def _logp_mask(seed, b, t):
    logp, _, _, _, mask, _ = random_batch(seed, rows=b, cols=t)
    return jnp.asarray(logp), jnp.asarray(mask)


def test_seed_aggregate_is_the_mean_of_group_token_means():
    logp, mask = _logp_mask(seed=5, b=16, t=6)
    for rows in (1, 2, 4, 8):
        got = grpo.aggregate(logp, mask, grpo.SEED_AGG,
                             norm=grpo.aggregation_norms(mask, grpo.SEED_AGG, group_rows=rows))
        np.testing.assert_allclose(got, ref_seed_aggregate(np.asarray(logp), np.asarray(mask),
                                                            rows), rtol=1e-5)
    # One group of the whole batch is the whole-batch token mean.
    whole = grpo.aggregation_norms(mask, grpo.SEED_AGG, group_rows=16)
    np.testing.assert_allclose(grpo.aggregate(logp, mask, grpo.SEED_AGG, norm=whole),
                               grpo.aggregate(logp, mask, "token-mean"), rtol=1e-6)
    with pytest.raises(ValueError, match="needs group_rows"):
        grpo.aggregation_norms(mask, grpo.SEED_AGG)
    with pytest.raises(ValueError, match="divide the batch"):
        grpo.aggregation_norms(mask, grpo.SEED_AGG, group_rows=5)


def test_seed_aggregate_is_exact_under_any_row_split():
    """Rows split any way (strided, as the update's micro-batches) carry their group's
    normaliser with them, and the parts sum to the whole."""
    logp, mask = _logp_mask(seed=6, b=16, t=5)
    norm = grpo.aggregation_norms(mask, grpo.SEED_AGG, group_rows=4)
    whole = float(grpo.aggregate(logp, mask, grpo.SEED_AGG, norm=norm))
    for parts in ([range(0, 16, 2), range(1, 16, 2)], [[0], range(1, 16)],
                  [range(m, 16, 4) for m in range(4)]):
        total = 0.0
        for rows in parts:
            rows = np.array(rows)
            part_norm = dataclasses.replace(norm, group_tokens_B=norm.group_tokens_B[rows])
            total += float(grpo.aggregate(logp[rows], mask[rows], grpo.SEED_AGG,
                                          norm=part_norm))
        np.testing.assert_allclose(total, whole, rtol=1e-6)


def test_loss_scale_scales_the_loss_not_the_metrics():
    logp, mask = _logp_mask(seed=7, b=16, t=5)
    adv = jnp.linspace(-1.0, 1.0, 16)
    kwargs = dict(entropy_BR=jnp.ones_like(logp))
    base = grpo.LossConfig(agg=grpo.SEED_AGG, group_rows=2)
    scaled = grpo.LossConfig(agg=grpo.SEED_AGG, group_rows=2, loss_scale=1 / 32)
    a, ma = grpo.grpo_loss(logp, logp - 0.1, logp, adv, mask, config=base, **kwargs)
    b, mb = grpo.grpo_loss(logp, logp - 0.1, logp, adv, mask, config=scaled, **kwargs)
    np.testing.assert_allclose(float(b), float(a) / 32, rtol=1e-6)
    assert jax.tree.map(float, ma) == jax.tree.map(float, mb)
    with pytest.raises(ValueError, match="group_rows is needed"):
        grpo.LossConfig(agg=grpo.SEED_AGG)
    with pytest.raises(ValueError, match="group_rows is needed"):
        grpo.LossConfig(group_rows=4)
    with pytest.raises(ValueError, match="loss_scale"):
        grpo.LossConfig(loss_scale=0.0)
