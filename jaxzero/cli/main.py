"""The `jaxzero` command line: prepare-data, convert, train, eval, generate, plan, plot.

Heavy imports (jax, transformers) happen inside each command, so `--help` is instant and
`plan --devices N` can set up simulated devices before jax starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from jaxzero.errors import JaxzeroError


def _prepare_data(args) -> None:
    from jaxzero.diagnosis.rarearena import prepare_data
    tokenizer = None
    if args.tokenizer:
        from jaxzero.io.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer)
    stats = prepare_data(args.input, args.out_dir, train_ratio=args.train_ratio,
                         tokenizer=tokenizer, max_prompt_length=args.max_prompt_length,
                         long_prompt_policy=args.long_prompts,
                         skip_bad_records=args.skip_bad_records, shuffle_seed=args.shuffle_seed)
    print(stats.format())


def _convert(args) -> None:
    from jaxzero.io import model_dir as model_store
    if args.direction == "hf-to-jax":
        model_store.convert_hf_to_jax(args.src, args.out_dir, dtype=args.dtype)
    else:
        model_store.convert_jax_to_hf(args.src, args.out_dir, step=args.step, dtype=args.dtype)


def _train(args) -> None:
    from jaxzero.config.files import load_config
    cfg = load_config(args.config, args.overrides)
    from jaxzero.parallel import distributed
    distributed.initialize()
    from jaxzero.rl.trainer import train
    train(cfg, resume=args.resume, overwrite=args.overwrite)


def _eval(args) -> None:
    from jaxzero.diagnosis.evaluate import run_eval_cli
    run_eval_cli(args)


def _generate(args) -> None:
    from jaxzero.cli.generate import run_generate_cli
    run_generate_cli(args)


def _plan(args) -> None:
    if args.devices:
        # Simulated CPU devices must be requested before jax is imported.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
        os.environ["JAX_PLATFORMS"] = "cpu"
    from jaxzero.cli.plan import run_plan_cli
    run_plan_cli(args)


def _plot(args) -> None:
    from jaxzero.monitor.plots import plot_run
    for path in plot_run(args.run_dir, args.out):
        print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxzero", description="R1-Zero-style GRPO for Qwen2.5 in pure JAX "
        "(a reimplementation of DiagnosisZero).")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare-data", help="turn RareArena RDC/RDS files into train/test files",
                       description="Read a RareArena file (JSON Lines or a JSON array), build "
                       "the DiagnosisZero prompt for each case and write train.jsonl and "
                       "test.jsonl (first --train-ratio of the file for training).")
    p.add_argument("input", help="RareArena file, e.g. RDC.json")
    p.add_argument("out_dir", help="where train.jsonl and test.jsonl are written")
    p.add_argument("--train-ratio", type=float, default=0.7)
    p.add_argument("--tokenizer", help="HF tokenizer dir or hub id; needed to tokenize and to "
                   "enforce --max-prompt-length")
    p.add_argument("--max-prompt-length", type=int, default=1024)
    p.add_argument("--long-prompts", choices=["drop", "truncate_left"], default="drop",
                   help="what to do with prompts over --max-prompt-length")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="skip and count malformed records instead of stopping")
    p.add_argument("--shuffle-seed", type=int, default=None,
                   help="shuffle before splitting (off by default, as in DiagnosisZero)")
    p.set_defaults(func=_prepare_data)

    p = sub.add_parser("convert", help="convert between HF safetensors and jaxzero checkpoints",
                       description="hf-to-jax HF_DIR OUT_DIR writes an orbax checkpoint with "
                       "the model config and tokenizer beside it; jax-to-hf CKPT_DIR OUT_DIR "
                       "writes an HF directory (sharded safetensors, config, tokenizer).")
    p.add_argument("direction", choices=["hf-to-jax", "jax-to-hf"])
    p.add_argument("src", help="HF model dir (hf-to-jax) or jaxzero checkpoint/run dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.set_defaults(func=_convert)

    p = sub.add_parser("train", help="run GRPO training from a YAML config",
                       description="Train with GRPO. Dotted overrides follow the config, e.g. "
                       "`jaxzero train configs/qwen2.5-3b.yaml rollout.n=8 optim.lr=1e-6`. "
                       "Resumes automatically when the run directory has checkpoints.")
    p.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides key=value")
    p.add_argument("--resume", action="store_true",
                   help="require an existing checkpoint to resume from")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory that holds another config")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="RareArena evaluation of one or more checkpoints",
                       description="Generate (greedy) for a test file with each model or "
                       "checkpoint, score by the matching rule and optionally an LLM judge "
                       "(RareArena protocol), and write report.md and report.json.")
    p.add_argument("models", nargs="+", help="HF dirs, jaxzero dirs or run dirs "
                   "(a run dir evaluates each of its checkpoints)")
    p.add_argument("--data", required=True, help="prepared test file (test.jsonl)")
    p.add_argument("--top-k", type=int, choices=[1, 5], default=1)
    p.add_argument("--judge", choices=["none", "openai", "local"], default="none")
    p.add_argument("--judge-url", help="openai judge: base URL, e.g. http://localhost:8000/v1")
    p.add_argument("--judge-model", help="openai judge model name, or local judge model path")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the judge's API key (never logged)")
    p.add_argument("--judge-max-new-tokens", type=int, default=512,
                   help="local judge: tokens its reply may take")
    p.add_argument("--hypernyms", help="RareArena orphanet_hypernym.json (for score 1)")
    p.add_argument("--out", default="eval_out", help="report directory")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N cases only")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.set_defaults(func=_eval)

    p = sub.add_parser("generate", help="sample completions with the jitted KV-cache sampler")
    p.add_argument("model", help="HF dir, hub id or jaxzero checkpoint/run dir")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 means off")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object per completion")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.set_defaults(func=_generate)

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
    p.set_defaults(func=_plan)

    p = sub.add_parser("plot", help="PNG plots of a run from its TensorBoard events")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output dir (default RUN_DIR/plots)")
    p.set_defaults(func=_plot)
    return parser


def _use_compilation_cache() -> None:
    """Keeps compiled programs on disk so a restarted (preempted) run skips recompiling."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                             "jaxzero", "xla")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may also follow the options (`train CFG --resume rollout.n=8`).
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if extra != overrides or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    if args.command in ("train", "eval", "generate"):
        _use_compilation_cache()
    # transformers serves only tokenizers and config files here: its advice that PyTorch is
    # missing is noise (torch is never a runtime dependency of jaxzero).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        args.func(args)
    except JaxzeroError as err:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"jaxzero {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"jaxzero {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:  # an incomplete install: say what to install, not where
        if args.debug:
            traceback.print_exc()
        else:
            print(f"jaxzero {args.command}: error: a dependency is missing: {err} "
                  "(reinstall jaxzero with `pip install -e .` to get all of them)",
                  file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxzero {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
