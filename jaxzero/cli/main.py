"""The `jaxzero` parser and entry point: one-line errors, the compilation cache, dispatch.

Each command lives in its own module here with `add_parser` and `run`. Heavy imports (jax,
transformers) happen inside `run`, so `--help` is instant and `plan --devices N` can set up
simulated devices before jax starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from jaxzero.cli import convert, generate, plan, plot, prepare_data, train
from jaxzero.cli import eval as eval_cmd
from jaxzero.errors import JaxzeroError, PeerLostError

COMMANDS = (prepare_data, convert, train, eval_cmd, generate, plan, plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxzero", description="R1-Zero-style GRPO for Qwen2.5 in pure JAX "
        "(a reimplementation of DiagnosisZero).")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
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
    except PeerLostError as err:
        print(f"jaxzero {args.command}: error: {err}", file=sys.stderr)
        from jaxzero.parallel.distributed import abandon
        abandon()  # does not return: JAX's exit barrier would wait for the lost peer
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
