"""A GRPO step's two halves on one accelerator: rollout decode against the HBM roofline, the
update against the measured bf16 matmul rate, peak memory against `jaxzero plan`.

The default shape is the seed's on a Qwen2.5-1.5B-shaped model with random weights: 8 prompts
x 16 rollouts = 128 sequences, 1,024-token prompts, 1,024 new tokens with the stop tokens
ignored (every rollout full length), float32 master weights, bfloat16 compute, block remat,
one H200 in under 8 minutes. transformers `generate` runs the same rollout on the same GPU as
a peer when torch sees CUDA. `--small` is a tiny shape that runs end to end on CPU in seconds
(what the test runs).

    python benchmarks/accelerator.py                  # the seed's shape, on the GPU
    python benchmarks/accelerator.py --small --skip-hf

Figures:
  rollout_tokens_per_s   generated tokens / the second (compiled) rollout's wall time
  decode_roofline        bytes a decode must stream (the bf16 copy once per step plus the KV
                         blocks each step reads) / the copy bandwidth measured here, over the
                         decode time: the fraction of the HBM roofline reached
  update_mfu             model FLOPs of the update (forward + backward, remat not counted)
                         per second / the bf16 matmul rate measured here
  peak_memory_gib        device.memory_stats() peak (null where the backend reports none)
  plan_peak_gib          `jaxzero plan`'s peak for the same shape and mesh
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NO_STOP = -1  # a token id no model emits: every rollout runs to max_new_tokens


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen2.5-1.5b")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=16, help="rollouts per prompt")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--micro-batches", type=int, default=16, help="update micro-batches")
    p.add_argument("--small", action="store_true",
                   help="a tiny model and shape (CPU, seconds): overrides the shape flags")
    p.add_argument("--skip-hf", action="store_true", help="no transformers peer")
    p.add_argument("--copy-mbytes", type=int, default=2048, help="bandwidth probe size")
    p.add_argument("--matmul-n", type=int, default=8192, help="matmul probe size")
    args = p.parse_args(argv)
    if args.small:
        args.prompts, args.n, args.prompt_len, args.new_tokens = 4, 2, 16, 8
        args.micro_batches, args.copy_mbytes, args.matmul_n = 1, 16, 256
    return args


def model_config(args):
    from jaxzero.model.config import Qwen2Config, preset
    if args.small:
        return Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                           rope_theta=10000.0, tie_word_embeddings=True)
    return preset(args.preset)


def run_config(args):
    """The run config whose rollout and mesh sections the trainer would read."""
    from jaxzero.config.schema import config_from_dict
    return config_from_dict({
        "model": {"demo": True, "param_dtype": "float32", "compute_dtype": "bfloat16"},
        "data": {"prompts_per_step": args.prompts, "max_prompt_length": args.prompt_len,
                 "prompt_buckets": [args.prompt_len]},
        "rollout": {"n": args.n, "max_new_tokens": args.new_tokens},
        "grpo": {"micro_batches": args.micro_batches}})


def decode_bytes(cfg, config, prompt_len: int, rows: int, copy_bytes: int) -> float:
    """Bytes one device's decode streams: the copy once per step, and each step's K and V
    slots (the prefix its chunk reads, in the compute dtype) for its rows."""
    slots = config.cache_slots(prompt_len)
    prefixes = config.read_prefixes(slots)
    per_slot = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    total = 0.0
    for start in range(1, config.steps, config.chunk_steps):
        read = prefixes[int(config.read_index(prompt_len + start - 1, slots))]
        total += config.chunk_steps * (copy_bytes + rows * read * per_slot)
    return total


def peak_memory():
    import jax
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats or "peak_bytes_in_use" not in stats else stats["peak_bytes_in_use"]


def run_jaxzero(args, hw) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from benchmarks.grpo_step import update_flops
    from jaxzero.model.qwen2 import ModelOptions, init_model
    from jaxzero.parallel.sharding import bytes_per_device, device_memory_bytes
    from jaxzero.rl import setup
    from jaxzero.rl.plan import PlanInputs, plan_memory
    from jaxzero.rl.train_step import TrainBatch, build_step_functions, init_opt_state

    cfg, run = model_config(args), run_config(args)
    mesh = setup.validate(run)
    options = ModelOptions(param_dtype=jnp.float32, compute_dtype=jnp.bfloat16, remat=True)
    graphdef, params = nnx.split(init_model(cfg, options, seed=0))
    optimizer, _ = setup.optimizer_and_schedule(run.optim, 10)
    fns = build_step_functions(graphdef, params, optimizer, setup.loss_config(run.grpo), mesh,
                               response_len=args.new_tokens, micro_batches=args.micro_batches)
    params = jax.device_put(params, fns.param_shardings)
    opt_state = init_opt_state(optimizer, params, fns.opt_shardings)
    sampler = setup.build_sampler(run, cfg, options, mesh, stop_ids=(NO_STOP,), pad_id=0,
                                  log=lambda _: None)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, cfg.vocab_size, args.prompt_len)) for _ in range(args.prompts)]

    def rollout(index):
        out = sampler.generate(params, prompts, key=jax.random.key(index), n=args.n)
        return jax.tree.map(np.asarray, out)

    t0 = time.perf_counter()
    rollout(0)
    rollout_compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    host = rollout(1)
    rollout_s = time.perf_counter() - t0
    rows = args.prompts * args.n
    generated = int(host.lengths.sum())
    assert generated == rows * args.new_tokens, "every rollout must be full length"

    copy = sampler.decode_params(params)
    copy_bytes = bytes_per_device(copy, jax.tree.map(lambda x: x.sharding, copy))
    del copy
    # Prompts are padded to a multiple of the data-parallel devices, each taking its share.
    per_device = -(-args.prompts // sampler.data_parallel) * args.n
    streamed = decode_bytes(cfg, sampler.config, args.prompt_len, per_device, copy_bytes)

    tokens = np.concatenate([host.prompt_tokens, host.tokens], axis=1)
    valid = np.concatenate([host.prompt_mask, host.mask], axis=1)
    batch = TrainBatch(*(setup.put_global(x, s) for x, s in zip(
        (tokens, valid, host.mask.astype(np.float32),
         rng.normal(size=rows).astype(np.float32), host.logprobs,
         np.zeros_like(host.logprobs)), fns.batch_shardings)))
    state = {"params": params, "opt_state": opt_state}

    def update():
        state["params"], state["opt_state"], metrics = fns.update(
            state["params"], state["opt_state"], batch)
        return jax.device_get(metrics)

    t0 = time.perf_counter()
    update()
    update_compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = update()
    update_s = time.perf_counter() - t0
    assert np.isfinite(metrics["loss"]), metrics
    flops = update_flops(cfg, rows, args.prompt_len, args.new_tokens)
    peak = peak_memory()

    plan = plan_memory(cfg, PlanInputs(
        prompts_per_step=args.prompts, n=args.n, prompt_len=args.prompt_len,
        response_len=args.new_tokens, micro_batches=args.micro_batches,
        param_dtype="float32", compute_dtype="bfloat16", ref_dtype="bfloat16", remat=True,
        use_kl=run.grpo.use_kl_loss), mesh, device_bytes=device_memory_bytes())
    gib = 2 ** 30
    return {
        "rows": rows, "generated_tokens": generated,
        "rollout_s": rollout_s, "rollout_compile_s": rollout_compile_s,
        "rollout_tokens_per_s": generated / rollout_s,
        "decode_streamed_gib": streamed / gib,
        "decode_roofline": streamed / (hw["copy_gbps"] * 1e9) / rollout_s,
        "update_s": update_s, "update_compile_s": update_compile_s,
        "update_tflops": flops / update_s / 1e12,
        "update_mfu": flops / update_s / 1e12 / hw["matmul_tflops_bf16"],
        "peak_memory_gib": None if peak is None else peak / gib,
        "plan_peak_gib": plan.peak / gib,
        "plan_vs_peak": None if peak is None else plan.peak / peak,
        "decode_layout": plan.decode_layout,
    }


def run_transformers(args) -> dict:
    """transformers `generate` of the same rollout (bf16 weights, sampling, no stops)."""
    try:
        import torch
    except ImportError:
        return {"skipped": "torch is not installed"}
    if not torch.cuda.is_available():
        return {"skipped": "torch sees no CUDA device"}
    from transformers import Qwen2Config as HFConfig, Qwen2ForCausalLM
    cfg = model_config(args)
    hf = Qwen2ForCausalLM(HFConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings)).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(1, cfg.vocab_size, (args.prompts, args.prompt_len), device="cuda")

    def generate(new):
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                              temperature=1.0, top_p=1.0, top_k=0,
                              num_return_sequences=args.n, max_new_tokens=new,
                              min_new_tokens=new, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        return out
    generate(8)
    t0 = time.perf_counter()
    out = generate(args.new_tokens)
    seconds = time.perf_counter() - t0
    made = out.shape[0] * (out.shape[1] - args.prompt_len)
    del hf
    torch.cuda.empty_cache()
    return {"rollout_s": seconds, "rollout_tokens_per_s": made / seconds}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    if jax.default_backend() != "cpu":  # the plan recompiles the update: reuse its binary
        jax.config.update("jax_compilation_cache_dir", "/tmp/jaxzero-accelerator-cache")
    from benchmarks import hardware
    hw = {"copy_gbps": hardware.xla_copy_gbps(args.copy_mbytes, repeats=3),
          "matmul_tflops_bf16": hardware.xla_matmul_tflops("bfloat16", args.matmul_n, 3)}
    device = jax.devices()[0]
    result = {"device": f"{device.platform}: {device.device_kind}",
              "devices": jax.device_count(), "shape": {
                  "preset": "tiny" if args.small else args.preset, "prompts": args.prompts,
                  "n": args.n, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                  "micro_batches": args.micro_batches},
              "hardware": hw}
    t0 = time.perf_counter()
    result["jaxzero"] = run_jaxzero(args, hw)
    result["transformers"] = {"skipped": "--skip-hf"} if args.skip_hf else run_transformers(args)
    result["wall_s"] = time.perf_counter() - t0
    for name in ("jaxzero", "transformers"):
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in result[name].items()), flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
