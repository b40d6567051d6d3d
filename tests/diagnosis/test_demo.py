"""The demo: the warm-up's answers, its data split by familiar disease, a shortened
`jaxzero train configs/demo.yaml` that logs the held-out accuracy before and after GRPO, and
(slow) the full demo, whose held-out accuracy must rise."""

import collections
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO
from jaxzero.config.files import load_config
from jaxzero.diagnosis.demo import demo_splits, warmup_answers
from jaxzero.diagnosis.demo_data import demo_cases_path
from jaxzero.diagnosis.rarearena import prepare_data, read_prepared
from jaxzero.errors import ConfigError
from jaxzero.monitor.plots import read_scalars

FAMILIAR = ["A", "B"]
UNFAMILIAR = ["C", "D", "E"]


def test_warmup_answers_familiar_rightly_and_the_others_at_random():
    rng = np.random.default_rng(0)
    own = ["A", "B"] * 100 + ["C"] * 3000 + ["D"] * 3000
    answers = warmup_answers(own, FAMILIAR, UNFAMILIAR, rng)
    assert answers[:200] == own[:200]
    for case in ("C", "D"):  # an unfamiliar case's answer is uniform over the unfamiliar names
        counts = collections.Counter(a for o, a in zip(own, answers) if o == case)
        assert set(counts) == set(UNFAMILIAR)
        assert all(abs(c / 3000 - 1 / 3) < 0.03 for c in counts.values()), counts


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare_data(demo_cases_path(), out)
    return out


def test_demo_splits_hold_grpo_to_the_unfamiliar_diseases(prepared, tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml")
    familiar = cfg.demo.familiar_diseases
    counts = demo_splits(prepared, tmp_path, familiar)
    split = {name: read_prepared(tmp_path / f"{name}.jsonl") for name in counts}
    train_all, test_all = (read_prepared(prepared / f"{n}.jsonl") for n in ("train", "test"))
    diseases = {r["labels"][-1] for r in train_all}
    assert len(familiar) == 5 and set(familiar) < diseases
    # GRPO's train and eval cases are the unfamiliar diseases', in the prepared split's order.
    assert split["train"] == [r for r in train_all if r["labels"][-1] not in familiar]
    assert split["test"] == [r for r in test_all if r["labels"][-1] not in familiar]
    assert {r["labels"][-1] for r in split["test"]} == diseases - set(familiar)
    # The warm-up sees every training case, and no held-out one.
    assert split["warmup"] == train_all
    assert not {r["id"] for r in split["warmup"]} & {r["id"] for r in split["test"]}
    assert counts == {"train": 84, "test": 36, "warmup": 168}


def test_demo_splits_name_the_diseases_on_a_wrong_familiar_one(prepared, tmp_path):
    with pytest.raises(ConfigError, match="'Wilson diseas' is not one of.*did you mean "
                                          "'Wilson disease'"):
        demo_splits(prepared, tmp_path, ["Wilson diseas"])
    names = sorted({r["labels"][-1] for r in read_prepared(prepared / "train.jsonl")})
    with pytest.raises(ConfigError, match="leave at least two"):
        demo_splits(prepared, tmp_path, names[:-1])
    assert not list(tmp_path.iterdir())  # nothing written


def test_demo_config_trains_on_what_the_warm_up_left_to_chance():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.model.demo and cfg.demo.warmup_steps > 0 and cfg.demo.familiar_diseases
    assert cfg.trainer.eval_every and cfg.trainer.max_steps % cfg.trainer.eval_every == 0


# The demo shrunk to seconds: a few warm-up and GRPO steps, the full held-out split.
SHORT = ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.save_every=2",
         "trainer.export_hf=null", "data.prompts_per_step=2", "rollout.n=4",
         "demo.warmup_steps=2", "demo.warmup_batch=8", "model.demo_layers=1"]


def run_demo(run_dir, overrides, timeout_s):
    """`jaxzero train configs/demo.yaml` into run_dir; its stdout."""
    proc = subprocess.run([sys.executable, "-m", "jaxzero.cli", "train",
                           str(REPO / "configs" / "demo.yaml"), *overrides,
                           f"trainer.run_dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "XLA_FLAGS": ""})  # one CPU device, as a laptop has
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo")
    return run_dir, run_demo(run_dir, SHORT, timeout_s=600)


def test_short_demo_logs_held_out_accuracy_before_and_after_grpo(short_demo):
    short_demo, stdout = short_demo
    scalars = read_scalars(short_demo)
    accuracy = dict(scalars["eval/accuracy"])
    assert sorted(accuracy) == [0, 2]  # before the first GRPO step, and after the last
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    assert [s for s, _ in scalars["reward/mean"]] == [1, 2]
    # The eval ran over the whole held-out split: the prepared test cases, none trained on.
    test = read_prepared(short_demo / "data" / "test.jsonl")
    train = read_prepared(short_demo / "data" / "train.jsonl")
    assert len(test) == 36 and not {r["id"] for r in test} & {r["id"] for r in train}
    warmup = read_prepared(short_demo / "data" / "warmup.jsonl")
    assert len(warmup) == 168 and not {r["id"] for r in test} & {r["id"] for r in warmup}
    eval_rewards = dict(scalars["eval/reward_mean"])
    assert sorted(eval_rewards) == [0, 2]
    # The console's last lines say both, and where the plots are.
    before, after = accuracy[0], accuracy[2]
    assert f"held-out accuracy: before GRPO {before:.3f} -> after {after:.3f} (step 2)" in stdout
    assert "plots:" in stdout and (short_demo / "plots" / "eval_accuracy.png").is_file()


@pytest.mark.slow
def test_full_demo_raises_held_out_accuracy(tmp_path):
    # The README's command with nothing shortened: 6-8 minutes on 2 cores. Only the run
    # directory and the HF export move into tmp_path.
    run_dir = tmp_path / "run"
    run_demo(run_dir, [f"trainer.export_hf={run_dir / 'hf'}"], timeout_s=1800)
    accuracy = dict(read_scalars(run_dir)["eval/accuracy"])
    assert sorted(accuracy) == list(range(0, 41, 5))
    before, after = accuracy[0], accuracy[40]
    # Float rounding differs between CPUs (XLA picks other kernels), so the sampled rollouts
    # and the figures differ; the README's table lists the runs seen. Step 0 was 0.111 on every
    # one (4 of 36 held-out cases; chance is 0.2) and step 40 0.667-0.806, a gain of at least
    # 0.556. The bounds leave room for CPUs not yet seen while still telling learning from
    # chance: step 0 within two cases of chance, step 40 at 2.5x chance (0.17 under the lowest
    # run) and at least 0.3 above step 0 (about half the smallest gain).
    assert before <= 0.25, accuracy
    assert after >= 0.5 and after - before >= 0.3, accuracy
