"""Builds a run's pieces from its config: run directory, data, model, mesh, jitted steps,
sampler, checkpoints and logs. The trainer loop only uses what this hands it."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxzero.config import schema as config_lib
from jaxzero.parallel import distributed
from jaxzero.rl import grpo
from jaxzero.rl import run_dir as run_dir_lib
from jaxzero.io.checkpoint import CheckpointStore
from jaxzero.rl.loader import PromptLoader
from jaxzero.errors import CheckpointError, ConfigError
from jaxzero.monitor.writer import MetricsWriter
from jaxzero.model.qwen2 import ModelOptions, abstract_model, init_model
from jaxzero.model.config import Qwen2Config
from jaxzero.rl.rollout import RewardWorker
from jaxzero.model.sampler import Sampler
from jaxzero.parallel.sharding import abstract_on, batch_sharding, make_mesh, put_global
from jaxzero.rl.train_step import (build_step_functions, init_opt_state, lr_schedule,
                                make_optimizer)


@dataclasses.dataclass
class Run:
    """Everything one training run holds; mutable only in params, opt_state and loader."""

    cfg: Any
    run_dir: Path
    tokenizer: Any
    model_config: Qwen2Config
    mesh: Any
    graphdef: Any
    fns: Any
    params: Any
    opt_state: Any
    ref_params: Any
    sampler: Sampler
    loader: PromptLoader
    train_records: list[dict]
    test_records: list[dict]
    writer: MetricsWriter
    store: CheckpointStore
    reward_worker: RewardWorker
    reward_kwargs: dict
    base_key: jax.Array
    start_step: int
    total_steps: int
    lr_at: Callable[[int], float]
    claim: run_dir_lib.RunDir  # the run directory, locked until close
    last_texts: tuple = ()

    @functools.cached_property
    def record_index(self) -> dict[str, int]:
        return {r["id"]: i for i, r in enumerate(self.train_records)}

    @property
    def tb_dir(self) -> Path:
        return self.run_dir / "tb"

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def to_rows(self, host: np.ndarray, ndim: int = 2):
        """A batch-leading host array onto the (data, fsdp) axes."""
        return put_global(host, batch_sharding(self.mesh, ndim))

    def sample(self, params, prompts, **kwargs):
        return self.sampler.generate(params, prompts, **kwargs)

    def greedy(self, params, prompts):
        return self.sampler.generate(params, prompts, key=jax.random.key(0), n=1,
                                     temperature=0.0, top_p=1.0, top_k=0)

    def last_good_checkpoint(self) -> str:
        step = self.store.latest_step()
        return f"{self.ckpt_dir}/{step}" if step is not None else "(none saved yet)"

    def export_hf(self, out_dir: str, log=print) -> None:
        from jaxzero.io.hf import export_hf
        export_hf(self.params, self.model_config, out_dir,
                  dtype=self.cfg.model.param_dtype, tokenizer_src=self.run_dir / "tokenizer")
        if distributed.is_main_process():
            log(f"exported HF model to {out_dir}")

    def close(self) -> None:
        self.store.wait()
        self.store.close()
        self.reward_worker.close()
        self.writer.close()
        self.claim.close()


def _load_data(cfg, run_dir: Path, tokenizer):
    from jaxzero.diagnosis.rarearena import prepare_data
    train_file, test_file = cfg.data.train_file, cfg.data.test_file
    if train_file is None:  # the demo (config validation guarantees it)
        from jaxzero.diagnosis.demo_data import demo_cases_path
        out = run_dir / "data"
        if distributed.is_main_process() and not (out / "train.jsonl").exists():
            prepare_data(demo_cases_path(), out, tokenizer=tokenizer,
                         max_prompt_length=cfg.data.max_prompt_length, force=True)
        distributed.sync("demo data")
        train_file, test_file = out / "train.jsonl", out / "test.jsonl"
    train = _with_token_ids(train_file, tokenizer, cfg.data.max_prompt_length)
    test = _with_token_ids(test_file, tokenizer, cfg.data.max_prompt_length) \
        if test_file else []
    files = {"train": Path(train_file), "test": Path(test_file) if test_file else None}
    return train, test, files


def _with_token_ids(path, tokenizer, max_len):
    """Prepared records, tokenized here if prepared without a tokenizer; prompts over max_len
    are dropped and counted, as DiagnosisZero drops them."""
    from jaxzero.diagnosis.rarearena import read_prepared, with_prompt_ids
    records, dropped = with_prompt_ids(read_prepared(path), tokenizer, max_len, source=path)
    if dropped and distributed.is_main_process():
        print(f"{path}: dropped {dropped} prompts over data.max_prompt_length={max_len} tokens")
    return records


def _model_and_tokenizer(cfg, run_dir: Path):
    """The model's identity (architecture, tokenizer, stop and pad ids); its tokenizer is
    kept in the run dir."""
    from jaxzero.io.identity import identify_run_model
    identity = identify_run_model(cfg.model)
    tok_dir = run_dir / "tokenizer"
    if distributed.is_main_process() and not tok_dir.exists():
        identity.tokenizer.save_pretrained(tok_dir)
    return identity


def setup_run(cfg, *, resume: bool, overwrite: bool, log=print) -> Run:
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)  # fail fast on a bad mesh
    claim = run_dir_lib.open_run_dir(cfg, resume=resume, overwrite=overwrite,
                                     main=distributed.is_main_process())
    try:
        return _build_run(cfg, claim, mesh, resume=resume, log=log)
    except BaseException:
        claim.close()
        raise


def _build_run(cfg, claim: run_dir_lib.RunDir, mesh, *, resume: bool, log) -> Run:
    run_dir = claim.path
    distributed.sync("run dir")
    identity = _model_and_tokenizer(cfg, run_dir)
    model_config, tokenizer = identity.config, identity.tokenizer
    if distributed.is_main_process():
        from jaxzero.io.identity import write_model_config
        write_model_config(run_dir, model_config, cfg.model.param_dtype)
    train_records, test_records, data_files = _load_data(cfg, run_dir, tokenizer)
    data_fingerprint = claim.check_data(data_files)
    for name, records in (("train", train_records), ("test", test_records)):
        if data_files[name] is not None:
            run_dir_lib.check_token_ids(records, data_files[name], model_config.vocab_size)

    options = ModelOptions(param_dtype=jnp.dtype(cfg.model.param_dtype),
                           compute_dtype=jnp.dtype(cfg.model.compute_dtype),
                           remat=cfg.model.remat == "block")
    graphdef, abstract = abstract_model(model_config, options)
    if cfg.data.prompts_per_step % jax.process_count():
        raise ConfigError(f"data.prompts_per_step={cfg.data.prompts_per_step} does not divide "
                          f"over {jax.process_count()} processes")
    # prompts_per_step is the global batch; each process reads its own share of it.
    loader = PromptLoader(train_records,
                          batch_size=cfg.data.prompts_per_step // jax.process_count(),
                          seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                          num_epochs=cfg.trainer.total_epochs,
                          process_index=jax.process_index(), process_count=jax.process_count())
    steps_per_epoch = loader.batches_per_epoch
    total_steps = steps_per_epoch * cfg.trainer.total_epochs - cfg.trainer.seed_step_count
    if cfg.trainer.max_steps is not None:
        total_steps = min(total_steps, cfg.trainer.max_steps)
    o = cfg.optim
    schedule = lr_schedule(o.schedule, o.lr, o.warmup_steps, total_steps)
    optimizer = make_optimizer(lr=schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                               eps=o.eps, grad_clip=o.grad_clip)
    g = cfg.grpo
    loss_config = grpo.LossConfig(clip_low=g.clip_low, clip_high=g.clip_high, clip_c=g.clip_c,
                                  agg=g.loss_agg, entropy_coeff=g.entropy_coeff,
                                  use_kl_loss=g.use_kl_loss, kl_coef=g.kl_coef,
                                  kl_kind=g.kl_kind, group_rows=g.seed_micro_batch_rows,
                                  loss_scale=g.loss_scale)
    fns = build_step_functions(graphdef, abstract, optimizer, loss_config, mesh,
                               response_len=cfg.rollout.max_new_tokens,
                               micro_batches=g.micro_batches, logit_chunk=g.logit_chunk,
                               temperature=cfg.rollout.temperature)
    for line in fns.replicated:  # listed once: what the mesh cannot shard as the table asks
        log(f"sharding: {line}")
    store = CheckpointStore(run_dir / "checkpoints", keep=cfg.trainer.keep_checkpoints)
    ref_store = CheckpointStore(run_dir / "reference", keep=1)
    latest = store.latest_step()
    if resume and latest is None:
        raise CheckpointError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")

    abstract_opt = jax.eval_shape(optimizer.init, abstract)
    abstract_arrays = {
        "params": abstract_on(abstract, fns.param_shardings),
        "opt_state": abstract_on(abstract_opt, fns.opt_shardings),
    }
    base_key = jax.random.key(cfg.trainer.seed)
    if latest is not None:
        latest, arrays, meta = _restore_newest(store, abstract_arrays, log)
        _check_model_config(meta, model_config, store.directory)
        params, opt_state = arrays["params"], arrays["opt_state"]
        loader.set_state(meta["data_state"])
        start_step = int(meta["step"])
        log(f"resuming from {store.directory}/{latest} (step {start_step})")
    else:
        params = _initial_params(cfg, model_config, options, abstract, fns.param_shardings,
                                 log)
        if cfg.model.demo and cfg.demo.warmup_steps:
            from jaxzero.diagnosis.demo import run_format_warmup
            diagnoses = sorted({r["labels"][-1] for r in train_records})  # Orphanet names
            params, _ = run_format_warmup(
                graphdef, params, mesh, records=train_records, tokenizer=tokenizer,
                diagnoses=diagnoses, steps=cfg.demo.warmup_steps, lr=cfg.demo.warmup_lr,
                batch_size=cfg.demo.warmup_batch,
                correct_fraction=cfg.demo.warmup_correct_fraction,
                prompt_len=max(cfg.data.prompt_buckets), response_len=cfg.rollout.max_new_tokens,
                logit_chunk=cfg.grpo.logit_chunk, seed=cfg.trainer.seed, log=log)
        opt_state = init_opt_state(optimizer, params, fns.opt_shardings)
        start_step = 0
    ref_params = None
    if cfg.grpo.use_kl_loss:
        ref_params = _reference(cfg, params if latest is None else None, ref_store,
                                abstract_arrays["params"], model_config, options, log)
    sampler = Sampler(graphdef, model_config, mesh=mesh,
                      max_new_tokens=cfg.rollout.max_new_tokens,
                      buckets=tuple(cfg.data.prompt_buckets),
                      stop_ids=identity.stop_ids, pad_id=identity.pad_id)
    r = cfg.reward
    reward_kwargs = dict(mode=r.mode, format_score=r.format_score, score=r.score,
                         threshold=r.threshold, matcher=r.matcher)
    writer = MetricsWriter(run_dir / "tb")
    if start_step == 0:
        writer.hparams(config_lib.flatten(cfg))
    if distributed.is_main_process():
        claim.commit(cfg, data_fingerprint)  # the run's identity, once setup has succeeded
    return Run(cfg=cfg, run_dir=run_dir, tokenizer=tokenizer, model_config=model_config,
               mesh=mesh, graphdef=graphdef, fns=fns, params=params, opt_state=opt_state,
               ref_params=ref_params, sampler=sampler, loader=loader,
               train_records=train_records, test_records=test_records, writer=writer, store=store,
               reward_worker=RewardWorker(tokenizer, reward_kwargs),
               reward_kwargs=reward_kwargs, base_key=base_key, start_step=start_step,
               total_steps=total_steps, lr_at=lambda s: float(schedule(s)), claim=claim)


def save_checkpoint(run: Run, step: int, *, log=print, force: bool = False) -> None:
    if run.store.latest_step() == step:
        return  # already saved (the end of a run that stopped on a save step)
    meta = {"step": step, "data_state": run.loader.get_state(),
            "config": config_lib.config_to_dict(run.cfg),
            "model_config": run.model_config.to_dict()}
    saved = run.store.save(step, _pure({"params": run.params, "opt_state": run.opt_state}),
                           meta, force=force)
    if saved and distributed.is_main_process():
        log(f"checkpoint step {step} -> {run.ckpt_dir}/{step}")


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
        diff = {k: (found[k], v) for k, v in model_config.to_dict().items() if found.get(k) != v}
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
