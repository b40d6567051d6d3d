"""The chunked decode loop: static strategies against the per-token-branching sampler they
replace, stop ids mid-chunk, reads of only the filled cache, and the compiled loop's shape."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxzero.model.config import Qwen2Config
from jaxzero.model.qwen2 import init_model
from jaxzero.model.sampler import Sampler, SamplerConfig, pad_prompts
from jaxzero.model.sampling import (Greedy, Sampled, SamplingParams, _draw, _ordered, _top_k,
                                    _top_p, sample_token, strategy_for)

VOCAB, PAD = 64, 0
CONFIG = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     rope_theta=10000.0, tie_word_embeddings=False)
PROMPTS = [[5, 17, 33, 9, 61, 2, 44], [40, 3], [12, 50, 7, 81 % VOCAB, 26], [60, 1, 33, 15]]
R, CHUNK, BLOCK = 14, 4, 4
# (temperature, top_p, top_k) per strategy
CASES = {"greedy": (0.0, 1.0, 0), "sampled": (0.8, 1.0, 0), "top-k": (1.0, 1.0, 5),
         "top-p": (1.0, 0.8, 0), "top-k-top-p": (1.3, 0.9, 20)}


def branching_sample_token(logits_BV, key, params: SamplingParams):
    """The sampler's previous step, kept as the reference: one `lax.cond` per choice, taken
    per token on the traced values."""
    greedy = params.temperature <= 0
    scaled_BV = logits_BV / jnp.where(greedy, 1.0, params.temperature)
    max_B1 = scaled_BV.max(-1, keepdims=True)
    weights_BV = jnp.exp(scaled_BV - max_B1)
    lse_B = max_B1[:, 0] + jnp.log(weights_BV.sum(-1))

    def sample(weights_BV):
        key_BV = _ordered(scaled_BV)
        weights_BV = jax.lax.cond(params.top_k > 0, _top_k, lambda w, *_: w,
                                  weights_BV, key_BV, params.top_k)
        weights_BV = jax.lax.cond(params.top_p < 1, _top_p, lambda w, *_: w,
                                  weights_BV, key_BV, params.top_p)
        return _draw(weights_BV, key)

    tokens_B = jax.lax.cond(greedy, lambda w: jnp.argmax(scaled_BV, -1).astype(jnp.int32),
                            sample, weights_BV)
    picked_B = jnp.take_along_axis(scaled_BV, tokens_B[:, None], axis=-1)[:, 0]
    return tokens_B, picked_B - lse_B


@pytest.mark.parametrize("case", list(CASES))
def test_static_strategies_draw_what_the_branching_step_drew(case):
    temperature, top_p, top_k = CASES[case]
    logits_BV = 2.0 * jax.random.normal(jax.random.key(4), (64, 300))
    params = SamplingParams.make(temperature, top_p, top_k)
    for seed in range(3):
        key = jax.random.key(seed)
        want = jax.jit(branching_sample_token)(logits_BV, key, params)
        got = jax.jit(sample_token, static_argnums=3)(logits_BV, key, params,
                                                      strategy_for(temperature, top_p, top_k))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    assert strategy_for(temperature, top_p, top_k) == (
        Greedy() if case == "greedy" else Sampled(top_k=top_k > 0, top_p=top_p < 1))


@pytest.fixture(scope="module")
def model():
    return nnx.split(init_model(CONFIG, seed=3))


def _sampler(graphdef, **kw):
    kw = {"max_new_tokens": R, "stop_ids": (), "pad_id": PAD, "buckets": (8,), "chunk": CHUNK,
          "cache_block": BLOCK, **kw}
    return Sampler(graphdef, CONFIG, **kw)


def _reference(graphdef, state, key, params, n):
    """Token by token on the host, as the previous loop did: the prefill's cache, one jitted
    model step per token, the branching sampling step with fold_in(key, step); no stops."""
    sampler = _sampler(graphdef)
    tokens_PT, valid_PT = pad_prompts(PROMPTS, 8, PAD)
    cache, logits_BV = sampler.loop(n).prefill(state, tokens_PT, valid_PT)
    positions_B = valid_PT.sum(1).repeat(n)
    step = jax.jit(lambda s, tok, pos, cache: nnx.merge(graphdef, s)(
        tok, jnp.ones(tok.shape, bool), pos, cache))
    draw = jax.jit(branching_sample_token)
    tokens, logps = [], []
    for i in range(R):
        if i:
            logits_B1V, cache = step(state, tokens[-1][:, None], (positions_B + i - 1)[:, None],
                                     cache)
            logits_BV = logits_B1V[:, 0]
        tok, logp = draw(logits_BV, jax.random.fold_in(key, i), params)
        tokens.append(tok)
        logps.append(logp)
    return np.stack(tokens, 1), np.stack(logps, 1)


def _stopped_at(tokens_BR, logps_BR, stop):
    """The reference with a stop id applied: pads and zero log-probs after the first stop."""
    tokens, logps, lengths = tokens_BR.copy(), logps_BR.copy(), []
    for row in range(len(tokens)):
        hits = np.flatnonzero(tokens[row] == stop)
        length = hits[0] + 1 if len(hits) else R
        tokens[row, length:], logps[row, length:] = PAD, 0.0
        lengths.append(length)
    return tokens, logps, np.array(lengths)


@pytest.mark.parametrize("case", ["greedy", pytest.param("top-k-top-p", marks=pytest.mark.slow)])
def test_loop_matches_the_token_by_token_reference_and_stops_mid_chunk(model, case):
    graphdef, state = model
    temperature, top_p, top_k = CASES[case]
    params, key, n = SamplingParams.make(temperature, top_p, top_k), jax.random.key(11), 2
    want_tokens, want_logps = _reference(graphdef, state, key, params, n)
    # A stop id that row 0 first emits at step 6: the middle of the loop's second chunk.
    stop = next(int(t) for t in want_tokens[0, 6:] if t not in want_tokens[0, :6])
    want_tokens, want_logps, want_lengths = _stopped_at(want_tokens, want_logps, stop)
    assert 0 < want_lengths.min() < R and (want_lengths % CHUNK != 1).any()

    sampler = _sampler(graphdef, stop_ids=(stop,))
    tokens_PT, valid_PT = pad_prompts(PROMPTS, 8, PAD)
    out = sampler.sample_padded(state, tokens_PT, valid_PT, key=key, params=params, n=n,
                                strategy=strategy_for(temperature, top_p, top_k))
    np.testing.assert_array_equal(out.tokens, want_tokens)
    np.testing.assert_allclose(out.logprobs, want_logps, atol=2e-6)
    np.testing.assert_array_equal(out.lengths, want_lengths)
    np.testing.assert_array_equal(out.stopped, want_lengths < R)
    np.testing.assert_array_equal(out.mask, np.arange(R)[None] < want_lengths[:, None])


def test_reading_only_the_filled_blocks_changes_nothing(model):
    """Blocks of 4 slots (a chunk reads 20, 24 or 28 slots, or all 32) against one
    whole-cache read, on a sampled strategy."""
    graphdef, state = model
    config = SamplerConfig(R, (), PAD, chunk=CHUNK, cache_block=BLOCK)
    # 8 + 17 slots, rounded up to whole SLOT_MULTIPLEs (32).
    assert config.steps == 17 and config.cache_slots(8) == 32
    # The first chunk is taken to start after 32 - 17 = 15 prompt slots (15 + 4 steps: 20).
    assert config.read_prefixes(32) == (20, 24, 28, 32)
    assert [int(config.read_index(8 + start - 1, 32)) for start in (1, 5, 9, 13)] == [0, 0, 0, 1]
    blocked = _sampler(graphdef).generate(state, PROMPTS, key=jax.random.key(2), n=2,
                                          temperature=0.9, top_k=10)
    whole = _sampler(graphdef, cache_block=None).generate(
        state, PROMPTS, key=jax.random.key(2), n=2, temperature=0.9, top_k=10)
    np.testing.assert_array_equal(blocked.tokens, whole.tokens)
    np.testing.assert_allclose(blocked.logprobs, whole.logprobs, atol=1e-6)


def _computations(hlo: str) -> dict[str, str]:
    """HLO module text split into {computation name: its body}."""
    parts = re.split(r"\n(?=(?:ENTRY )?%?[\w.\-]+ [(].*[{]\s*$)", hlo, flags=re.M)
    out = {}
    for part in parts:
        m = re.match(r"(?:ENTRY )?%?([\w.\-]+) ", part.strip())
        if m:
            out[m.group(1)] = part
    return out


def _reachable(comps: dict[str, str], root: str) -> set[str]:
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        todo += re.findall(r"(?:calls|body|condition|to_apply|branch_computations|"
                           r"true_computation|false_computation)=\{?%?([\w.\-]+)", comps[name])
        for group in re.findall(r"branch_computations=\{([^}]*)\}", comps[name]):
            todo += [g.strip().lstrip("%") for g in group.split(",")]
    return seen


def test_the_per_token_loop_has_a_fixed_trip_count_and_no_conditional(model):
    graphdef, state = model
    sampler = _sampler(graphdef)
    tokens_PT, valid_PT = pad_prompts(PROMPTS, 8, PAD)
    cache, logits_BV = sampler.loop(2).prefill(state, tokens_PT, valid_PT)
    loop = sampler.loop(2, strategy_for(1.0, 0.9, 5))
    hlo = loop.decode.lower(loop, state, cache, logits_BV, valid_PT.sum(1).repeat(2),
                            jax.random.key(0), SamplingParams.make(1.0, 0.9, 5)
                            ).compile().as_text()
    comps = _computations(hlo)
    token_loops = re.findall(r"while\(.*body=%?([\w.\-]+).*\"known_trip_count\":\{\"n\":\""
                             + str(CHUNK) + r"\"\}", hlo)
    assert token_loops, "no while loop of the chunk's fixed trip count"
    for body in token_loops:
        inside = _reachable(comps, body)
        assert not [c for c in inside if " conditional(" in comps[c]], body
        assert any(" dot(" in comps[c] or "dot(" in comps[c] for c in inside)  # the model
