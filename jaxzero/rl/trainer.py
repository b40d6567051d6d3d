"""The GRPO loop: rollouts, rewards, reference log-probs, updates, evals and checkpoints.

The loop only orchestrates; the math lives in grpo.py, the jitted pieces in train_step.py and
sampler.py, and the run's pieces (model, data, checkpoints) are built by run_setup.py.
"""

from __future__ import annotations

import signal
import time

import jax
import numpy as np

from jaxzero.parallel import distributed
from jaxzero.errors import JaxzeroError
from jaxzero.diagnosis.evaluate import evaluate_records
from jaxzero.monitor.writer import console_line, samples_markdown
from jaxzero.rl import grpo
from jaxzero.rl.rollout import advantages, response_mask, rollout_metrics
from jaxzero.rl.setup import Run, save_checkpoint, setup_run
from jaxzero.parallel.sharding import to_host
from jaxzero.rl.train_step import TrainBatch


class _StopSignal:
    """SIGTERM/SIGINT (preemption) ask the loop to finish the step, save and exit cleanly."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _global_batch(run: Run, records: list[dict]) -> list[dict]:
    """Every process's prompts, in process order: the sampler's batch is global, and every
    process must hand it the same values (each computes only its own devices' rows)."""
    if jax.process_count() == 1:
        return records
    from jax.experimental import multihost_utils
    local = np.array([run.record_index[r["id"]] for r in records], np.int64)
    every = np.asarray(multihost_utils.process_allgather(local)).reshape(-1)
    return [run.train_records[i] for i in every]


def _sample_groups(run: Run, records, key):
    """Rollouts for one global batch of prompts: host arrays plus a pending reward future."""
    cfg = run.cfg
    out = run.sample(run.params, [r["prompt_token_ids"] for r in records], key=key,
                     n=cfg.rollout.n, temperature=cfg.rollout.temperature,
                     top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k)
    host = jax.tree.map(to_host, out)
    labels = [r["labels"] for r in records for _ in range(cfg.rollout.n)]
    pending = run.reward_worker.submit(host.tokens, host.lengths, labels)
    return host, labels, pending


def _select_groups(candidates, n: int, want: int):
    """DAPO dynamic sampling: keep groups whose rewards differ, fill up to `want` groups."""
    keep, spare = [], []
    for c_index, (host, scored) in enumerate(candidates):
        spread = scored.scores_B.reshape(-1, n).std(axis=1)
        for g, s in enumerate(spread):
            (keep if s > 0 else spare).append((c_index, g))
    chosen = (keep + spare)[:want]
    return chosen, len(keep)


def grpo_step(run: Run, step: int) -> dict[str, float]:
    """One GRPO step; returns host metrics. Raises StopIteration when the data is exhausted."""
    cfg = run.cfg
    n = cfg.rollout.n
    timings = {}
    t0 = time.perf_counter()
    key = jax.random.fold_in(run.base_key, step)
    records = _global_batch(run, next(run.loader))
    host, _, pending = _sample_groups(run, records, jax.random.fold_in(key, 0))
    jax.block_until_ready(host.tokens)
    timings["time/rollout"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    scored = pending.result()
    candidates = [(host, scored)]
    refills = 0
    if cfg.grpo.filter_zero_std_groups:
        while refills < cfg.grpo.max_refill_batches and \
                _select_groups(candidates, n, len(records))[1] < len(records):
            refills += 1
            more = _global_batch(run, next(run.loader))
            h, _, p = _sample_groups(run, more, jax.random.fold_in(key, refills))
            candidates.append((h, p.result()))
    chosen, informative = _select_groups(candidates, n, len(records))
    rows = [(c, g * n + i) for c, g in chosen for i in range(n)]
    pick = lambda field: np.stack([getattr(candidates[c][0], field)[r] for c, r in rows])
    scores_B = np.array([candidates[c][1].scores_B[r] for c, r in rows], np.float32)
    texts = [candidates[c][1].texts[r] for c, r in rows]
    timings["time/reward"] = time.perf_counter() - t1

    tokens_BR, valid_BR, lengths_B = pick("tokens"), pick("mask"), pick("lengths")
    truncated_B = ~pick("stopped")
    tokens_BL = np.concatenate([pick("prompt_tokens"), tokens_BR], axis=1)
    valid_BL = np.concatenate([pick("prompt_mask"), valid_BR], axis=1)
    adv_B = advantages(scores_B, n, eps=cfg.grpo.adv_eps, scale_by_std=cfg.grpo.scale_by_std)
    mask_BR = response_mask(valid_BR, truncated_B, cfg.grpo.mask_truncated)
    sampler_logp_BR = pick("logprobs")
    if cfg.grpo.seed_dp_ranks:  # seed-micro-token-mean: rows in the seed's micro-batches
        order = grpo.seed_row_order(valid_BL.sum(-1), cfg.grpo.seed_dp_ranks)
        tokens_BL, valid_BL, mask_BR, adv_B, sampler_logp_BR = (
            x[order] for x in (tokens_BL, valid_BL, mask_BR, adv_B, sampler_logp_BR))

    t2 = time.perf_counter()
    tokens_dev, valid_dev = run.to_rows(tokens_BL), run.to_rows(valid_BL)
    if cfg.grpo.use_kl_loss:
        ref_logp = run.fns.logprobs(run.ref_params, tokens_dev, valid_dev)
    else:
        ref_logp = run.to_rows(np.zeros(mask_BR.shape, np.float32))
    if cfg.rollout.use_sampler_logprobs:
        old_logp = run.to_rows(sampler_logp_BR)
    else:
        old_logp = run.fns.logprobs(run.params, tokens_dev, valid_dev)
    jax.block_until_ready((ref_logp, old_logp))
    timings["time/reference"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    batch = TrainBatch(tokens_dev, valid_dev, run.to_rows(mask_BR), run.to_rows(adv_B, ndim=1),
                       old_logp, ref_logp)
    metrics_list = []
    for _ in range(cfg.grpo.updates_per_step):
        run.params, run.opt_state, m = run.fns.update(run.params, run.opt_state, batch)
        metrics_list.append(m)
    device_metrics = jax.device_get(metrics_list)
    timings["time/update"] = time.perf_counter() - t3
    timings["time/step"] = time.perf_counter() - t0

    last = device_metrics[-1]
    out = rollout_metrics(scores_B, lengths_B, truncated_B, n, scored.analysis,
                          cfg.reward.score)
    out.update({
        "losses/pg_loss": float(last["pg_loss"]), "losses/kl": float(last["kl"]),
        "losses/entropy": float(last["entropy"]), "losses/clipfrac": float(last["clipfrac"]),
        "losses/approx_kl": float(last["approx_kl"]), "losses/total": float(last["loss"]),
        "optim/grad_norm": float(last["grad_norm"]), "optim/lr": float(run.lr_at(step)),
        "optim/skipped": float(max(m["skipped"] for m in device_metrics)),
        "data/epoch": float(run.loader.epoch), "data/refill_batches": float(refills),
        "data/informative_groups": float(min(informative, len(records)) / len(records)),
    })
    out.update(timings)
    generated = float(lengths_B.sum())
    out["perf/tokens_per_s"] = generated / max(timings["time/step"], 1e-9)
    out["perf/rollout_tokens_per_s"] = generated / max(timings["time/rollout"], 1e-9)
    run.last_texts = (texts, scores_B, [r["labels"] for r in records])
    return out


def _evaluate(run: Run, step: int) -> dict[str, float]:
    cfg = run.cfg
    result = evaluate_records(run.greedy, run.params, run.test_records, run.tokenizer,
                              reward_kwargs=run.reward_kwargs,
                              limit=cfg.data.eval_max_prompts)
    metrics = {f"eval/{k}": v for k, v in result.metrics.items()}
    run.writer.scalars(step, metrics)
    k = cfg.trainer.eval_examples_logged
    run.writer.text(step, "eval/samples", samples_markdown(
        result.prompts[:k], result.completions[:k], result.scores[:k], result.labels[:k]))
    return metrics


CONSOLE_KEYS = ("reward/mean", "reward/accuracy", "format/format_ok", "response/length_mean",
                "losses/kl", "optim/grad_norm", "time/step")


def train(cfg, *, resume: bool = False, overwrite: bool = False, log=print) -> dict:
    """Runs (or resumes) a GRPO run; returns the last step's metrics."""
    run = setup_run(cfg, resume=resume, overwrite=overwrite, log=log)
    last: dict[str, float] = {}
    rewards: list[float] = []
    skips = 0
    step = run.start_step
    try:
        with _StopSignal() as stop:
            if step == 0 and cfg.trainer.eval_every:
                last.update(_evaluate(run, 0))
            while step < run.total_steps:
                try:
                    metrics = grpo_step(run, step)
                except StopIteration:
                    break
                step += 1
                skips = skips + 1 if metrics["optim/skipped"] else 0
                if skips >= cfg.grpo.max_consecutive_skips:
                    save_checkpoint(run, step, log=log, force=True)
                    raise JaxzeroError(
                        f"{skips} consecutive updates had a non-finite loss or gradient norm; "
                        f"stopping. The last good checkpoint is {run.last_good_checkpoint()}")
                run.writer.scalars(step, metrics)
                if cfg.trainer.eval_every and step % cfg.trainer.eval_every == 0:
                    metrics.update(_evaluate(run, step))  # _evaluate logs its own scalars
                    texts, scores, labels = run.last_texts
                    run.writer.text(step, "train/samples", samples_markdown(
                        ["(training prompt)"] * 2, texts[:2], list(scores[:2]), labels[:2]))
                if step % cfg.trainer.log_every == 0 and distributed.is_main_process():
                    log(console_line(step, metrics, CONSOLE_KEYS))
                last = metrics
                rewards.append(metrics["reward/mean"])
                if step % cfg.trainer.save_every == 0:
                    save_checkpoint(run, step, log=log)
                if stop.received:
                    log(f"received {stop.received}: saving step {step} and exiting")
                    break
            if cfg.trainer.seed_step_count and cfg.trainer.eval_every and not stop.received \
                    and step % cfg.trainer.eval_every:  # the seed's validation after training
                last.update(_evaluate(run, step))
            save_checkpoint(run, step, log=log, force=True)
            if cfg.trainer.export_hf and not stop.received:
                run.export_hf(cfg.trainer.export_hf, log=log)
    finally:
        run.close()
    if distributed.is_main_process() and len(rewards) >= 4:
        k = len(rewards) // 4
        log(f"mean reward: first {k} steps {np.mean(rewards[:k]):.3f} -> "
            f"last {k} steps {np.mean(rewards[-k:]):.3f}")
    if distributed.is_main_process():
        log(f"done at step {step}. TensorBoard: tensorboard --logdir {run.tb_dir}\n"
            f"  checkpoints: {run.ckpt_dir}"
            + (f"\n  HF export: {cfg.trainer.export_hf}" if cfg.trainer.export_hf else ""))
    return last
