"""Sampler: greedy against transformers, log-probs, sampling statistics, compiles, KV cache,
sharding. Tiny random Qwen2 models, float32."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy import stats

from jaxzero.errors import ConfigError
from jaxzero.model.qwen2 import KVCache, ModelOptions, init_model
from jaxzero.model.config import Qwen2Config
from jaxzero.model.sampler import Sampler, SamplerLoop, finish_reasons, pad_prompts
from jaxzero.model.sampling import (SamplingParams, _ordered, _top_k, _top_p, sample_token,
                                    strategy_for)
from jaxzero.parallel.sharding import FSDP_TP, ShardingConfig, make_mesh, param_shardings

VOCAB, PAD = 96, 0
CONFIG = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     rope_theta=10000.0, tie_word_embeddings=False)
PROMPTS = [[5, 17, 33, 9, 61, 2, 44], [70, 3], [12, 50, 7, 81, 26], [90, 1, 64, 15]]


def _hf_model():
    """A tiny random transformers Qwen2, with weights large enough for peaked logits."""
    from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM as HFModel
    torch.manual_seed(0)
    hf = HFModel(HFConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.3,
        max_position_embeddings=256, attn_implementation="eager"))
    with torch.no_grad():  # HF zeroes the biases; random ones test their mapping too
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.3)
    return hf.eval()


def _copy_from_hf(hf):
    """jaxzero graphdef and state holding the HF model's weights (float32)."""
    model = init_model(CONFIG, ModelOptions())
    d, n, k, h = 32, 4, 2, 8
    t = lambda x: jnp.asarray(x.detach().numpy())
    sd = hf.state_dict()
    model.embed_VD[...] = t(sd["model.embed_tokens.weight"])
    model.norm_D[...] = t(sd["model.norm.weight"])
    model.lm_head_VD[...] = t(sd["lm_head.weight"])
    # Each HF layer's tensor becomes row i of the stacked parameter.
    w = lambda name, to_ours: jnp.stack([to_ours(t(sd[f"model.layers.{i}.{name}"]))
                                         for i in range(CONFIG.num_hidden_layers)])
    block = model.layers
    block.attn_norm_D[...] = w("input_layernorm.weight", lambda x: x)
    block.mlp_norm_D[...] = w("post_attention_layernorm.weight", lambda x: x)
    block.attn.q_DNH[...] = w("self_attn.q_proj.weight", lambda x: x.T.reshape(d, n, h))
    block.attn.q_bias_NH[...] = w("self_attn.q_proj.bias", lambda x: x.reshape(n, h))
    block.attn.k_DKH[...] = w("self_attn.k_proj.weight", lambda x: x.T.reshape(d, k, h))
    block.attn.k_bias_KH[...] = w("self_attn.k_proj.bias", lambda x: x.reshape(k, h))
    block.attn.v_DKH[...] = w("self_attn.v_proj.weight", lambda x: x.T.reshape(d, k, h))
    block.attn.v_bias_KH[...] = w("self_attn.v_proj.bias", lambda x: x.reshape(k, h))
    block.attn.o_NHD[...] = w("self_attn.o_proj.weight", lambda x: x.T.reshape(n, h, d))
    block.mlp.gate_DF[...] = w("mlp.gate_proj.weight", lambda x: x.T)
    block.mlp.up_DF[...] = w("mlp.up_proj.weight", lambda x: x.T)
    block.mlp.down_FD[...] = w("mlp.down_proj.weight", lambda x: x.T)
    return nnx.split(model)


@pytest.fixture(scope="module")
def models():
    hf = _hf_model()
    graphdef, state = _copy_from_hf(hf)
    return hf, graphdef, state


def _sampler(graphdef, **kw):
    kw = {"max_new_tokens": 12, "stop_ids": (), "pad_id": PAD, "buckets": (8, 16), **kw}
    return Sampler(graphdef, CONFIG, **kw)


def _hf_greedy(hf, prompts, max_new, stop_id):
    tokens, valid = pad_prompts(prompts, max(map(len, prompts)), PAD)
    out = hf.generate(torch.tensor(tokens, dtype=torch.long),
                      attention_mask=torch.tensor(valid, dtype=torch.long), do_sample=False,
                      max_new_tokens=max_new, min_new_tokens=0, eos_token_id=stop_id,
                      pad_token_id=PAD)
    gen = out[:, tokens.shape[1]:].numpy()
    return np.pad(gen, ((0, 0), (0, max_new - gen.shape[1])), constant_values=PAD)


def test_greedy_matches_transformers_and_stops(models):
    hf, graphdef, state = models
    free = _sampler(graphdef).generate(state, PROMPTS, key=jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(free.tokens),
                                  _hf_greedy(hf, PROMPTS, 12, stop_id=VOCAB + 1))
    # A stop id the model really emits, mid-way through one row and not in all.
    stop = int(np.asarray(free.tokens)[0, 4])
    out = _sampler(graphdef, stop_ids=(stop, VOCAB + 7)).generate(
        state, PROMPTS, key=jax.random.key(0), temperature=0.0)
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens, _hf_greedy(hf, PROMPTS, 12, stop_id=stop))
    stopped, lengths, mask = map(np.asarray, (out.stopped, out.lengths, out.mask))
    assert stopped[0] and not stopped.all()
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(tokens[row] == stop)
        expect = hits[0] + 1 if len(hits) else 12
        assert lengths[row] == expect and stopped[row] == bool(len(hits))
        assert mask[row].sum() == expect and mask[row, :expect].all()
        assert (tokens[row, expect:] == PAD).all()
    assert finish_reasons(stopped)[0] == "stop" and "length" in finish_reasons(stopped)
    np.testing.assert_array_equal(np.asarray(out.prompt_mask).sum(1), [len(p) for p in PROMPTS])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_a_full_forward(models, temperature):
    _, graphdef, state = models
    out = _sampler(graphdef).generate(state, PROMPTS[:2], key=jax.random.key(3), n=3,
                                      temperature=temperature)
    tokens = jnp.concatenate([out.prompt_tokens, out.tokens], axis=1)
    valid = jnp.concatenate([out.prompt_mask, out.mask], axis=1)
    logits, _ = nnx.merge(graphdef, state)(tokens, valid)
    t, r = out.prompt_tokens.shape[1], out.tokens.shape[1]
    logp = jax.nn.log_softmax(logits[:, t - 1: t + r - 1] / temperature, axis=-1)
    expect = jnp.take_along_axis(logp, out.tokens[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.where(out.mask, out.logprobs, 0.0),
                               np.where(out.mask, expect, 0.0), atol=1e-4)
    # n samples of one prompt share its prompt but (at temperature > 0) not their tokens.
    np.testing.assert_array_equal(out.prompt_tokens[0], out.prompt_tokens[2])
    assert not np.array_equal(out.tokens[0], out.tokens[1])


def _expected(logits, temperature, top_k, top_p):
    """The distribution the sampler should draw from, computed independently in numpy."""
    z = logits / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros_like(probs, bool)
    kept = probs[order[: top_k or len(probs)]]
    kept = kept / kept.sum()
    for rank, mass_before in enumerate(np.cumsum(kept) - kept):
        if mass_before < top_p:
            keep[order[rank]] = True
    out = np.where(keep, probs, 0.0)
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.85), (1.7, 4, 0.7)])
def test_sampling_frequencies(temperature, top_k, top_p):
    logits_V = np.log(np.array([0.32, 0.2, 0.16, 0.12, 0.08, 0.06, 0.04, 0.02]))
    draws = 20_000
    logits_BV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (draws, len(logits_V)))
    step = jax.jit(sample_token, static_argnums=3)
    tokens, logp = step(logits_BV, jax.random.key(7), SamplingParams.make(temperature, top_p, top_k),
                        strategy_for(temperature, top_p, top_k))
    counts = np.bincount(np.asarray(tokens), minlength=len(logits_V))
    expected = _expected(logits_V, temperature, top_k, top_p)
    assert counts[expected == 0].sum() == 0  # excluded tokens are never drawn
    live = expected > 0
    assert stats.chisquare(counts[live], expected[live] * draws).pvalue > 1e-3
    full = jax.nn.log_softmax(jnp.asarray(logits_V, jnp.float32) / temperature)
    np.testing.assert_allclose(logp, full[np.asarray(tokens)], atol=1e-5)


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (37, 1.0), (0, 0.5), (0, 0.99), (50, 0.9)])
def test_truncation_keeps_the_tokens_a_sort_keeps(top_k, top_p):
    """The bisection thresholds against a sort, on a wide vocab with negative logits."""
    logits_BV = 3.0 * jax.random.normal(jax.random.key(2), (3, 5000)) - 4.0
    weights_BV = jnp.exp(logits_BV - logits_BV.max(-1, keepdims=True))
    keys_BV = _ordered(logits_BV)
    kept = _top_p(_top_k(weights_BV, keys_BV, top_k) if top_k else weights_BV, keys_BV, top_p)
    for row in range(3):
        expect = _expected(np.asarray(logits_BV[row], np.float64), 1.0, top_k, top_p) > 0
        np.testing.assert_array_equal(np.asarray(kept[row]) > 0, expect)


def test_greedy_sampling_step_is_argmax_with_raw_logprobs():
    logits_BV = jax.random.normal(jax.random.key(1), (4, 10))
    tokens, logp = jax.jit(sample_token, static_argnums=3)(
        logits_BV, jax.random.key(0), SamplingParams.make(0.0, 0.5, 2), strategy_for(0.0, 0.5, 2))
    np.testing.assert_array_equal(tokens, jnp.argmax(logits_BV, -1))
    np.testing.assert_allclose(logp, jnp.max(jax.nn.log_softmax(logits_BV), -1), atol=1e-6)


def test_one_compile_per_bucket_and_strategy_and_values_are_traced():
    graphdef, state = nnx.split(init_model(CONFIG))
    sampler = _sampler(graphdef, max_new_tokens=4)
    # jit's cache is per wrapped function, shared by every Sampler: count what this one adds.
    before = SamplerLoop.decode._cache_size(), SamplerLoop.prefill._cache_size()
    for i, length in enumerate([9, 10, 12, 15, 16]):  # all in bucket 16, one strategy
        prompts = [[3] * length, [4] * (length - 5)]
        sampler.generate(state, prompts, key=jax.random.key(i), n=2,
                         temperature=[0.4, 0.5, 1.0, 1.3, 0.9][i], top_p=[0.95, 0.9][i % 2],
                         top_k=i + 1)
    assert SamplerLoop.decode._cache_size() - before[0] == 1
    assert SamplerLoop.prefill._cache_size() - before[1] == 1
    sampler.generate(state, [[3] * 9], key=jax.random.key(0), n=2, temperature=0.0)
    assert SamplerLoop.decode._cache_size() - before[0] == 2  # greedy: its own loop


def test_kv_cache_decoding_matches_full_recompute(models):
    _, graphdef, state = models
    model = nnx.merge(graphdef, state)
    step_fn = jax.jit(lambda *args: model(*args))
    sampler = _sampler(graphdef, max_new_tokens=5)
    tokens_PT, valid_PT = pad_prompts(PROMPTS, 8, PAD)
    n, cont = 2, np.array([[11, 12, 13, 14]] * 8, np.int32)  # any continuation tokens
    cache, logits_BV = sampler.loop(n).prefill(state, tokens_PT, valid_PT)
    full_tokens = np.concatenate([np.repeat(tokens_PT, n, 0), cont], axis=1)
    full_valid = np.concatenate([np.repeat(valid_PT, n, 0), np.ones_like(cont, bool)], axis=1)
    ref, _ = step_fn(full_tokens, full_valid)
    np.testing.assert_allclose(logits_BV, ref[:, 7], atol=1e-5)
    lengths = valid_PT.sum(1).repeat(n)
    for step in range(cont.shape[1]):
        logits, cache = step_fn(cont[:, step:step + 1], np.ones((8, 1), bool),
                                (lengths + step)[:, None], cache)
        np.testing.assert_allclose(logits[:, 0], ref[:, 8 + step], atol=1e-5)


def test_chunked_calls_match_one_call_and_long_prompts_are_refused(models):
    _, graphdef, state = models
    prompts = PROMPTS + [[7] * 12]  # the last one needs bucket 16
    one = _sampler(graphdef).generate(state, prompts, key=jax.random.key(0), temperature=0.0)
    chunked = _sampler(graphdef, max_prompts_per_call=2).generate(
        state, prompts, key=jax.random.key(0), temperature=0.0)
    for name, a, b in zip(one._fields, one, chunked):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)  # logprobs: other shapes
    with pytest.raises(ConfigError, match="17 tokens.*largest prompt bucket \\(16\\)"):
        _sampler(graphdef).generate(state, [[1] * 17], key=jax.random.key(0))


def test_sharded_greedy_equals_unsharded(models):
    _, graphdef, state = models
    prompts = PROMPTS[:3]  # 3 prompts over 4 data-parallel devices: padded, then dropped
    single = _sampler(graphdef).generate(state, prompts, key=jax.random.key(0), n=2,
                                         temperature=0.0)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    placed = jax.device_put(state, param_shardings(state, mesh))
    sharded = _sampler(graphdef, mesh=mesh).generate(placed, prompts, key=jax.random.key(0),
                                                     n=2, temperature=0.0)
    np.testing.assert_array_equal(single.tokens, sharded.tokens)
    np.testing.assert_allclose(single.logprobs, sharded.logprobs, atol=1e-4)
    assert sharded.tokens.shape == (6, 12)


def test_the_loop_is_a_frozen_hashable_static_argument():
    graphdef, _ = nnx.split(init_model(CONFIG))
    sampler = _sampler(graphdef)
    a, b = sampler.loop(2), _sampler(graphdef).loop(2)
    assert a == b and hash(a) == hash(b)  # equal loops share their compilations
    assert a != sampler.loop(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.n = 4


def test_cache_and_rows_land_on_the_tables_shardings(models):
    """On (data 1, fsdp 4, tensor 2) the prefill's cache is the table's cache_LBKSH (K heads
    over tensor), the one the planner counts, and the outputs' rows go over (data, fsdp)."""
    _, graphdef, state = models
    mesh = make_mesh(1, 4, 2)
    placed = jax.device_put(state, param_shardings(state, mesh))
    sampler = _sampler(graphdef, mesh=mesh, max_new_tokens=3)
    tokens_PT, valid_PT = pad_prompts(PROMPTS, 8, PAD)
    loop = sampler.loop(2)
    cache, logits_BV = loop.prefill(placed, sampler._put(tokens_PT), sampler._put(valid_PT))
    want = KVCache.shardings(CONFIG, mesh, FSDP_TP)
    assert want.k_LBKSH.spec == P(None, ("data", "fsdp"), "tensor", None, None)
    assert cache.k_LBKSH.sharding.is_equivalent_to(want.k_LBKSH, 5)
    slots = sampler.config.cache_slots(8)
    assert slots == 32  # 8 + 3 (the first token, then one chunk of 2 steps), in whole 32s
    assert cache.k_LBKSH.addressable_shards[0].data.shape == (2, len(PROMPTS) * 2 // 4, 1, slots, 8)
    assert cache.valid_BS.sharding.is_equivalent_to(want.valid_BS, 2)
    out = loop.decode(placed, cache, logits_BV, sampler._put(valid_PT.sum(1).repeat(2)),
                      jax.random.key(0), SamplingParams.make(0.0))
    assert cache.k_LBKSH.is_deleted()  # donated: the loop wrote into it
    rows = lambda ndim: NamedSharding(mesh, P(("data", "fsdp"), *[None] * (ndim - 1)))
    assert out.tokens_BR.sharding.is_equivalent_to(rows(2), 2)
    assert out.lengths_B.sharding.is_equivalent_to(rows(1), 1)


def test_a_model_built_with_another_table_is_refused():
    graphdef, state = nnx.split(init_model(
        CONFIG, ModelOptions(sharding=ShardingConfig.replicated())))
    with pytest.raises(ConfigError, match="not the sampler's table"):
        _sampler(graphdef).generate(state, PROMPTS[:1], key=jax.random.key(0))
