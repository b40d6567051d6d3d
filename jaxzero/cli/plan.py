"""`jaxzero plan CONFIG`: the memory planner's command line."""

from __future__ import annotations

import dataclasses

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
    p = sub.add_parser(
        "plan", help="every phase of a step compiled ahead of time: memory, fit, roofline",
        description="Compile the update, the log-prob pass, the prefill and the decode loop for "
        "the config's batch and lengths on abstract inputs (no weights allocated, nothing run) "
        "and print each phase's per-device memory, computed and by XLA. --target tpu:TOPOLOGY "
        "compiles with XLA:TPU for a TPU slice that need not be attached (pip install "
        "'jaxzero[tpu]'), says whether the run fits the chip's HBM and gives roofline bounds "
        "from XLA's cost model.")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--target", help="what to compile for: tpu:v5e:4x4, tpu:v5p:2x2x1, "
                   "tpu:v6e:2x4, tpu:v4:2x2x1, ... or cpu:N (N simulated CPU devices; default: "
                   "this machine's devices)")
    p.add_argument("--mesh", help="e.g. data=1,fsdp=8,tensor=1 (default: the config's)")
    p.add_argument("--devices", type=int, help="plan for N simulated CPU devices (= --target cpu:N)")
    p.add_argument("--device-memory-gib", type=float,
                   help="memory of one device, to say whether it fits (default: the TPU chip's "
                   "HBM; 80 on other targets)")
    p.set_defaults(func=run)


def plan_inputs(cfg, platform: str):
    """The run sizes of `cfg` (a RunConfig) the planner needs, with model.attention resolved
    for `platform`."""
    from jaxzero.model.attention import resolve_attention
    from jaxzero.rl.plan import PlanInputs
    return PlanInputs(
        prompts_per_step=cfg.data.prompts_per_step, n=cfg.rollout.n,
        prompt_len=max(cfg.data.prompt_buckets), response_len=cfg.rollout.max_new_tokens,
        micro_batches=cfg.grpo.micro_batches, param_dtype=cfg.model.param_dtype,
        compute_dtype=cfg.model.compute_dtype, ref_dtype=cfg.model.compute_dtype,
        remat=cfg.model.remat == "block", use_kl=cfg.grpo.use_kl_loss,
        rollout_micro_batch=cfg.rollout.micro_batch, decode_layout=cfg.rollout.decode_layout,
        decode_chunk=cfg.rollout.decode_chunk, cache_block=cfg.rollout.cache_block,
        cache_dtype=cfg.rollout.cache_dtype, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
        micro_batch_tokens=cfg.grpo.micro_batch_tokens,
        attention=resolve_attention(cfg.model.attention, platform, cfg.model.compute_dtype),
        updates_per_step=cfg.grpo.updates_per_step)


def run(args) -> None:
    from jaxzero.parallel.target import (device_peaks, devices_per_host, parse_target,
                                         prepare_environment, target_devices)
    if args.target and args.devices:
        raise ConfigError("give --target or --devices, not both")
    spec = parse_target(args.target or f"cpu:{args.devices}") if (args.target or args.devices) \
        else None
    if spec is not None:
        prepare_environment(spec)  # before jax is imported
    import jax

    from jaxzero.config.files import load_config
    from jaxzero.io.identity import run_architecture
    from jaxzero.parallel.sharding import make_mesh
    from jaxzero.rl.plan import format_report, plan_memory
    cfg = load_config(args.config, args.overrides)
    mesh_sizes = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
    if args.mesh:
        mesh_sizes.update(parse_mesh(args.mesh))
    devices = target_devices(spec) if spec is not None else jax.devices()
    mesh = make_mesh(**mesh_sizes, devices=devices)
    platform = devices[0].platform
    chip = device_peaks(spec, devices) if spec is not None else None
    memory_gib = args.device_memory_gib or (chip.hbm_bytes / 2 ** 30 if chip else 80.0)
    model_config = run_architecture(cfg.model)
    inputs = plan_inputs(cfg, platform)
    report = plan_memory(model_config, inputs, mesh, device_bytes=int(memory_gib * 2 ** 30),
                         host_devices=devices_per_host(devices))
    if chip is not None and args.device_memory_gib:
        chip = dataclasses.replace(chip, hbm_bytes=int(memory_gib * 2 ** 30))
    print(format_report(cfg.model.path or "demo model", report, inputs, chip, memory_gib))
