"""Where one decode step of the rollout benchmark spends its time, part by part.

The same Qwen2.5-0.5B-shaped random model and batch as `benchmarks/rollout.py` (32 rows, a
256-slot KV cache); each part is its own jitted function, timed best-of-`--repeats` after a
warm-up:

- `layers`: the 24 decoder blocks on one new token, the cache donated (updated in place, as
  in the sampler's while loop);
- `layers_no_cache`: the same blocks with no cache, so attention sees one token: the dense
  matmuls alone, nearly;
- `lm_head`: the [32, D] x [V, D]^T logits matmul, in float32 out;
- `lm_head_DV`: the same product with the weight stored [D, V] (a layout probe: jaxzero keeps
  HF's [V, D], which the tied embedding's row gather needs);
- `sample`: one temperature-1 draw from [32, V] float32 logits with its log-probs;
- `sampler_step`: the real thing, (generate(33 tokens) - generate(1 token)) / 32.

XLA flags go in through the environment, so compare them run by run:

    /work/venv/bin/python benchmarks/decode_profile.py --dtype float32
    XLA_FLAGS=--xla_cpu_use_xnnpack=true /work/venv/bin/python benchmarks/decode_profile.py

It prints a line per part with the bytes of weights it reads and the GB/s that makes, and
ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxzero.model.qwen2 import KVCache, ModelOptions, init_model
from jaxzero.model.config import preset
from jaxzero.model.sampler import Sampler
from jaxzero.model.sampling import Sampled, SamplingParams, sample_token

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.hardware import best_seconds  # noqa: E402

BATCH, SLOTS, FILLED = 32, 256, 200


def best_ms(fn, repeats: int) -> float:
    """Best of `repeats` calls of `fn` (its result waited for) after one warm-up, in ms."""
    return 1e3 * best_seconds(lambda: jax.block_until_ready(fn()), repeats)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", help="params = compute = cache dtype")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    cfg = preset("qwen2.5-0.5b")
    dt = jnp.dtype(args.dtype)
    graphdef, state = nnx.split(init_model(cfg, ModelOptions(param_dtype=dt, compute_dtype=dt)))
    tok_B1 = jnp.ones((BATCH, 1), jnp.int32)
    valid_B1 = jnp.ones((BATCH, 1), jnp.bool_)
    pos_B1 = jnp.full((BATCH, 1), FILLED, jnp.int32)

    def fresh_cache() -> KVCache:
        cache = KVCache.empty(cfg, BATCH, SLOTS, dt)
        return cache._replace(valid_BS=cache.valid_BS.at[:, :FILLED].set(True),
                              end=jnp.int32(FILLED))

    layers = jax.jit(lambda s, c: nnx.merge(graphdef, s).hidden_states(
        tok_B1, valid_B1, pos_B1, c), donate_argnums=(1,))
    box = {"cache": fresh_cache()}

    def run_layers():
        h, cache = layers(state, box["cache"])
        box["cache"] = cache._replace(end=jnp.int32(FILLED))  # write the same slot each time
        return h

    no_cache = jax.jit(lambda s: nnx.merge(graphdef, s).hidden_states(
        tok_B1, valid_B1, pos_B1, None)[0])
    h_B1D = jnp.ones((BATCH, 1, cfg.hidden_size), dt)
    head = jax.jit(lambda s, h: nnx.merge(graphdef, s).logits(h))
    w_DV = jnp.ones((cfg.hidden_size, cfg.vocab_size), dt)
    head_dv = jax.jit(lambda h, w: jnp.einsum("BTD,DV->BTV", h, w,
                                              preferred_element_type=jnp.float32))
    logits_BV = jax.random.normal(jax.random.key(0), (BATCH, cfg.vocab_size), jnp.float32)
    params = SamplingParams.make(1.0)
    sample = jax.jit(lambda l, k: sample_token(l, k, params, Sampled()))

    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 150_000, rng.integers(64, 129)).tolist() for _ in range(8)]

    def generate_ms(new_tokens: int) -> float:
        sampler = Sampler(graphdef, cfg, max_new_tokens=new_tokens, stop_ids=(-1,), pad_id=0,
                          buckets=(128,))
        calls = iter(range(1_000))
        return best_ms(lambda: sampler.generate(state, prompts, key=jax.random.key(next(calls)),
                                                n=BATCH // 8).tokens, args.repeats)

    item = dt.itemsize
    embed = cfg.vocab_size * cfg.hidden_size
    layer_bytes = (cfg.num_params() - embed * (1 if cfg.tie_word_embeddings else 2)) * item
    parts = {
        "layers": (best_ms(run_layers, args.repeats), layer_bytes),
        "layers_no_cache": (best_ms(lambda: no_cache(state), args.repeats), layer_bytes),
        "lm_head": (best_ms(lambda: head(state, h_B1D), args.repeats), embed * item),
        "lm_head_DV": (best_ms(lambda: head_dv(h_B1D, w_DV), args.repeats), embed * item),
        "sample": (best_ms(lambda: sample(logits_BV, jax.random.key(1)), args.repeats), 0),
        "sampler_step": ((generate_ms(33) - generate_ms(1)) / 32, layer_bytes + embed * item),
    }
    print(f"decode step parts, {args.dtype}, batch {BATCH}, cache {SLOTS} slots, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    for name, (ms, nbytes) in parts.items():
        rate = f"{nbytes / ms / 1e6:6.1f} GB/s of weights" if nbytes else ""
        print(f"  {name:16s} {ms:8.1f} ms  {rate}")
    print(json.dumps({"bench": "decode_profile", "dtype": args.dtype,
                      "xla_flags": os.environ.get("XLA_FLAGS", ""),
                      "ms": {k: round(v[0], 1) for k, v in parts.items()}}))


if __name__ == "__main__":
    main()
