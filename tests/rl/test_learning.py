"""GRPO learns, through the engine's own loop: on a toy task (a second Task beside the
diagnosis one, proving the seam) a tiny model's mean reward rises within a few dozen steps.

The task: after a random prompt, emit the tokens 5, 6, 7; the reward is the fraction of those
three positions right. A random 32-token policy scores about 0.03 at the start.
"""

import jax
import numpy as np
from flax import nnx

from helpers import toy_records, toy_task
from jaxzero.config.schema import config_from_dict
from jaxzero.io.checkpoint import CheckpointStore
from jaxzero.model.config import Qwen2Config
from jaxzero.model.qwen2 import ModelOptions, init_model
from jaxzero.monitor.writer import Console, MetricsWriter
from jaxzero.rl import grpo, setup, trainer
from jaxzero.rl.rollout import RewardWorker
from jaxzero.rl.train_step import build_step_functions, init_opt_state

CFG = Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
STEPS = 30


def toy_run(tmp_path, steps=STEPS, buckets=(8,), grpo=(), records=None):
    """The engine's pieces wired for the toy task with setup.py's own builders."""
    cfg = config_from_dict({
        "model": {"demo": True},
        "data": {"prompts_per_step": 8, "max_prompt_length": 8, "prompt_buckets": list(buckets),
                 "shuffle": records is None},
        "rollout": {"n": 8, "max_new_tokens": 3, "use_sampler_logprobs": True},
        "grpo": {"use_kl_loss": False, "entropy_coeff": 0.0, **dict(grpo)},
        "optim": {"lr": 3e-2, "weight_decay": 0.0, "b2": 0.99},
        "trainer": {"run_dir": str(tmp_path), "max_steps": steps, "eval_every": 0,
                    "save_every": 1000, "total_epochs": 1}})
    task = toy_task(records or toy_records(8 * steps))
    mesh = setup.validate(cfg)
    graphdef, params = nnx.split(init_model(CFG, seed=0))
    loader = setup.make_loader(cfg, task.train_records)
    total = setup.total_steps(cfg, loader)
    optimizer, schedule = setup.optimizer_and_schedule(cfg.optim, total)
    fns = build_step_functions(graphdef, params, optimizer, setup.loss_config(cfg.grpo), mesh,
                               response_len=cfg.rollout.max_new_tokens)
    params = jax.device_put(params, fns.param_shardings)
    engine = setup.Engine(
        cfg=cfg, mesh=mesh, fns=fns, task=task, reward_worker=RewardWorker(task),
        sampler=setup.build_sampler(cfg, CFG, ModelOptions(), mesh, stop_ids=(31,), pad_id=0),
        ref_params=None, base_key=jax.random.key(0), pad_id=0,
        lr_at=lambda s: float(schedule(s)))
    files = setup.RunFiles(cfg=cfg, run_dir=tmp_path, model_config=CFG,
                           writer=MetricsWriter(tmp_path / "tb"),
                           store=CheckpointStore(tmp_path / "checkpoints"), total_steps=total)
    state = setup.TrainState(params, init_opt_state(optimizer, params, fns.opt_shardings),
                             loader, 0)
    return engine, files, state


def test_mean_reward_rises_on_a_toy_task(tmp_path, monkeypatch):
    engine, files, state = toy_run(tmp_path)
    events, rewards = [], []
    sample, step_metrics = trainer.sample, trainer.step_metrics

    def sample_spy(engine, state, *args, **kwargs):
        events.append(("sample", state.step + 1))
        return sample(engine, state, *args, **kwargs)

    def metrics_spy(record, seconds):
        events.append(("metrics", record.step))
        out = step_metrics(record, seconds)
        rewards.append(out["reward/mean"])
        return out

    order = []
    passes, waited = trainer.logprob_passes, trainer._waited
    monkeypatch.setattr(trainer, "logprob_passes",
                        lambda *a, **k: order.append("passes") or passes(*a, **k))
    monkeypatch.setattr(trainer, "_waited", lambda *a: order.append("wait") or waited(*a))
    monkeypatch.setattr(trainer, "sample", sample_spy)
    monkeypatch.setattr(trainer, "step_metrics", metrics_spy)
    try:
        state, last = trainer.run_loop(engine, files, state, Console(lambda *_: None))
    finally:
        setup.close_run(engine, files)
    assert state.step == STEPS and len(rewards) == STEPS
    # Deferred metrics: step N's come to the host only after step N+1's rollouts are
    # dispatched; the last step's after the loop.
    expected = [("sample", 1)] + [e for n in range(2, STEPS + 1)
                                  for e in (("sample", n), ("metrics", n - 1))]
    assert events == expected + [("metrics", STEPS)]
    # The reward is awaited only once the log-prob passes are dispatched (they overlap it).
    assert order == ["passes", "wait"] * STEPS
    assert "toy/starts_with_5" in last and "time/reward_wait" in last
    first, final = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"mean reward: first 5 steps {first:.3f}, last 5 steps {final:.3f}")
    assert first < 0.15 and final > first + 0.3, rewards


def test_dapo_refills_from_other_prompt_buckets_through_the_loop(tmp_path, monkeypatch):
    """Dynamic sampling end to end: refill batches padded to other buckets (4 and 8) join one
    batch (issue 13 §5: this crashed in np.stack)."""
    # In file order: batches of 8 alternate between 3-token prompts (bucket 4) and 7-token
    # ones (bucket 8), so every refill comes from the other bucket.
    records = [{"id": f"toy{i}", "prompt_token_ids": [9 + i % 20] * (3 if i // 8 % 2 == 0 else 7)}
               for i in range(64)]
    engine, files, state = toy_run(tmp_path, steps=2, buckets=(4, 8), records=records,
                                   grpo={"filter_zero_std_groups": True,
                                         "max_refill_batches": 2})
    widths = []
    update = trainer.update

    def update_spy(engine, state, rows, loss, console=None):
        widths.append(rows.tokens_MBW.shape)
        return update(engine, state, rows, loss, console)

    monkeypatch.setattr(trainer, "update", update_spy)
    try:
        state, last = trainer.run_loop(engine, files, state, Console(lambda *_: None))
    finally:
        setup.close_run(engine, files)
    assert state.step == 2
    # Step 1 began with a bucket-4 batch and was refilled from a bucket-8 one: its 64 rows are
    # as wide as the widest bucket's (8 + 3; trimming rounds up to grpo.row_width_multiple,
    # at most that).
    assert widths[0] == (1, 64, 8 + 3), widths


def test_the_update_sees_the_rows_in_the_seeds_order(tmp_path, monkeypatch):
    """seed-micro-token-mean: the update's rows are the assembled batch's in the seed's
    Karmarkar-Karp order (known from the tokens alone, before the rewards)."""
    engine, files, state = toy_run(tmp_path, steps=1, grpo={
        "loss_agg": "seed-micro-token-mean", "seed_micro_batch_rows": 8, "seed_dp_ranks": 2})
    seen = {}
    assemble, update = trainer.assemble, trainer.update
    monkeypatch.setattr(trainer, "assemble",
                        lambda *a: seen.setdefault("batch", assemble(*a)))
    monkeypatch.setattr(trainer, "update", lambda engine, state, rows, loss, console=None:
                        seen.setdefault("train", (rows, loss))
                        and update(engine, state, rows, loss, console))
    try:
        trainer.run_loop(engine, files, state, Console(lambda *_: None))
    finally:
        setup.close_run(engine, files)
    host, (rows, loss) = seen["batch"], jax.device_get(seen["train"])
    order = grpo.seed_row_order(host.valid_BT.sum(-1), 2)
    assert sorted(order) == list(range(64)) and list(order) != list(range(64))
    # One micro-batch of trimmed rows: row b holds the b-th rollout of the seed's order.
    prompt = host.tokens_BT.shape[1] - host.sampler_logp_BR.shape[1]
    for b, i in enumerate(order):
        real, length = host.tokens_BT[i][host.valid_BT[i]], int(host.lengths_B[i])
        np.testing.assert_array_equal(rows.tokens_MBW[0, b, :real.size], real)
        np.testing.assert_array_equal(rows.targets_MBN[0, b, :length],
                                      host.tokens_BT[i, prompt:prompt + length])
        np.testing.assert_array_equal(loss.advantages_MBN[0, b, :length], host.advantages_B[i])
        np.testing.assert_array_equal(loss.old_logp_MBN[0, b, :length],
                                      host.sampler_logp_BR[i, :length])
