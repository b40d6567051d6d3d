"""`jaxzero train`: a GRPO run from a YAML config, resumed when its run directory has one."""

from __future__ import annotations

import contextlib
import sys


def add_parser(sub) -> None:
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
    p.add_argument("--quiet", action="store_true",
                   help="print only the end-of-run summary (and errors)")
    p.add_argument("--log-json", metavar="FILE", default=None,
                   help="also write one JSON object per step to FILE (`-`: stdout, and the "
                   "human-readable lines go to stderr)")
    p.set_defaults(func=run)


def run(args) -> None:
    from jaxzero.config.files import load_config
    cfg = load_config(args.config, args.overrides)
    from jaxzero.parallel import distributed
    distributed.initialize(peer_timeout_s=cfg.trainer.peer_timeout_s)
    from jaxzero.diagnosis.task import make_task
    from jaxzero.rl.trainer import train
    with contextlib.ExitStack() as stack:
        # Flushed per line: a piped log (tee, a job scheduler) shows each step as it ends.
        json_log, out = None, sys.stdout
        if args.log_json == "-":
            json_log, out = sys.stdout, sys.stderr
        elif args.log_json:
            json_log = stack.enter_context(open(args.log_json, "w", encoding="utf-8"))

        def log(line: str) -> None:
            print(line, file=out, flush=True)

        train(cfg, make_task, resume=args.resume, overwrite=args.overwrite, log=log,
              quiet=args.quiet, json_log=json_log)
