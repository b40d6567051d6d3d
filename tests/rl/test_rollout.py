"""Host-side batch assembly, DAPO selection, the task seam, and the config wiring of setup.py."""

import ast
import dataclasses
import json

import numpy as np
import pytest

from helpers import REPO, TINY, toy_records, toy_task
from jaxzero.config.schema import config_from_dict
from jaxzero.errors import ConfigError
from jaxzero.model.qwen2 import ModelOptions
from jaxzero.model.sampler import SampleOutput
from jaxzero.monitor.writer import eval_line, json_line, step_line
from jaxzero.rl import grpo, setup
from jaxzero.rl.rollout import (Candidates, ScoredRollouts, assemble_batch, select_groups,
                                training_samples)

N, R = 2, 3


def rollouts(prompts, width, scores, seed=0):
    """A host SampleOutput of len(prompts) × N rows, prompts left-padded to `width`."""
    rng = np.random.default_rng(seed)
    b = len(prompts) * N
    pt = np.zeros((b, width), np.int32)
    pm = np.zeros((b, width), bool)
    for i, p in enumerate([p for p in prompts for _ in range(N)]):
        pt[i, width - len(p):], pm[i, width - len(p):] = p, True
    tokens = rng.integers(1, 50, (b, R)).astype(np.int32)
    out = SampleOutput(tokens=tokens, mask=np.ones((b, R), bool),
                       logprobs=-rng.random((b, R)).astype(np.float32),
                       lengths=np.full(b, R, np.int32), stopped=np.ones(b, bool),
                       prompt_tokens=pt, prompt_mask=pm)
    records = [{"id": f"p{seed}-{i}", "prompt_token_ids": list(p), "labels": [f"D{seed}-{i}"]}
               for i, p in enumerate(prompts)]
    texts = [f"text {seed}-{i}" for i in range(b)]
    return Candidates(out, records, ScoredRollouts(texts, np.array(scores, np.float32), {}, 0.0))


def assemble(candidates, groups):
    return assemble_batch(candidates, groups, N, pad_id=0, adv_eps=1e-6, scale_by_std=True,
                          mask_truncated=False)


def test_refill_batches_of_other_prompt_buckets_assemble_into_one_width():
    """Issue 13 §5: np.stack crashed when a DAPO refill used another prompt bucket."""
    first = rollouts([[3, 4], [5, 6, 7]], width=4, scores=[0, 0, 1, 0], seed=0)
    refill = rollouts([[8] * 7, [9, 9]], width=8, scores=[1, 0, 0, 0], seed=1)
    groups, informative = select_groups([first, refill], N, want=2)
    assert groups == [(0, 1), (1, 0)] and informative == 2
    batch = assemble([first, refill], groups)
    assert batch.tokens_BT.shape == (4, 8 + R) and batch.valid_BT.shape == (4, 8 + R)
    # Prompts stay right-aligned against the response; the padding is invalid.
    np.testing.assert_array_equal(batch.tokens_BT[0, :8], [0, 0, 0, 0, 0, 5, 6, 7])
    np.testing.assert_array_equal(batch.valid_BT[0, :8], [0] * 5 + [1] * 3)
    np.testing.assert_array_equal(batch.tokens_BT[2, :8], [0] + [8] * 7)
    np.testing.assert_array_equal(batch.tokens_BT[:2, 8:], first.rollouts.tokens[2:4])
    np.testing.assert_array_equal(batch.tokens_BT[2:, 8:], refill.rollouts.tokens[0:2])
    np.testing.assert_array_equal(batch.scores_B, [1, 0, 1, 0])
    np.testing.assert_allclose(batch.advantages_B,
                               grpo.group_advantages(np.array([1, 0, 1, 0.]), N), rtol=1e-6)
    np.testing.assert_array_equal(batch.sampler_logp_BR[2:], refill.rollouts.logprobs[:2])


def test_training_samples_pair_each_completion_with_its_own_prompts_target():
    """Issue 13 §5: train/samples showed prompt 0's completions beside prompt 1's labels."""
    cand = rollouts([[3], [4], [5]], width=2, scores=[0, 1, 1, 0, 0, 0], seed=0)
    batch = assemble([cand], [(0, 0), (0, 1), (0, 2)])
    task = dataclasses.replace(toy_task(toy_records(2)), target=lambda r: r["labels"])
    samples = training_samples(batch, task, 4)
    assert [s.completion for s in samples] == [f"text 0-{i}" for i in range(4)]
    assert [s.target for s in samples] == [["D0-0"], ["D0-0"], ["D0-1"], ["D0-1"]]
    assert [s.score for s in samples] == [0, 1, 1, 0]


def test_the_rl_engine_imports_no_task_code():
    """Nothing under jaxzero/rl/ imports jaxzero.diagnosis (function-level imports too)."""
    found = set()
    for path in sorted((REPO / "jaxzero" / "rl").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found |= {(path.name, n) for n in names if n.split(".")[:2] == ["jaxzero",
                                                                            "diagnosis"]}
    assert found == set()


def small_cfg(**rollout):
    return config_from_dict({"model": {"demo": True}, "data": {"prompts_per_step": 4},
                             "rollout": {"n": 4, "max_new_tokens": 8, **rollout}})


def test_rollout_micro_batch_and_cache_dtype_reach_the_sampler():
    """Issue 13 §5: both knobs were dead. micro_batch counts sequences, the sampler prompts."""
    mesh = setup.validate(small_cfg())
    sampler = setup.build_sampler(small_cfg(micro_batch=8, cache_dtype="bfloat16"), TINY,
                                  ModelOptions(), mesh, stop_ids=(1,), pad_id=0)
    assert sampler.config.max_prompts_per_call == 2 and sampler.config.cache_dtype == "bfloat16"
    default = setup.build_sampler(small_cfg(), TINY, ModelOptions(), mesh, stop_ids=(1,),
                                  pad_id=0)
    assert default.config.max_prompts_per_call is None and default.config.cache_dtype is None
    with pytest.raises(ConfigError, match="rollout.micro_batch=6: .*multiple of rollout.n"):
        small_cfg(micro_batch=6)
    with pytest.raises(ConfigError, match="rollout.cache_dtype"):
        small_cfg(cache_dtype="int3")


def test_loss_config_reads_every_field_from_the_grpo_section():
    cfg = config_from_dict({"model": {"demo": True},
                            "grpo": {"clip_low": 0.1, "clip_high": 0.3, "clip_c": 3.0,
                                     "loss_agg": "seq-mean-token-sum", "entropy_coeff": 0.0,
                                     "use_kl_loss": False, "kl_coef": 0.5, "kl_kind": "k2"}})
    assert setup.loss_config(cfg.grpo) == grpo.LossConfig(
        clip_low=0.1, clip_high=0.3, clip_c=3.0, agg="seq-mean-token-sum", entropy_coeff=0.0,
        use_kl_loss=False, kl_coef=0.5, kl_kind="k2")


def test_console_lines_and_the_json_log():
    metrics = {"reward/mean": 0.4213, "reward/accuracy": 0.3125, "format/format_ok": 0.984,
               "response/length_mean": 24.66, "losses/kl": 0.01912, "optim/grad_norm": 0.3991,
               "time/step": 3.21, "losses/pg_loss": float("nan")}
    assert step_line(12, 40, metrics, elapsed=103, eta=250) == (
        "step 12/40 · 0:01:43 elapsed · ETA 0:04:10 | reward 0.42 · acc 0.31 · format 0.98 · "
        "len 24.7 · kl 0.019 · grad 0.40 · 3.2 s/step")
    assert step_line(3, 100, {}, elapsed=0, eta=None).startswith("step   3/100 · 0:00:00 "
                                                                 "elapsed · ETA -:--:--")
    assert eval_line(10, {"accuracy": 0.3125, "reward_mean": 0.42, "format_ok": 0.98,
                          "think_dropped": 0.0, "mixed_language": 0.0}, 64, 12.31) == (
        "eval @ step 10: accuracy 0.31 (64 cases) · reward 0.42 · format 0.98 · "
        "think-dropped 0.00 · mixed-language 0.00 · 12.3 s")
    line = json_line(12, metrics)
    assert json.loads(line)["losses/pg_loss"] is None and "NaN" not in line
    assert json.loads(line)["step"] == 12


def test_a_permuted_batch_moves_every_row_field_together():
    cand = rollouts([[3], [4, 5]], width=2, scores=[0, 1, 1, 1], seed=0)
    batch = assemble([cand], [(0, 0), (0, 1)])
    order = np.array([3, 0, 2, 1])
    moved = batch.take(order)
    assert batch.take(None) is batch
    for name in ("tokens_BT", "valid_BT", "response_mask_BR", "advantages_B",
                 "sampler_logp_BR", "scores_B", "lengths_B", "truncated_B"):
        np.testing.assert_array_equal(getattr(moved, name), getattr(batch, name)[order], name)
    assert moved.texts == [batch.texts[i] for i in order]
    assert [r["id"] for r in moved.records] == [batch.records[i]["id"] for i in order]
