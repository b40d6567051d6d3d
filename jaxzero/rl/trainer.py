"""The GRPO loop: sample, score, select, assemble, log-prob passes, update, metrics.

The loop only orchestrates: the math is in grpo.py, the jitted pieces in train_step.py and
the sampler, the host-side batch in rollout.py, and everything about the task (records,
reward, eval) behind the Task seam (task.py). Device work is never waited on for metrics:
step N's metrics come to the host after step N+1's rollouts are dispatched (as nanodo's
train.py does), except where the host needs them anyway (an eval, a save, the end).
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future
from typing import Any

import jax
import numpy as np

from jaxzero.errors import JaxzeroError
from jaxzero.monitor.writer import Console, samples_markdown
from jaxzero.parallel import distributed
from jaxzero.parallel.sharding import put_global, to_host
from jaxzero.rl import grpo, layout
from jaxzero.rl.rollout import (Candidates, HostBatch, all_groups, assemble_batch,
                                group_spread, rollout_metrics, select_groups, sequences,
                                training_samples)
from jaxzero.rl.setup import (Engine, RunFiles, TrainState, close_run, loss_config,
                              save_checkpoint, setup_run)
from jaxzero.rl.stop import StopRequested, StopSignal, save_on_stop
from jaxzero.rl.task import Record, Sample, TaskFactory
from jaxzero.rl.train_step import RowLoss, Rows


# ---------------------------------------------------------------------------- one step

@dataclasses.dataclass(frozen=True)
class Rollouts:
    """One batch of prompts whose sampling has been dispatched (device arrays)."""

    records: list[Record]
    out: Any          # SampleOutput on the devices
    started: float


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """A finished step whose update metrics may still be on the devices."""

    step: int
    started: float
    device_metrics: list[dict]        # one per update pass, not yet fetched
    host_metrics: dict[str, float]
    generated_tokens: float
    samples: tuple[Sample, ...]


def step_key(engine: Engine, step: int, draw: int) -> jax.Array:
    """The sampling key of a step's `draw`-th batch (0, then DAPO refills): resumable."""
    return jax.random.fold_in(jax.random.fold_in(engine.base_key, step), draw)


def next_prompts(engine: Engine, state: TrainState) -> list[Record]:
    """The next global batch of prompts, in process order: every process hands the sampler
    the same values (each computes only its own devices' rows). StopIteration at the end."""
    records = next(state.loader)
    if jax.process_count() == 1:
        return records
    from jax.experimental import multihost_utils
    local = np.array([engine.record_index[r["id"]] for r in records], np.int64)
    every = np.asarray(multihost_utils.process_allgather(local)).reshape(-1)
    return [engine.task.train_records[i] for i in every]


def sample(engine: Engine, state: TrainState, records: list[Record], key,
           console: Console | None = None) -> Rollouts:
    """Dispatches n rollouts per prompt on the current policy; returns without waiting."""
    started = time.perf_counter()
    prompts = [r["prompt_token_ids"] for r in records]
    if console is not None:
        bucket = engine.sampler.bucket_for(max(len(p) for p in prompts))
        console.phase(("sample", bucket), f"step {state.step + 1}: rollouts (compiling the "
                      f"sampler for prompt bucket {bucket}…)")
    r = engine.cfg.rollout
    out = engine.sampler.generate(state.params, prompts, key=key, n=r.n,
                                  temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
    return Rollouts(records, out, started)


def score(engine: Engine, rollouts: Rollouts) -> tuple[Any, Future]:
    """Brings the rollouts to the host (this waits for the sampler) and submits them to the
    reward thread; returns the host arrays and the pending ScoredRollouts."""
    host = jax.tree.map(to_host, rollouts.out)
    n = engine.cfg.rollout.n
    targets = [engine.task.target(r) for r in rollouts.records for _ in range(n)]
    return host, engine.reward_worker.submit(host.tokens, host.lengths, targets)


def lay_out(engine: Engine, tokens_BT: np.ndarray, valid_BT: np.ndarray
            ) -> tuple[layout.Layout, Rows]:
    """Where the batch's rollouts go in the rows the log-prob passes and the update run on
    (trimmed to the longest, or packed to grpo.micro_batch_tokens), and those rows on the
    devices. Needs only the tokens."""
    g, response_slots = engine.cfg.grpo, engine.cfg.rollout.max_new_tokens
    shards = engine.mesh.shape["data"] * engine.mesh.shape["fsdp"]
    if g.micro_batch_tokens is None:
        lay = layout.trimmed(valid_BT, response_slots, micro_batches=g.micro_batches,
                             width_multiple=g.row_width_multiple, rows_multiple=shards)
    else:
        # As many micro-batches as one rollout a row needs: the count that fits any batch,
        # so one shape serves every step.
        lay = layout.packed(valid_BT, response_slots, width=g.micro_batch_tokens, rows=shards,
                            micro_batches=-(-valid_BT.shape[0] // shards),
                            width_multiple=g.row_width_multiple)
    return lay, put_global(lay.rows_of(tokens_BT), engine.fns.row_shardings)


def logprob_passes(engine: Engine, state: TrainState, lay: layout.Layout, rows: Rows,
                   sampler_logp_BR: np.ndarray, console: Console | None = None):
    """Dispatches the old-policy and reference log-prob passes over `rows`; device arrays
    [M, K, N] of the layout's slots, or None: no KL loss (reference), or one update per step
    (old: the update takes the current policy's own, detached). Neither depends on the
    rewards."""
    _note(console, ("logprobs", rows.tokens_MBW.shape), state,
          f"log-prob passes (compiling for rows of {rows.tokens_MBW.shape[-1]} tokens…)")
    cfg = engine.cfg
    ref = engine.fns.row_logprobs(engine.ref_params, rows) if cfg.grpo.use_kl_loss else None
    if cfg.rollout.use_sampler_logprobs:
        old = put_global(lay.scatter(sampler_logp_BR), engine.fns.row_loss_shardings.old_logp_MBN)
    elif cfg.grpo.updates_per_step == 1:
        old = None
    else:
        old = engine.fns.row_logprobs(state.params, rows)
    return old, ref


def row_loss(engine: Engine, lay: layout.Layout, batch: HostBatch, old, ref) -> RowLoss:
    """The update's loss inputs on the devices: the batch's advantages and weights in the
    layout's slots, with the log-prob passes' results."""
    host = lay.loss_of(batch.response_mask_BR, batch.advantages_B, loss_config(engine.cfg.grpo))
    shard = engine.fns.row_loss_shardings
    return RowLoss(*(put_global(x, s) for x, s in zip(host[:3], shard[:3])), old, ref)


def train_order(engine: Engine, valid_BT: np.ndarray) -> np.ndarray | None:
    """grpo.seed_dp_ranks (seed-micro-token-mean): the update sees the rows in the seed's
    order, balanced over its ranks by token count. That needs only the tokens, so it is known
    before the rewards. None: the batch order."""
    ranks = engine.cfg.grpo.seed_dp_ranks
    return None if not ranks else grpo.seed_row_order(valid_BT.sum(-1), ranks)


def select(engine: Engine, state: TrainState, first: Candidates, timings: dict,
           console: Console | None = None):
    """DAPO dynamic sampling: refills from further batches until enough groups have rewards
    that differ (or grpo.max_refill_batches is spent). Returns (candidates, groups, how many
    groups differed, refills)."""
    n, want = engine.cfg.rollout.n, len(first.records)
    candidates = [first]
    refills = 0
    while refills < engine.cfg.grpo.max_refill_batches and \
            select_groups(candidates, n, want)[1] < want:
        refills += 1
        records = next_prompts(engine, state)
        more = sample(engine, state, records, step_key(engine, state.step, refills), console)
        host, pending = score(engine, more)
        candidates.append(Candidates(host, records, _waited(pending, timings)))
    groups, informative = select_groups(candidates, n, want)
    return candidates, groups, informative, refills


def assemble(engine: Engine, candidates, groups) -> HostBatch:
    g = engine.cfg.grpo
    return assemble_batch(candidates, groups, engine.cfg.rollout.n, pad_id=engine.pad_id,
                          adv_eps=g.adv_eps, scale_by_std=g.scale_by_std,
                          mask_truncated=g.mask_truncated)


def update(engine: Engine, state: TrainState, rows: Rows, loss: RowLoss,
           console: Console | None = None):
    """grpo.updates_per_step optimiser passes (dispatched); metrics stay on the devices."""
    _note(console, ("update", rows.tokens_MBW.shape), state,
          f"update (compiling the train step for rows of {rows.tokens_MBW.shape[-1]} tokens…)")
    params, opt_state, metrics = state.params, state.opt_state, []
    for _ in range(engine.cfg.grpo.updates_per_step):
        params, opt_state, m = engine.fns.row_update(params, opt_state, rows, loss)
        metrics.append(m)
    return params, opt_state, metrics


def _waited(pending: Future, timings: dict) -> Any:
    """The reward thread's result; adds the time blocked on it and the time it took."""
    t = time.perf_counter()
    result = pending.result()
    timings["time/reward_wait"] = timings.get("time/reward_wait", 0.0) + time.perf_counter() - t
    timings["time/reward"] = timings.get("time/reward", 0.0) + result.seconds
    return result


def train_on(engine: Engine, state: TrainState, first: Rollouts,
             console: Console | None = None) -> tuple[TrainState, StepRecord]:
    """Scores, selects and assembles `first`, runs the log-prob passes and the update;
    returns the new state and the step's record, nothing fetched from the devices.

    The reward overlaps the log-prob passes: they are dispatched on the sampled tokens before
    the reward thread's result is awaited. With grpo.filter_zero_std_groups they cannot:
    which rows enter the batch depends on the rewards, so the passes wait for the selection.
    """
    n, want = engine.cfg.rollout.n, len(first.records)
    host, pending = score(engine, first)
    timings = {"time/rollout": time.perf_counter() - first.started}
    if engine.cfg.grpo.filter_zero_std_groups:
        first_scored = Candidates(host, first.records, _waited(pending, timings))
        candidates, groups, informative, refills = select(engine, state, first_scored,
                                                          timings, console)
        batch = assemble(engine, candidates, groups)
        rows = batch.take(train_order(engine, batch.valid_BT))
        lay, model_rows = lay_out(engine, rows.tokens_BT, rows.valid_BT)
        old, ref = logprob_passes(engine, state, lay, model_rows, rows.sampler_logp_BR, console)
        analysis = engine.task.analyze(batch.texts)  # of the rows kept, from any batch
    else:
        groups = all_groups([host], n)
        tokens_BT, valid_BT = sequences([host], groups, n, engine.pad_id)
        order = train_order(engine, valid_BT)
        logp_BR = host.logprobs
        if order is not None:
            tokens_BT, valid_BT, logp_BR = tokens_BT[order], valid_BT[order], logp_BR[order]
        lay, model_rows = lay_out(engine, tokens_BT, valid_BT)
        old, ref = logprob_passes(engine, state, lay, model_rows, logp_BR, console)
        candidates = [Candidates(host, first.records, _waited(pending, timings))]
        batch = assemble(engine, candidates, groups)
        rows = batch.take(order)
        analysis = candidates[0].scored.analysis
        informative = int((group_spread(batch.scores_B, n) > 0).sum())
        refills = 0
    # `rows` is what the update sees (maybe reordered); `batch` keeps the groups contiguous
    # for the metrics and samples.
    params, opt_state, device_metrics = update(engine, state, model_rows,
                                               row_loss(engine, lay, rows, old, ref), console)

    host_metrics = rollout_metrics(batch, n, analysis, engine.task.correct_score)
    host_metrics.update({
        "optim/lr": float(engine.lr_at(state.step)),
        "data/epoch": float(state.loader.epoch), "data/refill_batches": float(refills),
        "data/informative_groups": float(min(informative, want) / want), **timings})
    record = StepRecord(step=state.step + 1, started=first.started,
                        device_metrics=device_metrics, host_metrics=host_metrics,
                        generated_tokens=float(batch.lengths_B.sum()),
                        samples=training_samples(batch, engine.task,
                                                 engine.cfg.trainer.eval_examples_logged))
    return dataclasses.replace(state, params=params, opt_state=opt_state,
                               step=state.step + 1), record


def _note(console, key, state, what: str) -> None:
    if console is not None:
        console.phase(key, f"step {state.step + 1}: {what}")


# Update metrics: the train step's name -> the logged tag. Each is the last pass's value,
# except `skipped`, which is 1 if any pass was skipped.
UPDATE_METRICS = {"loss": "losses/total", "pg_loss": "losses/pg_loss", "kl": "losses/kl",
                  "entropy": "losses/entropy", "clipfrac": "losses/clipfrac",
                  "approx_kl": "losses/approx_kl", "grad_norm": "optim/grad_norm",
                  "skipped": "optim/skipped"}


def step_metrics(record: StepRecord, seconds: float) -> dict[str, float]:
    """Every metric of a step, fetched from the devices now; `seconds` is its wall time."""
    passes = jax.device_get(record.device_metrics)
    out = dict(record.host_metrics)
    out.update({tag: float(passes[-1][name]) for name, tag in UPDATE_METRICS.items()})
    out["optim/skipped"] = float(max(m["skipped"] for m in passes))
    out["time/step"] = seconds
    out["perf/tokens_per_s"] = record.generated_tokens / max(seconds, 1e-9)
    out["perf/rollout_tokens_per_s"] = record.generated_tokens / max(out["time/rollout"], 1e-9)
    return out


# ---------------------------------------------------------------------------- the loop

def evaluate(engine: Engine, files: RunFiles, state: TrainState, console: Console
             ) -> dict[str, float]:
    """The task's eval on the held-out records; logged under eval/ and as one console line."""
    records = engine.task.test_records[:engine.cfg.data.eval_max_prompts]
    if not records:
        return {}
    console.phase("eval", f"eval @ step {state.step}: greedy generation over {len(records)} "
                  "held-out cases (the first call compiles)…")
    t0 = time.perf_counter()
    result = engine.task.evaluate(engine.greedy, state.params, records)
    seconds = time.perf_counter() - t0
    metrics = {f"eval/{k}": v for k, v in result.metrics.items()}
    files.writer.scalars(state.step, metrics)
    files.writer.text(state.step, "eval/samples", _panel(result.samples))
    console.eval(state.step, result.metrics, result.cases, seconds)
    return metrics


def _panel(samples) -> str:
    return samples_markdown([s.prompt for s in samples], [s.completion for s in samples],
                            [s.score for s in samples], [s.target for s in samples])


class _Clock:
    """Elapsed time and an ETA from the mean step time (the first, compiling, left out)."""

    def __init__(self, total: int):
        self.t0 = time.perf_counter()
        self.total = total
        self.periods: list[float] = []

    def eta(self, step: int) -> float | None:
        timed = self.periods[1:] or self.periods
        return float(np.mean(timed)) * (self.total - step) if timed else None


def run_loop(engine: Engine, files: RunFiles, state: TrainState, console: Console,
             stop: StopSignal | None = None) -> tuple[TrainState, dict[str, float]]:
    """Steps until files.total_steps (or the data ends, or the processes agree that one was
    signalled to stop); saves and exports at the end. Returns the final state and the last
    step's metrics."""
    cfg = engine.cfg
    stop = stop if stop is not None else StopSignal()  # not entered: never signalled
    stopping = False
    total = files.total_steps
    clock = _Clock(total)
    last: dict[str, float] = {}
    skips = 0

    def report(record: StepRecord, now: float, with_eval: bool = False) -> dict[str, float]:
        """Step N's metrics to the host, TensorBoard, the console and the JSON log (with the
        eval's, when one is due: it runs here, after the step line)."""
        nonlocal skips
        seconds = now - record.started
        clock.periods.append(seconds)
        metrics = step_metrics(record, seconds)
        skips = skips + 1 if metrics["optim/skipped"] else 0
        if skips >= cfg.grpo.max_consecutive_skips:
            save_checkpoint(files, state, log=console.always, force=True)
            files.store.wait()
            raise JaxzeroError(
                f"{skips} consecutive updates had a non-finite loss or gradient norm; "
                f"stopping. The last good checkpoint is {files.last_good_checkpoint()}")
        files.writer.scalars(record.step, metrics)
        shown = record.step % cfg.trainer.log_every == 0
        if shown:
            console.step(record.step, total, metrics, elapsed=time.perf_counter() - clock.t0,
                         eta=clock.eta(record.step))
        if with_eval:
            files.writer.text(record.step, "train/samples", _panel(record.samples))
            metrics.update(evaluate(engine, files, state, console))
        if shown or with_eval:
            console.record(record.step, metrics)
        return metrics

    if state.step == 0 and cfg.trainer.eval_every:
        first_eval = evaluate(engine, files, state, console)
        if first_eval:
            console.record(0, first_eval)
        last.update(first_eval)
    pending: StepRecord | None = None
    while state.step < total:
        try:
            rollouts = sample(engine, state, next_prompts(engine, state),
                              step_key(engine, state.step, 0), console)
        except StopIteration:
            break
        if pending is not None:  # step N's metrics, while the device samples step N+1
            last = report(pending, rollouts.started)
            pending = None
        try:
            state, pending = train_on(engine, state, rollouts, console)
        except StopIteration:
            break
        stopping = stop.agreed()  # every step: all processes stop after the same one
        # trainer.seed_step_count: the seed validates once more after its last update.
        due_eval = cfg.trainer.eval_every and (
            state.step % cfg.trainer.eval_every == 0
            or (cfg.trainer.seed_step_count and state.step == total and not stopping))
        due_save = state.step % cfg.trainer.save_every == 0
        if due_eval or due_save or stopping or state.step == total:
            last = report(pending, time.perf_counter(), with_eval=bool(due_eval))
            pending = None
        if due_save:
            save_checkpoint(files, state, log=console.info)
        if stopping:
            why = (f"received {stop.received}" if stop.received else
                   "another process received a stop signal")
            console.always(f"{why}: stopping after step {state.step}")
            break
    if pending is not None:
        last = report(pending, time.perf_counter())
    if stopping:
        save_on_stop(files, state, stop, console)
        return state, last
    save_checkpoint(files, state, log=console.info, force=True)
    if cfg.trainer.export_hf:
        files.export_hf(state.params, cfg.trainer.export_hf, log=console.info)
    return state, last


def _summary(files: RunFiles, state: TrainState, console: Console) -> None:
    """The last lines: plots, held-out accuracy before and after, where things are."""
    cfg = files.cfg
    lines = [f"done at step {state.step}. TensorBoard: tensorboard --logdir {files.tb_dir}",
             f"  checkpoints: {files.ckpt_dir}"]
    if files.claim is not None and files.claim.remote is not None:
        lines.append(f"  run directory: {files.claim.remote} (its local mirror: "
                     f"{files.run_dir})")
    if cfg.trainer.export_hf:
        lines.append(f"  HF export: {cfg.trainer.export_hf}")
    if distributed.is_main_process() and any(files.tb_dir.glob("events.out.tfevents.*")):
        from jaxzero.monitor.plots import plot_run, read_scalars
        scalars = read_scalars(files.run_dir)
        if state.step > 0:
            written = plot_run(files.run_dir)
            files.push_logs()
            lines.append(f"  plots: {written[0].parent} ({', '.join(p.name for p in written)})")
        acc = scalars.get("eval/accuracy", [])
        if len(acc) >= 2 and acc[0][0] == 0:
            lines.insert(0, f"held-out accuracy: before GRPO {acc[0][1]:.3f} -> after "
                            f"{acc[-1][1]:.3f} (step {acc[-1][0]})")
    for line in lines:
        console.always(line)


def train(cfg, make_task: TaskFactory, *, resume: bool = False, overwrite: bool = False,
          log=print, quiet: bool = False, json_log=None) -> dict:
    """Runs (or resumes) a GRPO run of the task `make_task` builds; returns the last step's
    metrics. `json_log`, a text stream, gets one JSON object per step."""
    console = Console(log, quiet=quiet, json_out=json_log)
    # Several processes cannot stop one alone mid-setup (the others would wait in its
    # collectives): a signal then is acted on at the first step's agreement.
    with StopSignal(interrupt=jax.process_count() == 1) as stop:
        try:
            engine, files, state = setup_run(cfg, make_task, resume=resume,
                                             overwrite=overwrite, log=console.info)
        except StopRequested as why:
            console.always(f"received {why}: stopped during setup, before any training step; "
                           "nothing to save")
            return {}
        stop.interrupt = False
        try:
            state, last = run_loop(engine, files, state, console, stop)
        except jax.errors.JaxRuntimeError as err:
            lost = None
            if jax.process_count() > 1:
                lost = distributed.peer_lost(err, files.last_good_checkpoint())
            # A save in flight cannot commit without the lost peer: not waited for.
            close_run(engine, files, wait_for_saves=lost is None)
            if lost is not None:
                raise lost from err
            raise
        except BaseException:
            close_run(engine, files)
            raise
        close_run(engine, files)
    _summary(files, state, console)
    return last
