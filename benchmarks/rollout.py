"""Rollout throughput on this CPU: jaxzero's sampler vs transformers `generate` vs tunix.

A Qwen2.5-0.5B-shaped model with random weights; 8 prompts x 4 samples = 32 sequences,
prompts of 64-128 tokens, 128 new tokens each at temperature 1, stop tokens ignored, so every
system generates the same number of tokens. Each system runs in float32 (the matched
comparison) and bfloat16; the script ends with one JSON line.

    /work/venv/bin/python benchmarks/rollout.py                       # everything (< 10 min)
    /work/venv/bin/python benchmarks/rollout.py --systems jaxzero --dtypes float32
    /work/venv/bin/python benchmarks/rollout.py --new-tokens 32       # a quick look
    /work/venv/bin/python benchmarks/rollout.py --systems jaxzero --mean-length 64  # early stops

Timings are best-of-`--repeats` whole generate calls (prefill included), after one warm-up
call that compiles; the machine is shared, so a best is the least disturbed run. tunix needs
`pip install --no-deps google-tunix==0.1.7 google-metrax jaxtyping perfetto` (its full
dependency list pulls tensorflow-datasets and more, none of which the sampler imports). Results and the exact command: BENCHMARKS.md.
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
    p.add_argument("--repeats", type=int, default=2,
                   help="timed rounds for the compiled systems (best kept); transformers: 1")
    p.add_argument("--hf-caches", default="dynamic",
                   help="transformers cache implementations; with several, a probe of "
                        "--probe-tokens picks the faster (static and dynamic tie here: BENCHMARKS.md)")
    p.add_argument("--probe-tokens", type=int, default=16,
                   help="new tokens of the run that picks transformers' cache")
    p.add_argument("--xla-flags", default=None,
                   help="XLA_FLAGS for the jaxzero/tunix runs (default: leave the env's)")
    p.add_argument("--jaxzero-cache-dtype", default=None,
                   help="jaxzero's KV cache dtype (default: the compute dtype); float32 avoids "
                        "XLA CPU's whole-cache f32 round trip on every bf16 cache write")
    p.add_argument("--skip-hardware", action="store_true",
                   help="skip the bandwidth/matmul probes (no roofline)")
    p.add_argument("--decode-chunk", type=int, default=16,
                   help="jaxzero: decode steps between all-stopped checks (1: a check per "
                        "token, the sampler before issue 14)")
    p.add_argument("--cache-block", type=int, default=128,
                   help="jaxzero: KV cache block; each chunk reads the filled blocks only "
                        "(0: read the whole cache every step, the sampler before issue 14)")
    p.add_argument("--mean-length", type=int, default=None,
                   help="jaxzero only: stop tokens honoured, a stop set the random model hits "
                        "~once per this many tokens (geometric lengths, benchmarks/length_mix.py)"
                        "; tokens/s then counts real tokens")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.xla_flags is not None:  # must happen before jax is imported
    os.environ["XLA_FLAGS"] = ARGS.xla_flags

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import hardware  # noqa: E402
from benchmarks.length_mix import stop_set  # noqa: E402
from jaxzero.model.config import Qwen2Config, preset  # noqa: E402

NO_STOP = -1  # a token id no model emits: "stop tokens ignored"


@dataclasses.dataclass
class Result:
    system: str
    dtype: str
    generate_s: float          # best whole-generate time
    ttft_s: float              # prefill + first token
    compile_s: float           # warm-up call minus a steady call
    tokens: int
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.generate_s


def make_prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 150_000, rng.integers(64, 129)).tolist() for _ in range(count)]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class System:
    """One system in one dtype: `generate(new_tokens)` runs a whole blocking generate call."""

    name = ""
    note = ""
    jit = True  # compiles on a first call: warm it up, time repeats, measure compile
    # Real tokens and decode steps of the last call, where rows may stop early (--mean-length).
    last_tokens: int | None = None
    last_steps: int | None = None

    def generate(self, new_tokens: int) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------- jaxzero


class JaxzeroSystem(System):
    name = "jaxzero"

    def __init__(self, cfg: Qwen2Config, dtype: str, prompts, args):
        from flax import nnx
        from jaxzero.model.qwen2 import ModelOptions, init_model
        from jaxzero.model.sampler import Sampler
        dt = jnp.dtype(dtype)
        self.graphdef, self.state = nnx.split(
            init_model(cfg, ModelOptions(param_dtype=dt, compute_dtype=dt)))
        self.samplers = {}
        self.stops = (NO_STOP,) if args.mean_length is None else \
            stop_set(cfg.vocab_size, args.mean_length, avoid=0)
        self.make = lambda r: Sampler(self.graphdef, cfg, max_new_tokens=r, stop_ids=self.stops,
                                      pad_id=0, buckets=(128, 256),
                                      cache_dtype=args.jaxzero_cache_dtype,
                                      chunk=args.decode_chunk,
                                      cache_block=args.cache_block or None)
        self.note = f"decode_chunk={args.decode_chunk} cache_block={args.cache_block or None}"
        if args.jaxzero_cache_dtype:
            self.note += f" cache_dtype={args.jaxzero_cache_dtype}"
        if args.mean_length is not None:
            self.note += f" {len(self.stops)} stop ids (mean length ~{args.mean_length})"
        self.prompts, self.n, self.calls = prompts, args.n, 0

    def generate(self, new_tokens: int) -> None:
        sampler = self.samplers.setdefault(new_tokens, self.make(new_tokens))
        self.calls += 1
        out = sampler.generate(self.state, self.prompts, key=jax.random.key(self.calls),
                               n=self.n, temperature=1.0)
        jax.block_until_ready(out)
        lengths = np.asarray(out.lengths)
        self.last_tokens, self.last_steps = int(lengths.sum()), int(lengths.max())
        if self.stops == (NO_STOP,):
            assert self.last_tokens == len(self.prompts) * self.n * new_tokens


# ----------------------------------------------------------------------------- transformers


class TransformersSystem(System):
    """transformers `generate` in PyTorch eager: the fastest thread count (OpenMP with both
    cores collapses when other work shares them) and cache implementation found by probes."""

    name = "transformers"
    jit = False

    def __init__(self, cfg: Qwen2Config, dtype: str, prompts, args):
        import torch
        from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM
        from jaxzero.model.sampler import pad_prompts
        hf_cfg = HFConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                             if k not in ("architectures", "torch_dtype")})
        torch.manual_seed(0)
        self.model = Qwen2ForCausalLM(hf_cfg).to(getattr(torch, dtype)).eval()
        tokens, valid = pad_prompts(prompts, max(map(len, prompts)), 0)
        self.ids = torch.tensor(tokens, dtype=torch.long)
        self.mask = torch.tensor(valid, dtype=torch.long)
        self.n = args.n
        self.threads = self._fastest_threads(len(prompts) * args.n)
        torch.set_num_threads(self.threads)
        speed = {}
        caches = args.hf_caches.split(",")
        for cache in caches if len(caches) > 1 else []:
            self.cache = cache
            speed[cache] = timed(lambda: self.generate(args.probe_tokens))
        self.cache = min(speed, key=speed.get) if speed else caches[0]
        self.note = f"threads={self.threads} cache={self.cache}" + "".join(
            f"; {c}: {t:.1f} s for {args.probe_tokens} tokens" for c, t in speed.items())

    def _fastest_threads(self, batch: int) -> int:
        """Times a decode step of the whole batch at each thread count."""
        import torch
        step = {}
        with torch.inference_mode():
            cache = self.model(self.ids[:1].repeat(batch, 1)[:, :16], use_cache=True,
                               logits_to_keep=1).past_key_values
            one = self.ids[:1, :1].repeat(batch, 1)
            for threads in sorted({1, os.cpu_count()}):
                torch.set_num_threads(threads)
                self.model(one, past_key_values=cache, use_cache=True, logits_to_keep=1)
                step[threads] = min(timed(lambda: self.model(
                    one, past_key_values=cache, use_cache=True, logits_to_keep=1))
                    for _ in range(2))
        return min(step, key=step.get)

    def generate(self, new_tokens: int) -> None:
        import torch
        with torch.inference_mode():
            out = self.model.generate(
                self.ids, attention_mask=self.mask, do_sample=True, temperature=1.0, top_p=1.0,
                top_k=0, num_return_sequences=self.n, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0,
                cache_implementation=self.cache)
        assert out.shape == (self.ids.shape[0] * self.n, self.ids.shape[1] + new_tokens)


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


class TunixSystem(System):
    name = "tunix"
    note = "no n: each prompt is repeated n times, so its prefill runs n times"

    def __init__(self, cfg: Qwen2Config, dtype: str, prompts, args):
        from flax import nnx
        from tunix.generate import sampler as tunix_sampler
        from tunix.models.qwen2 import model as tunix_qwen2
        dt = jnp.dtype(dtype)
        tcfg = dataclasses.replace(tunix_qwen2.ModelConfig.qwen2p5_0p5b(), dtype=dt,
                                   param_dtype=dt)
        model = tunix_qwen2.Qwen2(tcfg, rngs=nnx.Rngs(params=0))
        self.bucket = 128
        self.sampler = tunix_sampler.Sampler(model, _IdTokenizer(), tunix_sampler.CacheConfig(
            cache_size=self.bucket + args.new_tokens, num_layers=cfg.num_hidden_layers,
            num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim))
        self.strings = [" ".join(map(str, p)) for p in prompts for _ in range(args.n)]
        self.calls = 0

    def generate(self, new_tokens: int) -> None:
        self.calls += 1
        out = self.sampler(self.strings, max_generation_steps=new_tokens,
                           max_prompt_length=self.bucket, eos_tokens=[NO_STOP],
                           temperature=1.0, top_p=1.0, top_k=None, seed=self.calls)
        assert all(len(t) == new_tokens for t in out.tokens), [len(t) for t in out.tokens]


SYSTEM_CLASSES = {"jaxzero": JaxzeroSystem, "transformers": TransformersSystem,
                  "tunix": TunixSystem}


def run_dtype(cfg: Qwen2Config, dtype: str, systems: list[str], prompts, args) -> list[Result]:
    """Builds and warms every system in `dtype`, then times them in interleaved rounds, so a
    burst of load from other work on the machine hits all of them alike.

    TTFT is a whole generate call of one new token (prefill + first token), after a warm-up
    of that shape for the systems that compile. transformers has no compile to exclude and
    a long eager generate, so it gets a single timed run and its TTFT call doubles as warm-up.
    """
    built, first_s, ttft_s = {}, {}, {}
    for name in systems:
        try:
            t0 = time.perf_counter()
            system = SYSTEM_CLASSES[name](cfg, dtype, prompts, args)
            build = time.perf_counter() - t0
            if system.jit:
                first_s[name] = timed(lambda: system.generate(args.new_tokens))
                system.generate(1)
            ttft_s[name] = timed(lambda: system.generate(1))
            built[name] = system
            print(f"  {name} {dtype}: built in {build:.0f} s, first call "
                  f"{first_s.get(name, 0.0):.1f} s, TTFT {ttft_s[name]:.2f} s", flush=True)
        except Exception as e:  # report it and go on with the other systems
            print(f"{name} {dtype}: FAILED {type(e).__name__}: {e}", flush=True)
    best_s = {name: float("inf") for name in built}
    full = len(prompts) * args.n * args.new_tokens
    tokens = {name: full for name in built}
    for round_ in range(args.repeats):
        for name, system in built.items():
            if round_ and not system.jit:
                continue
            t = timed(lambda: system.generate(args.new_tokens))
            if t < best_s[name]:
                best_s[name] = t
                if system.last_tokens is not None:
                    tokens[name] = system.last_tokens
            print(f"  round {round_} {name} {dtype}: {t:.2f} s (load {os.getloadavg()[0]:.1f})"
                  + (f", {system.last_tokens} real tokens in {system.last_steps} decode steps: "
                     f"{1 - system.last_tokens / (len(prompts) * args.n * system.last_steps):.1%}"
                     " of the row-steps padding" if args.mean_length else ""), flush=True)
    results = [Result(name, dtype, best_s[name], ttft_s[name],
                      max(first_s.get(name, best_s[name]) - best_s[name], 0.0), tokens[name],
                      system.note) for name, system in built.items()]
    built.clear()
    gc.collect()
    return results


# ----------------------------------------------------------------------------- roofline


def roofline(cfg: Qwen2Config, dtype: str, batch: int, prompt_len: int, new_tokens: int,
             hw: dict) -> dict:
    """Per decode step, averaged over the steps: bytes of weights and KV cache read over the
    measured XLA read bandwidth, and FLOPs over the measured XLA matmul rate."""
    item = jnp.dtype(dtype).itemsize
    # Every weight is read once per step, except an untied embedding: its row gather is tiny
    # (a tied one is the lm_head, which reads all of it).
    params = cfg.num_params() - (0 if cfg.tie_word_embeddings else
                                 cfg.vocab_size * cfg.hidden_size)
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
    if args.mean_length is not None and args.systems != "jaxzero":
        raise SystemExit("--mean-length sets jaxzero's stop ids only: use --systems jaxzero")
    cfg = preset("qwen2.5-0.5b")
    prompts = make_prompts(args.prompts)
    systems = args.systems.split(",")
    dtypes = args.dtypes.split(",")
    print(f"rollout: {args.prompts} prompts x {args.n} samples, prompt lengths "
          f"{min(map(len, prompts))}-{max(map(len, prompts))}, {args.new_tokens} new tokens; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; {os.cpu_count()} CPUs", flush=True)
    hw = None if args.skip_hardware else hardware.measure(quick=True, torch_too=False)
    if hw:
        print("hardware: " + ", ".join(f"{k}={v:.3g}" for k, v in hw.items()), flush=True)
    results: list[Result] = []
    for dtype in dtypes:
        for r in run_dtype(cfg, dtype, systems, prompts, args):
            results.append(r)
            print(f"{r.system:12s} {dtype:9s} {r.tokens_per_s:8.1f} tok/s  generate "
                  f"{r.generate_s:7.2f} s  TTFT {r.ttft_s:6.2f} s  compile {r.compile_s:6.1f} s"
                  f"  {r.note}", flush=True)

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
