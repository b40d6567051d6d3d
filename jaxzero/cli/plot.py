"""`jaxzero plot`: PNG plots of a run from its TensorBoard events."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="PNG plots of a run from its TensorBoard events")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output dir (default RUN_DIR/plots)")
    p.set_defaults(func=run)


def run(args) -> None:
    from jaxzero.monitor.plots import plot_run
    for path in plot_run(args.run_dir, args.out):
        print(f"wrote {path}")
