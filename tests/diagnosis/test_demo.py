"""The demo: a format-only warm-up, and a shortened `jaxzero train configs/demo.yaml` that logs
the held-out accuracy before and after GRPO."""

import collections
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO
from jaxzero.config.files import load_config
from jaxzero.diagnosis.demo import warmup_answers
from jaxzero.diagnosis.rarearena import read_prepared
from jaxzero.monitor.plots import read_scalars

DIAGNOSES = ["A", "B", "C", "D"]


def test_warmup_answers_ignore_the_case_at_fraction_zero():
    rng = np.random.default_rng(0)
    own = ["A"] * 2000 + ["B"] * 2000
    answers = warmup_answers(own, DIAGNOSES, 0.0, rng)
    for case in ("A", "B"):  # every case's answers are uniform over the set, its own or not
        counts = collections.Counter(a for o, a in zip(own, answers) if o == case)
        assert set(counts) == set(DIAGNOSES)
        assert all(abs(c / 2000 - 0.25) < 0.04 for c in counts.values()), counts


def test_warmup_answers_at_fraction_one_and_a_half():
    own = ["C", "D", "A"] * 1000
    assert warmup_answers(own, DIAGNOSES, 1.0, np.random.default_rng(0)) == own
    answers = warmup_answers(own, DIAGNOSES, 0.5, np.random.default_rng(0))
    hit = np.mean([a == o for a, o in zip(answers, own)])
    assert abs(hit - (0.5 + 0.5 / 4)) < 0.04, hit


def test_demo_config_warms_up_the_format_only():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.model.demo and cfg.demo.warmup_steps > 0
    assert cfg.demo.warmup_correct_fraction == 0.0  # the accuracy is GRPO's own doing
    assert cfg.trainer.eval_every and cfg.trainer.max_steps % cfg.trainer.eval_every == 0


# The demo shrunk to seconds: a few warm-up and GRPO steps, the full held-out split.
SHORT = ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.save_every=2",
         "trainer.export_hf=null", "data.prompts_per_step=2", "rollout.n=4",
         "demo.warmup_steps=2", "demo.warmup_batch=8", "model.demo_layers=1"]


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "jaxzero.cli", "train",
                           str(REPO / "configs" / "demo.yaml"), *SHORT,
                           f"trainer.run_dir={run_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "XLA_FLAGS": ""})  # one CPU device, as a laptop has
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return run_dir


def test_short_demo_logs_held_out_accuracy_before_and_after_grpo(short_demo):
    scalars = read_scalars(short_demo)
    accuracy = dict(scalars["eval/accuracy"])
    assert sorted(accuracy) == [0, 2]  # before the first GRPO step, and after the last
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    assert [s for s, _ in scalars["reward/mean"]] == [1, 2]
    # The eval ran over the whole held-out split: the prepared test cases, none trained on.
    test = read_prepared(short_demo / "data" / "test.jsonl")
    train = read_prepared(short_demo / "data" / "train.jsonl")
    assert len(test) == 29 and not {r["id"] for r in test} & {r["id"] for r in train}
    eval_rewards = dict(scalars["eval/reward_mean"])
    assert sorted(eval_rewards) == [0, 2]
