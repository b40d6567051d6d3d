"""The GRPO trainer end to end on the demo pipeline, shrunk: resume, preemption, devices, logs.

Every run uses the real demo path (packaged cases, the real Qwen2.5 tokenizer, a tiny model,
the format warm-up) with small batches, so each run takes seconds after compilation.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import REPO
from jaxzero.io.checkpoint import CheckpointStore
from jaxzero.config.files import load_config
from jaxzero.diagnosis.task import make_task
from jaxzero.monitor.plots import read_scalars
from jaxzero.rl.trainer import train

DEMO = REPO / "configs" / "demo.yaml"
SMALL = ["data.prompts_per_step=2", "rollout.n=4", "rollout.max_new_tokens=24",
         "demo.warmup_steps=2", "demo.warmup_batch=8", "data.eval_max_prompts=4",
         "trainer.eval_every=2", "trainer.save_every=2", "trainer.export_hf=null",
         "model.demo_layers=1", "grpo.entropy_coeff=0.001"]


def _run_in_process(run_dir, *extra, log=lambda *_: None, **kwargs):
    cfg = load_config(DEMO, SMALL + [f"trainer.run_dir={run_dir}", *extra])
    return train(cfg, make_task, log=log, **kwargs)


def _cli(run_dir, *extra, devices=None, **popen):
    env = dict(os.environ)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [sys.executable, "-m", "jaxzero.cli", "train", str(DEMO), *SMALL,
           f"trainer.run_dir={run_dir}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO, **popen)


def _params(run_dir, step):
    store = CheckpointStore(Path(run_dir) / "checkpoints")
    meta = store.restore_meta(step)
    assert meta["step"] == step
    import orbax.checkpoint as ocp
    tree = ocp.PyTreeCheckpointer().restore(Path(run_dir) / "checkpoints" / str(step) /
                                            "arrays")
    return tree["params"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """4 steps straight through, on the 8 simulated devices (mesh fsdp=8)."""
    run_dir = tmp_path_factory.mktemp("full")
    last = _run_in_process(run_dir, "trainer.max_steps=4")
    return run_dir, last


# Slow (152 s on the 2-core VM, beyond the shared 143 s fixture): two more in-process runs.
# The default suite keeps the checkpoint's bit-exact round trip, the torn-checkpoint
# fallback and the stop's saves (tests/io/test_checkpoint.py, tests/rl/test_stop.py).
@pytest.mark.slow
def test_resume_is_exact(full_run, tmp_path):
    full_dir, _ = full_run
    lines = []
    _run_in_process(tmp_path, "trainer.max_steps=2", log=lines.append, quiet=True)
    # --quiet: only the end-of-run summary.
    assert lines[0].startswith("held-out accuracy: before GRPO ") and \
        lines[1].startswith("done at step 2.") and len(lines) == 4, lines
    _run_in_process(tmp_path, "trainer.max_steps=4")  # resumes from step 2
    a, b = _params(full_dir, 4), _params(tmp_path, 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    sa, sb = read_scalars(full_dir), read_scalars(tmp_path)
    for tag in ("reward/mean", "losses/pg_loss", "losses/kl", "optim/grad_norm",
                "response/length_mean", "eval/accuracy"):
        assert sa[tag] == sb[tag], tag


def test_tensorboard_has_scalars_text_and_hparams(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir, _ = full_run
    events = sorted((run_dir / "tb").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("reward/mean", "reward/std", "reward/accuracy", "format/format_ok",
                "format/think_dropped", "response/length_mean", "response/length_max",
                "response/clip_ratio", "losses/pg_loss", "losses/kl", "losses/entropy",
                "losses/clipfrac", "optim/grad_norm", "optim/lr", "reward/zero_std_groups",
                "time/rollout", "time/reward", "time/reward_wait", "time/step",
                "perf/tokens_per_s", "data/informative_groups", "optim/skipped", "eval/accuracy", "eval/format_ok",
                "eval/response_length_mean"):
        assert tag in scalars, tag
    assert [e.step for e in acc.Scalars("reward/mean")] == [1, 2, 3, 4]
    # Once per eval (eval_every=2, plus step 0), never twice for one step.
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [0, 2, 4]
    assert all(e.value > 1.0 for e in acc.Scalars("losses/entropy"))  # nats, ~log(152k)
    texts = set(acc.Tags()["tensors"])
    assert {"eval/samples/text_summary", "hyperparameters/text_summary"} <= texts
    panel = acc.Tensors("eval/samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "reward" in panel and "labels" in panel


def test_demo_cli_on_one_device_matches_eight_and_exports(full_run, tmp_path, tmp_path_factory):
    """`jaxzero train configs/demo.yaml` as a user runs it, on 1 device: same metrics as the
    8-device run within float tolerance; the checkpoint restores; the HF export loads."""
    full_dir, _ = full_run
    log_json = tmp_path_factory.mktemp("log") / "log.jsonl"  # beside the run dir, not in it
    proc = _cli(tmp_path, "trainer.max_steps=2", f"trainer.export_hf={tmp_path / 'hf'}",
                "--log-json", str(log_json), devices=1)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "TensorBoard" in out and str(tmp_path / "hf") in out
    lines = out.splitlines()
    assert len(lines) == len(set(lines)), out  # nothing printed twice
    assert any(line.startswith("step 1/2 · ") and "s/step" in line for line in lines), out
    assert any(line.startswith("eval @ step 2: accuracy ") and "(4 cases)" in line
               for line in lines), out
    assert "held-out accuracy: before GRPO " in out and "step 1: rollouts (compiling" in out
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "eval_accuracy.png", "kl.png", "response_length.png", "reward.png"]
    # One JSON object per step (the step-0 eval first), valid JSON: no bare NaN.
    records = [json.loads(line) for line in log_json.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert "eval/accuracy" in records[0] and "eval/accuracy" in records[2]
    assert "reward/mean" in records[1] and "losses/kl" in records[1]
    # Same rollouts and losses, and step 1's gradient norm within 1 %. Step 2's gradient norm
    # is not compared: Adam's first step turns float-rounding-sized gradients (which differ
    # between 1 and 8 devices, 6e-6 relative) into lr-sized moves of the parameters, so it
    # came out 5.7 % apart, and 16.6 % after a rewrite of the lm_head's backward that left
    # the 1-vs-8-device gradients as close as before. tests/parallel/test_sharding.py
    # compares the sharded update itself.
    one, eight = read_scalars(tmp_path), read_scalars(full_dir)
    for tag, rtol, steps in (("reward/mean", 1e-3, 2), ("response/length_mean", 1e-3, 2),
                             ("losses/pg_loss", 1e-2, 2), ("optim/grad_norm", 1e-2, 1)):
        for (_, got), (_, want) in zip(one[tag][:steps], eight[tag][:steps]):
            np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-5, err_msg=tag)
    assert _params(tmp_path, 2) is not None
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert model.config.num_hidden_layers == 1


@pytest.mark.slow  # about 2 min; tests/rl/test_stop.py and the 2-process SIGTERM test cover it
def test_preemption_saves_and_resumes(tmp_path):
    proc = _cli(tmp_path, "trainer.max_steps=200", "trainer.save_every=100",
                "trainer.eval_every=0")
    lines = []
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if re.match(r"step +2/\d+ · ", line):
            proc.send_signal(signal.SIGTERM)
            break
        assert line or proc.poll() is None, "".join(lines)
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "received SIGTERM" in out
    saved = CheckpointStore(tmp_path / "checkpoints").latest_step()
    assert saved is not None and 2 <= saved < 200
    resumed = _cli(tmp_path, f"trainer.max_steps={saved + 1}", "trainer.save_every=100",
                   "trainer.eval_every=0")
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert f"(step {saved})" in out and f"step {saved + 1}/{saved + 1} · " in out


def test_changed_config_is_refused(full_run):
    from jaxzero.errors import ConfigError
    run_dir, _ = full_run
    with pytest.raises(ConfigError, match="optim.lr"):
        _run_in_process(run_dir, "trainer.max_steps=4", "optim.lr=0.5")


def test_plot_writes_the_four_pngs(full_run, tmp_path):
    from jaxzero.monitor.plots import plot_run
    run_dir, _ = full_run
    written = plot_run(run_dir, tmp_path)
    assert sorted(p.name for p in written) == ["eval_accuracy.png", "kl.png", "response_length.png",
                                               "reward.png"]
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_a_signal_during_setup_exits_cleanly(tmp_path):
    """SIGTERM in the demo warm-up (part of setup): exit 0 with one line, nothing saved."""
    proc = _cli(tmp_path, "demo.warmup_steps=100000", "trainer.max_steps=2")
    lines = []
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("demo warm-up 1/100000"):
            proc.send_signal(signal.SIGTERM)
            break
        assert line or proc.poll() is None, "".join(lines)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    stopped = [line for line in out.splitlines() if "received SIGTERM" in line]
    assert stopped == ["received SIGTERM: stopped during setup, before any training step; "
                       "nothing to save"], out[-3000:]
    assert "Traceback" not in out
    assert CheckpointStore(tmp_path / "checkpoints").latest_step() is None
