"""Rollout throughput on this CPU: jaxzero's sampler vs transformers `generate` vs tunix.

A Qwen2.5-0.5B-shaped model with random weights; 8 prompts x 4 samples = 32 sequences,
prompts of 64-128 tokens, 128 new tokens each at temperature 1, stop tokens ignored, so every
system generates the same number of tokens. Each system runs in float32 (the matched
comparison) and bfloat16; the script ends with one JSON line.

    /work/venv/bin/python benchmarks/rollout.py                       # everything (< 10 min)
    /work/venv/bin/python benchmarks/rollout.py --systems jaxzero --dtypes float32
    /work/venv/bin/python benchmarks/rollout.py --new-tokens 32       # a quick look

Timings are best-of-`--repeats` whole generate calls (prefill included), after one warm-up
call that compiles; the machine is shared, so a best is the least disturbed run. tunix needs
`pip install --no-deps google-tunix` plus its import-time deps (see rollout_results.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

SYSTEMS = ("jaxzero", "transformers", "tunix")
DTYPES = ("float32", "bfloat16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per system (best kept)")
    p.add_argument("--hf-caches", default="dynamic,static",
                   help="transformers cache implementations to try")
    p.add_argument("--xla-flags", default=None,
                   help="XLA_FLAGS for the jaxzero/tunix runs (default: leave the env's)")
    p.add_argument("--skip-hardware", action="store_true",
                   help="skip the bandwidth/matmul probes (no roofline)")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.xla_flags is not None:  # must happen before jax is imported
    os.environ["XLA_FLAGS"] = ARGS.xla_flags

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import hardware  # noqa: E402
from jaxzero.model_config import Qwen2Config, preset  # noqa: E402

NO_STOP = -1  # a token id no model emits: "stop tokens ignored"


@dataclasses.dataclass
class Result:
    system: str
    dtype: str
    generate_s: float          # best whole-generate time
    ttft_s: float              # prefill + first token
    compile_s: float           # first call minus a steady call (jaxzero, tunix)
    tokens: int
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.generate_s


def make_prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 150_000, rng.integers(64, 129)).tolist() for _ in range(count)]


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ----------------------------------------------------------------------------- jaxzero


def run_jaxzero(cfg: Qwen2Config, dtype: str, prompts, args) -> Result:
    from flax import nnx
    from jaxzero.model import ModelOptions, init_model
    from jaxzero.sampler import Sampler

    dt = jnp.dtype(dtype)
    graphdef, state = nnx.split(init_model(cfg, ModelOptions(param_dtype=dt, compute_dtype=dt)))
    sampler = Sampler(graphdef, cfg, max_new_tokens=args.new_tokens, stop_ids=(NO_STOP,),
                      pad_id=0, buckets=(128, 256))

    def generate(new_tokens=None, key=0):
        s = sampler if new_tokens is None else Sampler(
            graphdef, cfg, max_new_tokens=new_tokens, stop_ids=(NO_STOP,), pad_id=0,
            buckets=(128, 256))
        out = s.generate(state, prompts, key=jax.random.key(key), n=args.n, temperature=1.0)
        return jax.block_until_ready(out)

    t0 = time.perf_counter()
    generate()
    first = time.perf_counter() - t0
    gen_s = best(generate, args.repeats)
    generate(new_tokens=1)  # compiles the 1-token variant
    ttft = best(lambda: generate(new_tokens=1), args.repeats)
    out = generate()
    assert int(out.lengths.sum()) == len(prompts) * args.n * args.new_tokens
    return Result("jaxzero", dtype, gen_s, ttft, first - gen_s,
                  len(prompts) * args.n * args.new_tokens)


# ----------------------------------------------------------------------------- transformers


def _hf_model(cfg: Qwen2Config, dtype: str):
    import torch
    from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM
    hf_cfg = HFConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                         if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(hf_cfg).to(getattr(torch, dtype)).eval()
    return model


def run_transformers(cfg: Qwen2Config, dtype: str, prompts, args) -> Result:
    import torch
    from jaxzero.sampler import pad_prompts
    torch.set_num_threads(os.cpu_count())
    model = _hf_model(cfg, dtype)
    tokens, valid = pad_prompts(prompts, max(map(len, prompts)), 0)
    ids, mask = torch.tensor(tokens, dtype=torch.long), torch.tensor(valid, dtype=torch.long)

    def generate(cache, new_tokens):
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                 top_p=1.0, top_k=0, num_return_sequences=args.n,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 eos_token_id=None, pad_token_id=0, cache_implementation=cache)
        assert out.shape == (len(prompts) * args.n, ids.shape[1] + new_tokens), out.shape
        return out

    results = {}
    for cache in args.hf_caches.split(","):
        generate(cache, 4)  # warm-up
        gen_s = best(lambda: generate(cache, args.new_tokens), max(1, args.repeats - 1))
        results[cache] = gen_s
        print(f"  transformers {dtype} cache={cache}: "
              f"{len(prompts) * args.n * args.new_tokens / gen_s:.1f} tok/s", flush=True)
    cache = min(results, key=results.get)
    ttft = best(lambda: generate(cache, 1), args.repeats)
    note = ", ".join(f"{c}: {len(prompts) * args.n * args.new_tokens / s:.1f} tok/s"
                     for c, s in results.items())
    return Result("transformers", dtype, results[cache], ttft, 0.0,
                  len(prompts) * args.n * args.new_tokens, f"best cache={cache} ({note})")


# ----------------------------------------------------------------------------- tunix


class _IdTokenizer:
    """tunix's sampler takes strings: prompts travel as space-separated token ids."""

    def encode(self, text: str, **_) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **_) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None

    def eos_id(self):
        return NO_STOP

    def pad_id(self):
        return 0


def run_tunix(cfg: Qwen2Config, dtype: str, prompts, args) -> Result:
    from flax import nnx
    from tunix.generate import sampler as tunix_sampler
    from tunix.models.qwen2 import model as tunix_qwen2

    dt = jnp.dtype(dtype)
    tcfg = dataclasses.replace(tunix_qwen2.ModelConfig.qwen2p5_0p5b(), dtype=dt, param_dtype=dt)
    model = tunix_qwen2.Qwen2(tcfg, rngs=nnx.Rngs(params=0))
    bucket = 128
    sampler = tunix_sampler.Sampler(
        model, _IdTokenizer(),
        tunix_sampler.CacheConfig(cache_size=bucket + args.new_tokens, num_layers=cfg.num_hidden_layers,
                                  num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim))
    strings = [" ".join(map(str, p)) for p in prompts for _ in range(args.n)]

    def generate(new_tokens, seed=0):
        out = sampler(strings, max_generation_steps=new_tokens, max_prompt_length=bucket,
                      eos_tokens=[NO_STOP], temperature=1.0, top_p=1.0, top_k=None, seed=seed)
        assert all(len(t) == new_tokens for t in out.tokens), [len(t) for t in out.tokens]
        return out

    t0 = time.perf_counter()
    generate(args.new_tokens)
    first = time.perf_counter() - t0
    gen_s = best(lambda: generate(args.new_tokens), args.repeats)
    generate(1)
    ttft = best(lambda: generate(1), args.repeats)
    return Result("tunix", dtype, gen_s, ttft, first - gen_s,
                  len(prompts) * args.n * args.new_tokens,
                  "no n: each prompt is repeated n times, so its prefill runs n times")


# ----------------------------------------------------------------------------- roofline


def roofline(cfg: Qwen2Config, dtype: str, batch: int, prompt_len: int, new_tokens: int,
             hw: dict) -> dict:
    """Per decode step, averaged over the steps: bytes of weights and KV cache read over the
    measured XLA read bandwidth, and FLOPs over the measured XLA matmul rate."""
    item = jnp.dtype(dtype).itemsize
    params = cfg.num_params() - cfg.vocab_size * cfg.hidden_size  # the embedding gather is tiny
    params += cfg.vocab_size * cfg.hidden_size  # ... but the (tied) lm_head reads all of it
    kv_slots = prompt_len + new_tokens / 2  # average cache length over the decode
    kv_bytes = 2 * cfg.num_hidden_layers * batch * kv_slots * cfg.num_key_value_heads * \
        cfg.head_dim * item
    bytes_step = params * item + kv_bytes
    attn_flops = 4 * cfg.num_hidden_layers * batch * cfg.num_attention_heads * cfg.head_dim * \
        kv_slots
    flops_step = 2 * batch * params + attn_flops
    rate = hw["xla_matmul_tflops_f32" if dtype == "float32" else "xla_matmul_tflops_bf16"]
    t_mem = bytes_step / (hw["xla_read_gbps"] * 1e9)
    t_flop = flops_step / (rate * 1e12)
    return {"bytes_per_step": bytes_step, "flops_per_step": flops_step,
            "memory_s": t_mem, "compute_s": t_flop, "step_s": max(t_mem, t_flop),
            "tokens_per_s": batch / max(t_mem, t_flop)}


# ----------------------------------------------------------------------------- main


def main(args) -> None:
    cfg = preset("qwen2.5-0.5b")
    prompts = make_prompts(args.prompts)
    systems = args.systems.split(",")
    dtypes = args.dtypes.split(",")
    runners = {"jaxzero": run_jaxzero, "transformers": run_transformers, "tunix": run_tunix}
    print(f"rollout: {args.prompts} prompts x {args.n} samples, prompt lengths "
          f"{min(map(len, prompts))}-{max(map(len, prompts))}, {args.new_tokens} new tokens; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {os.cpu_count()} CPUs", flush=True)
    hw = None if args.skip_hardware else hardware.measure(quick=True, torch_too=False)
    if hw:
        print("hardware: " + ", ".join(f"{k}={v:.3g}" for k, v in hw.items()), flush=True)
    results: list[Result] = []
    for system in systems:
        for dtype in dtypes:
            t0 = time.perf_counter()
            try:
                r = runners[system](cfg, dtype, prompts, args)
            except Exception as e:  # report and go on with the other systems
                print(f"{system} {dtype}: FAILED {type(e).__name__}: {e}", flush=True)
                continue
            finally:
                gc.collect()
            results.append(r)
            print(f"{system:12s} {dtype:9s} {r.tokens_per_s:8.1f} tok/s  generate "
                  f"{r.generate_s:7.2f} s  TTFT {r.ttft_s:6.2f} s  compile {r.compile_s:6.1f} s"
                  f"  (wall {time.perf_counter() - t0:.0f} s) {r.note}", flush=True)

    f32 = {r.system: round(r.tokens_per_s, 1) for r in results if r.dtype == "float32"}
    best_tps = {}
    for r in results:
        if r.tokens_per_s > best_tps.get(r.system, (0, ""))[0]:
            best_tps[r.system] = (r.tokens_per_s, r.dtype)
    fraction = None
    if hw:
        batch = args.prompts * args.n
        plen = 128
        for dtype in dtypes:
            roof = roofline(cfg, dtype, batch, plen, args.new_tokens, hw)
            print(f"roofline {dtype}: {roof['bytes_per_step'] / 1e9:.2f} GB/step over "
                  f"{hw['xla_read_gbps']:.1f} GB/s = {roof['memory_s'] * 1e3:.1f} ms; "
                  f"{roof['flops_per_step'] / 1e9:.1f} GFLOP/step at "
                  f"{hw['xla_matmul_tflops_f32' if dtype == 'float32' else 'xla_matmul_tflops_bf16']:.3f}"
                  f" TFLOP/s = {roof['compute_s'] * 1e3:.1f} ms -> "
                  f"{roof['tokens_per_s']:.0f} tok/s", flush=True)
            jz = [r for r in results if r.system == "jaxzero" and r.dtype == dtype]
            if jz:
                frac = jz[0].tokens_per_s / roof["tokens_per_s"]
                print(f"jaxzero {dtype}: {frac:.2f} of the roofline", flush=True)
                if dtype == "float32":
                    fraction = round(frac, 3)
    print(json.dumps({
        "bench": "rollout",
        "tokens_per_s": f32,
        "best_tokens_per_s": {k: {"tokens_per_s": round(v, 1), "dtype": d}
                              for k, (v, d) in best_tps.items()},
        "roofline_fraction": fraction,
    }))


if __name__ == "__main__":
    main(ARGS)
