"""`jaxzero plan CONFIG`: the memory planner's command line."""

from __future__ import annotations

import os

from jaxzero.errors import ConfigError


def parse_mesh(text: str) -> dict[str, int]:
    """'data=1,fsdp=8,tensor=1' -> {'data': 1, 'fsdp': 8, 'tensor': 1}."""
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in ("data", "fsdp", "tensor") or not value.strip().lstrip("-").isdigit():
            raise ConfigError(f"--mesh {text!r}: expected e.g. data=1,fsdp=8,tensor=1")
        out[name.strip()] = int(value)
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-device memory of a run, compiled ahead of time",
                       description="Compile the train step and the sampler for the config's "
                       "batch and lengths on abstract inputs (no weights allocated) and print "
                       "per-device memory. On CPU, --devices N plans for N simulated devices.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--mesh", help="e.g. data=1,fsdp=8,tensor=1 (default: the config's)")
    p.add_argument("--devices", type=int, help="plan for N simulated CPU devices")
    p.add_argument("--device-memory-gib", type=float, default=80.0,
                   help="memory of one accelerator, to say whether it fits")
    p.set_defaults(func=run)


def run(args) -> None:
    if args.devices:
        # Simulated CPU devices must be requested before jax is imported.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from jaxzero.config.files import load_config
    from jaxzero.io.identity import run_architecture
    from jaxzero.parallel.sharding import make_mesh
    from jaxzero.rl.plan import PlanInputs, format_report, plan_memory
    cfg = load_config(args.config, args.overrides)
    mesh_sizes = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
    if args.mesh:
        mesh_sizes.update(parse_mesh(args.mesh))
    mesh = make_mesh(**mesh_sizes)
    model_config = run_architecture(cfg.model)
    inputs = PlanInputs(
        prompts_per_step=cfg.data.prompts_per_step, n=cfg.rollout.n,
        prompt_len=max(cfg.data.prompt_buckets), response_len=cfg.rollout.max_new_tokens,
        micro_batches=cfg.grpo.micro_batches, param_dtype=cfg.model.param_dtype,
        compute_dtype=cfg.model.compute_dtype, ref_dtype=cfg.model.compute_dtype,
        remat=cfg.model.remat == "block", use_kl=cfg.grpo.use_kl_loss,
        rollout_micro_batch=cfg.rollout.micro_batch, decode_layout=cfg.rollout.decode_layout,
        decode_chunk=cfg.rollout.decode_chunk, cache_block=cfg.rollout.cache_block,
        cache_dtype=cfg.rollout.cache_dtype, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
        micro_batch_tokens=cfg.grpo.micro_batch_tokens)
    report = plan_memory(model_config, inputs, mesh,
                         device_bytes=int(args.device_memory_gib * 2 ** 30))
    print(format_report(cfg.model.path or "demo model", report, inputs,
                        args.device_memory_gib))
    print(f"  ({jax.device_count()} {jax.devices()[0].platform} devices seen; on CPU the "
          "temporaries are XLA:CPU's, which fuses differently from GPU/TPU, so treat them "
          "as an estimate)")
