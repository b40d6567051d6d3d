"""`jaxzero plot`: PNG plots of a run, read from its TensorBoard event files."""

from __future__ import annotations

from pathlib import Path

from jaxzero.errors import JaxzeroError

# (file name, title, y label, the tags drawn, first tag found wins per line)
PLOTS = (
    ("eval_accuracy.png", "Eval top-1 accuracy (matching rule)", "accuracy", ("eval/accuracy",)),
    ("response_length.png", "Mean response length", "tokens",
     ("response/length_mean", "eval/response_length_mean")),
    ("reward.png", "Training reward", "reward", ("reward/mean", "eval/reward_mean")),
    ("kl.png", "KL to the reference policy", "KL", ("losses/kl",)),
)


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the run's event files, as (step, value) sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = Path(run_dir)
    tb = run_dir / "tb" if (run_dir / "tb").is_dir() else run_dir
    if not any(tb.glob("events.out.tfevents.*")):
        raise JaxzeroError(f"no TensorBoard event files in {tb}")
    series: dict[str, dict[int, float]] = {}
    for events in sorted(tb.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                series.setdefault(tag, {})[e.step] = e.value  # later files win on resume
    return {tag: sorted(points.items()) for tag, points in series.items()}


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scalars = read_scalars(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, ylabel, tags in PLOTS:
        present = [t for t in tags if t in scalars]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for tag in present:
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=tag)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)
    if not written:
        raise JaxzeroError(f"{run_dir}: none of the plotted metrics were logged "
                           f"({', '.join(t for p in PLOTS for t in p[3])})")
    return written
