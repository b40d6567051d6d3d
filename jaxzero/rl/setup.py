"""Builds a run from its config: run directory, task, model, mesh, jitted steps, sampler,
checkpoints and logs, as three typed pieces the trainer loop passes around explicitly.

`Engine` is the static wiring of a GRPO step, `RunFiles` where the run writes, `TrainState`
what a step changes. The task (records, reward, eval) comes from a `TaskFactory`; nothing here
knows what the task is.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxzero.config import schema as config_lib
from jaxzero.parallel import distributed
from jaxzero.rl import grpo
from jaxzero.rl import run_dir as run_dir_lib
from jaxzero.io.checkpoint import CheckpointStore
from jaxzero.io.identity import write_checkpoints_location, write_model_config
from jaxzero.io.storage import non_atomic_warning, storage_path
from jaxzero.rl.loader import PromptLoader
from jaxzero.errors import CheckpointError, ConfigError
from jaxzero.monitor.writer import MetricsWriter
from jaxzero.model.attention import resolve_attention
from jaxzero.model.qwen2 import ModelOptions, abstract_model, init_model
from jaxzero.model.config import Qwen2Config
from jaxzero.rl.rollout import RewardWorker
from jaxzero.rl.task import Task, TaskFactory
from jaxzero.model.sampler import Sampler, decode_model
from jaxzero.parallel.sharding import (abstract_on, choose_decode_layout,
                                       decode_table, device_memory_bytes, make_mesh, put_global)
from jaxzero.rl.train_step import (StepFunctions, build_step_functions, init_opt_state,
                                   lr_schedule, make_optimizer)


@dataclasses.dataclass(frozen=True)
class Engine:
    """The static wiring of a GRPO step: built once by `setup_run`, never written."""

    cfg: config_lib.RunConfig
    mesh: Mesh
    fns: StepFunctions
    sampler: Sampler
    task: Task
    reward_worker: RewardWorker
    ref_params: Any            # the frozen reference policy; None without a KL loss
    base_key: jax.Array
    pad_id: int
    lr_at: Callable[[int], float]

    @functools.cached_property
    def record_index(self) -> dict[str, int]:
        """Training record ids -> positions (processes exchange batches as indices)."""
        return {r["id"]: i for i, r in enumerate(self.task.train_records)}

    def greedy(self, params, prompts):
        return self.sampler.generate(params, prompts, key=jax.random.key(0), n=1,
                                     temperature=0.0, top_p=1.0, top_k=0)


@dataclasses.dataclass(frozen=True)
class TrainState:
    """What a step changes. Steps return a new one; the loader advances in place (its
    position is saved with each checkpoint)."""

    params: Any
    opt_state: Any
    loader: PromptLoader
    step: int


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """Where a run writes: its directory, TensorBoard, checkpoints; and what they record."""

    cfg: config_lib.RunConfig
    run_dir: Path
    model_config: Qwen2Config
    writer: MetricsWriter
    store: CheckpointStore
    total_steps: int
    # The run directory, locked until close_run; None for a run wired by hand (tests).
    claim: run_dir_lib.RunDir | None = None

    @property
    def tb_dir(self) -> Path:
        return self.run_dir / "tb"

    @property
    def ckpt_dir(self):
        """run_dir/checkpoints, or trainer.checkpoint_dir (a Path or a remote epath.Path)."""
        return self.store.directory

    def push_logs(self) -> None:
        """Copies TensorBoard's logs and the plots up to a remote run directory (main
        process; nothing for a local one)."""
        if self.claim is not None and distributed.is_main_process():
            self.claim.push(run_dir_lib.LOGS)

    def last_good_checkpoint(self) -> str:
        """The newest committed checkpoint (a save still in flight is not one yet)."""
        steps = self.store.committed_steps()
        return f"{self.ckpt_dir}/{steps[-1]}" if steps else "(none saved yet)"

    def export_hf(self, params, out_dir: str, log=print) -> None:
        from jaxzero.io.hf import export_hf
        export_hf(params, self.model_config, out_dir,
                  dtype=self.cfg.model.param_dtype, tokenizer_src=self.run_dir / "tokenizer")
        if distributed.is_main_process():
            log(f"exported HF model to {out_dir}")


def checkpoint_dir(cfg, claim: run_dir_lib.RunDir):
    """trainer.checkpoint_dir, or the run directory's checkpoints/ (the remote one's, for a
    remote run directory)."""
    chosen = cfg.trainer.checkpoint_dir
    return claim.durable("checkpoints") if chosen is None else storage_path(chosen)


def _model_and_tokenizer(cfg, run_dir: Path):
    """The model's identity (architecture, tokenizer, stop and pad ids); its tokenizer is
    kept in the run dir."""
    from jaxzero.io.identity import identify_run_model
    identity = identify_run_model(cfg.model)
    tok_dir = run_dir / "tokenizer"
    if distributed.is_main_process() and not tok_dir.exists():
        identity.tokenizer.save_pretrained(tok_dir)
    return identity


def validate(cfg) -> Mesh:
    """Checks what the config cannot check alone (it depends on the processes and devices);
    returns the mesh, built first so a bad mesh fails before anything is written."""
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    if cfg.data.prompts_per_step % jax.process_count():
        raise ConfigError(f"data.prompts_per_step={cfg.data.prompts_per_step} (the global "
                          f"batch) does not divide over {jax.process_count()} processes")
    return mesh


# LossConfig fields named differently in the config's grpo section; every other field has
# the same name in both, so a field added to LossConfig is read from the config or fails here.
_LOSS_FIELDS_IN_CONFIG = {"agg": "loss_agg", "group_rows": "seed_micro_batch_rows"}


def loss_config(grpo_cfg: config_lib.GRPOConfig) -> grpo.LossConfig:
    """The loss's static hyperparameters, read from the config's grpo section."""
    return grpo.LossConfig(**{f.name: getattr(grpo_cfg, _LOSS_FIELDS_IN_CONFIG.get(f.name, f.name))
                              for f in dataclasses.fields(grpo.LossConfig)})


def make_loader(cfg, records) -> PromptLoader:
    """data.prompts_per_step is the global batch; each process reads its own share of it."""
    return PromptLoader(records, batch_size=cfg.data.prompts_per_step // jax.process_count(),
                        seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                        num_epochs=cfg.trainer.total_epochs,
                        process_index=jax.process_index(), process_count=jax.process_count())


def total_steps(cfg, loader: PromptLoader) -> int:
    # trainer.seed_step_count: the seed runs T - 1 updates, then a final validation.
    steps = loader.batches_per_epoch * cfg.trainer.total_epochs - cfg.trainer.seed_step_count
    return steps if cfg.trainer.max_steps is None else min(steps, cfg.trainer.max_steps)


def optimizer_and_schedule(optim: config_lib.OptimConfig, steps: int):
    schedule = lr_schedule(optim.schedule, optim.lr, optim.warmup_steps, steps)
    optimizer = make_optimizer(lr=schedule, weight_decay=optim.weight_decay, b1=optim.b1,
                               b2=optim.b2, eps=optim.eps, grad_clip=optim.grad_clip)
    return optimizer, schedule


def build_sampler(cfg, model_config: Qwen2Config, options: ModelOptions, mesh: Mesh, *,
                  stop_ids, pad_id: int, log=print) -> Sampler:
    """The rollout sampler, decoding a copy of the policy in the compute dtype on the decode
    layout (rollout.decode_layout). rollout.micro_batch counts sequences (prompts × n), as
    the planner and the config do; the sampler is handed it as whole prompts per call."""
    r = cfg.rollout
    per_call = None if r.micro_batch is None else r.micro_batch // r.n
    compute = jnp.dtype(options.compute_dtype)
    copy_bytes = model_config.num_params() * compute.itemsize
    layout = choose_decode_layout(r.decode_layout, copy_bytes, device_memory_bytes(), mesh,
                                  jax.local_device_count())
    if r.decode_layout == "auto":
        log(f"rollouts decode a {compute.name} copy of the policy "
            f"({copy_bytes / 2**30:.2f} GiB whole), layout {layout}")
    table = decode_table(layout)
    return Sampler(decode_model(model_config, options, table), model_config, mesh=mesh,
                   max_new_tokens=r.max_new_tokens, buckets=tuple(cfg.data.prompt_buckets),
                   stop_ids=tuple(stop_ids), pad_id=pad_id, cache_dtype=r.cache_dtype,
                   max_prompts_per_call=per_call, sharding=table,
                   param_dtype=compute.name, chunk=r.decode_chunk,
                   cache_block=r.cache_block)


def _resumed(store, abstract_arrays, model_config, loader, log):
    latest, arrays, meta = _restore_newest(store, abstract_arrays, log)
    _check_model_config(meta, model_config, store.directory)
    loader.set_state(meta["data_state"])
    log(f"resuming from {store.directory}/{latest} (step {int(meta['step'])})")
    return arrays["params"], arrays["opt_state"], int(meta["step"])


def _fresh(cfg, task: Task, graphdef, model_config, options, abstract, fns, optimizer, mesh,
           log):
    params = _initial_params(cfg, model_config, options, abstract, fns.param_shardings, log)
    if task.warmup is not None:
        params = task.warmup(graphdef, params, mesh, log)
    return params, init_opt_state(optimizer, params, fns.opt_shardings)


def setup_run(cfg, make_task: TaskFactory, *, resume: bool, overwrite: bool, log=print
              ) -> tuple[Engine, RunFiles, TrainState]:
    """The run's three pieces. The run directory is claimed (locked) first and released if
    setup fails; its identity (config.yaml, run.json) is written only once setup succeeded."""
    mesh = validate(cfg)
    claim = run_dir_lib.open_run_dir(cfg, resume=resume, overwrite=overwrite,
                                     main=distributed.is_main_process())
    try:
        return _build_run(cfg, make_task, claim, mesh, resume=resume, log=log)
    except BaseException:
        claim.close()
        raise


def _build_run(cfg, make_task: TaskFactory, claim: run_dir_lib.RunDir, mesh: Mesh, *,
               resume: bool, log) -> tuple[Engine, RunFiles, TrainState]:
    run_dir = claim.path
    distributed.sync("run dir")
    identity = _model_and_tokenizer(cfg, run_dir)
    model_config, tokenizer = identity.config, identity.tokenizer
    if distributed.is_main_process():
        write_model_config(run_dir, model_config, cfg.model.param_dtype)
    task = make_task(cfg, run_dir, tokenizer)
    data_fingerprint = claim.check_data(task.sources)
    for name, records in (("train", task.train_records), ("test", task.test_records)):
        if task.sources.get(name) is not None:
            run_dir_lib.check_token_ids(records, task.sources[name], model_config.vocab_size)

    options = ModelOptions(param_dtype=jnp.dtype(cfg.model.param_dtype),
                           compute_dtype=jnp.dtype(cfg.model.compute_dtype),
                           remat=cfg.model.remat == "block",
                           attention=resolve_attention(cfg.model.attention,
                                                       jax.default_backend(),
                                                       cfg.model.compute_dtype),
                           platform=jax.default_backend())
    graphdef, abstract = abstract_model(model_config, options)
    loader = make_loader(cfg, task.train_records)
    steps = total_steps(cfg, loader)
    optimizer, schedule = optimizer_and_schedule(cfg.optim, steps)
    fns = build_step_functions(graphdef, abstract, optimizer, loss_config(cfg.grpo), mesh,
                               response_len=cfg.rollout.max_new_tokens,
                               micro_batches=cfg.grpo.micro_batches,
                               logit_chunk=cfg.grpo.logit_chunk,
                               temperature=cfg.rollout.temperature)
    for line in fns.replicated:  # listed once: what the mesh cannot shard as the table asks
        log(f"sharding: {line}")
    ckpt_dir = checkpoint_dir(cfg, claim)
    if distributed.is_main_process():
        for where in dict.fromkeys((run_dir, ckpt_dir)):
            if (warning := non_atomic_warning(where)) is not None:
                log(f"warning: {warning}")
        # eval, generate and convert find the checkpoints of this dir through it.
        write_checkpoints_location(run_dir, ckpt_dir)
    store = CheckpointStore(ckpt_dir, keep=cfg.trainer.keep_checkpoints,
                            async_save=cfg.trainer.async_checkpoint)
    ref_store = CheckpointStore(claim.durable("reference"), keep=1)
    latest = store.latest_step()
    if resume and latest is None:
        raise CheckpointError(f"--resume: no checkpoint in {ckpt_dir}")
    abstract_arrays = {
        "params": abstract_on(abstract, fns.param_shardings),
        "opt_state": abstract_on(jax.eval_shape(optimizer.init, abstract), fns.opt_shardings),
    }
    if latest is not None:
        params, opt_state, start_step = _resumed(store, abstract_arrays, model_config, loader,
                                                 log)
    else:
        params, opt_state = _fresh(cfg, task, graphdef, model_config, options, abstract, fns,
                                   optimizer, mesh, log)
        start_step = 0
    ref_params = None
    if cfg.grpo.use_kl_loss:
        ref_params = _reference(cfg, params if latest is None else None, ref_store,
                                abstract_arrays["params"], model_config, options, log)
    pad_id = identity.pad_id
    sampler = build_sampler(cfg, model_config, options, mesh, stop_ids=identity.stop_ids,
                            pad_id=pad_id, log=log)
    writer = MetricsWriter(run_dir / "tb")
    if start_step == 0:
        writer.hparams(config_lib.flatten(cfg))
    if distributed.is_main_process():
        claim.commit(cfg, data_fingerprint)  # the run's identity, once setup has succeeded
    engine = Engine(cfg=cfg, mesh=mesh, fns=fns, sampler=sampler, task=task,
                    reward_worker=RewardWorker(task), ref_params=ref_params,
                    base_key=jax.random.key(cfg.trainer.seed), pad_id=pad_id,
                    lr_at=lambda s: float(schedule(s)))
    files = RunFiles(cfg=cfg, run_dir=run_dir, model_config=model_config, writer=writer,
                     store=store, total_steps=steps, claim=claim)
    return engine, files, TrainState(params, opt_state, loader, start_step)


def close_run(engine: Engine, files: RunFiles, *, wait_for_saves: bool = True) -> None:
    """Waits for the save in flight and releases everything; `wait_for_saves=False` (a lost
    peer, which that save's commit would wait for) leaves the checkpoint store as it is."""
    if wait_for_saves:
        files.store.wait()
        files.store.close()
    engine.reward_worker.close()
    files.writer.close()
    files.push_logs()
    if files.claim is not None:
        files.claim.close()


def save_checkpoint(run: RunFiles, state: TrainState, *, log=print, force: bool = False
                    ) -> None:
    step = state.step
    if run.store.latest_step() == step:
        return  # already saved (the end of a run that stopped on a save step)
    meta = {"step": step, "data_state": state.loader.get_state(),
            "config": config_lib.config_to_dict(run.cfg),
            "model_config": run.model_config.to_dict()}
    saved = run.store.save(step, _pure({"params": state.params, "opt_state": state.opt_state}),
                           meta, force=force)
    if saved and distributed.is_main_process():
        background = " (writing in the background)" if run.cfg.trainer.async_checkpoint else ""
        log(f"checkpoint step {step} -> {run.ckpt_dir}/{step}{background}")
        if run.writer is not None:
            run.writer.flush()
        run.push_logs()


def _pure(tree):
    """nnx.State subtrees as plain nested dicts: the on-disk layout shared with model_store."""
    return jax.tree.map(lambda x: nnx.to_pure_dict(x) if isinstance(x, nnx.State) else x,
                        tree, is_leaf=lambda x: isinstance(x, nnx.State))


def _restore(store: CheckpointStore, step, abstract_tree):
    """Restores a tree saved through `_pure` back into `abstract_tree`'s structure."""
    arrays, meta = store.restore(step, abstract_arrays=_pure(abstract_tree))
    return jax.tree.unflatten(jax.tree.structure(abstract_tree), jax.tree.leaves(arrays)), meta


def _restore_newest(store: CheckpointStore, abstract_tree, log):
    """The newest checkpoint that restores, as `_restore`; damaged newer steps are set aside
    (so this run can save those steps again) and named."""
    step, arrays, meta, skipped = store.restore_newest(abstract_arrays=_pure(abstract_tree))
    for bad, why in skipped:
        moved = store.set_aside(bad)
        log(f"skipped checkpoint {store.directory / str(bad)}: {why}; moved it to {moved}")
    arrays = jax.tree.unflatten(jax.tree.structure(abstract_tree), jax.tree.leaves(arrays))
    return step, arrays, meta


def _check_model_config(meta: dict, model_config: Qwen2Config, where) -> None:
    found = meta.get("model_config")
    if found and Qwen2Config.from_dict(found) != model_config:
        # The checkpoint's own fields with the defaults of any it predates (e.g. yarn).
        found = Qwen2Config.from_dict(found).to_dict()
        diff = {k: (found[k], v) for k, v in model_config.to_dict().items() if found[k] != v}
        raise CheckpointError(f"{where}: checkpoint is of another architecture: "
                              + ", ".join(f"{k}: checkpoint {a}, config {b}"
                                          for k, (a, b) in diff.items()))


def _initial_params(cfg, model_config, options, abstract, shardings, log):
    if cfg.model.demo:
        _, host = nnx.split(init_model(model_config, options, seed=cfg.trainer.seed))
        return put_global(jax.tree.map(np.asarray, host), shardings)
    from jaxzero.io.model_dir import load_params
    log(f"loading {cfg.model.path}")
    _, params = load_params(cfg.model.path, param_dtype=cfg.model.param_dtype,
                            shardings=shardings)
    return params


def _reference(cfg, initial_params, ref_store, abstract_params, model_config, options, log):
    """The frozen reference policy: the initial parameters in the compute dtype.

    It only ever runs forward passes, so it needs no more precision than the compute (a
    bfloat16 reference beside float32 master weights halves its memory). Real models reload
    it from model.path on resume; the demo's initial model exists only in this run, so it is
    saved under run_dir/reference.
    """
    shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
    to_compute = jax.jit(lambda t: jax.tree.map(lambda x: x.astype(options.compute_dtype), t),
                         out_shardings=shardings)
    if initial_params is not None:
        ref = to_compute(initial_params)  # a new buffer: the params get donated, it must not
        if cfg.model.demo:
            # A reference saved by an earlier start of this run that died before its first
            # checkpoint: replaced, since this start's initial parameters are the ones trained.
            for stale in ref_store.all_steps():
                ref_store.delete(stale)
            ref_store.save(0, _pure({"params": ref}), {"model_config": model_config.to_dict()},
                           force=True)
            ref_store.wait()
        return ref
    if cfg.model.demo:
        abstract_ref = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, options.compute_dtype, sharding=x.sharding),
            abstract_params)
        arrays, _ = _restore(ref_store, 0, {"params": abstract_ref})
        return arrays["params"]
    return to_compute(_initial_params(cfg, model_config, options, abstract_params, shardings,
                                      log))

