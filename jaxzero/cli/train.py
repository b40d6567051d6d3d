"""`jaxzero train`: a GRPO run from a YAML config, resumed when its run directory has one."""

from __future__ import annotations


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
    p.set_defaults(func=run)


def run(args) -> None:
    from jaxzero.config.files import load_config
    cfg = load_config(args.config, args.overrides)
    from jaxzero.parallel import distributed
    distributed.initialize()
    from jaxzero.rl.trainer import train
    train(cfg, resume=args.resume, overwrite=args.overwrite)
