"""The jaxzero model directory: converted weights or a training run's, with their architecture
and tokenizer beside them; and loading a model from it, from an HF dir or from a hub id.

Layout (the trainer's run directory has the same one, plus its own files):

    DIR/model_config.json       Qwen2Config.to_dict() + {"param_dtype": ...}
    DIR/tokenizer/              the source's tokenizer files
    DIR/generation_config.json  copied when the source had one
    DIR/checkpoints/<step>/     CheckpointStore; arrays {"params": pure dict of the nnx state,
                                ...} (the trainer adds "opt_state" and more)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxzero.io import hf as hf_io
from jaxzero.io import staging
from jaxzero.io.checkpoint import CheckpointStore
from jaxzero.io.identity import (CHECKPOINTS, GENERATION_CONFIG, MODEL_CONFIG, TOKENIZER_DIR,
                                 ModelSource, checkpoints_location, is_jaxzero_dir,
                                 resolve_source, write_model_config)
from jaxzero.errors import CheckpointError
from jaxzero.model.qwen2 import ModelOptions, Qwen2ForCausalLM, abstract_model
from jaxzero.model.config import Qwen2Config
from jaxzero.parallel import distributed
from jaxzero.parallel.sharding import abstract_on

CONVERTED_STEP = 0


def _store(path: Path) -> CheckpointStore:
    ckpt = checkpoints_location(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"{path}: no checkpoints at {ckpt}; it holds no weights yet")
    return CheckpointStore(ckpt)


def _restore_params(source: ModelSource, step: int | None, dtype, shardings):
    _, state = abstract_model(source.config, ModelOptions(param_dtype=dtype))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(state))
    abstract = abstract_on(nnx.to_pure_dict(state), hf_io.pure_params(shardings))
    store = _store(source.path)
    try:
        meta = store.restore_meta(step)
        if "model_config" not in meta:
            raise CheckpointError(f"{store.directory}: checkpoint meta has no model_config")
        if Qwen2Config.from_dict(meta["model_config"]) != source.config:
            raise CheckpointError(f"{source.path}: the checkpoint's model_config differs from "
                                  f"{MODEL_CONFIG}")
        # Only the params subtree is read; a run's optimizer state stays on disk.
        arrays, _ = store.restore(step, abstract_arrays={"params": abstract}, cast=True)
    finally:
        store.close()
    nnx.replace_by_pure_dict(state, arrays["params"])
    return state


def load_params(path_or_hub_id: str | Path, *, step: int | None = None, param_dtype,
                shardings=None) -> tuple[Qwen2Config, nnx.State]:
    """`(config, params)` of a jaxzero dir (checkpoint `step`, default the latest), an HF dir
    or a hub id, cast to `param_dtype` and placed on `shardings` (a pytree like the params,
    an nnx.State or a pure dict; default: the first local device)."""
    source = resolve_source(path_or_hub_id)
    dtype = np.dtype(jnp.dtype(param_dtype))
    if source.kind == "hf":
        if step is not None:
            raise CheckpointError(f"{source.path} is an HF model dir; it has no steps")
        return hf_io.load_hf_checkpoint(source.path, param_dtype=dtype, shardings=shardings)
    return source.config, _restore_params(source, step, dtype, shardings)


def load_model(path_or_hub_id: str | Path, *, param_dtype, compute_dtype, shardings_fn=None,
               step: int | None = None) -> Qwen2ForCausalLM:
    """A ready Qwen2ForCausalLM. `shardings_fn(abstract_state)` gives the parameters'
    shardings once the architecture is known (e.g. `lambda s: param_shardings(s, mesh)`)."""
    source = resolve_source(path_or_hub_id)
    options = ModelOptions(param_dtype=jnp.dtype(param_dtype),
                           compute_dtype=jnp.dtype(compute_dtype))
    graphdef, abstract = abstract_model(source.config, options)
    shardings = shardings_fn(abstract) if shardings_fn is not None else None
    _, state = load_params(source.path, step=step, param_dtype=param_dtype, shardings=shardings)
    return nnx.merge(graphdef, state)


def _param_dtype_name(flat: dict) -> str:
    dtypes = {np.dtype(x.dtype).name for x in flat.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"parameters mix dtypes {sorted(dtypes)}; cast them to one")
    return dtypes.pop()


def _refuse_taken(out_dir: Path) -> None:
    if is_jaxzero_dir(out_dir) or (out_dir / CHECKPOINTS).exists():
        raise CheckpointError(f"{out_dir} already holds a jaxzero model; choose a new directory")
    staging.check_target(out_dir, replace=False, flag=None)


def save_converted(out_dir: str | Path, model_or_state, config: Qwen2Config,
                   tokenizer_src: str | Path | None, *,
                   generation_config: str | Path | None = None,
                   source: str = "") -> list[str]:
    """Writes a jaxzero model dir holding `model_or_state` as checkpoint step 0.

    Everything goes to a hidden sibling first, renamed to `out_dir` once complete, so an
    interrupted conversion leaves no directory (nor a torn tokenizer.json) behind and can
    simply be run again. Refuses an `out_dir` that is not empty. Every process must call this
    (the checkpoint write is collective); process 0 writes the small files. Returns what it
    wrote.
    """
    out_dir = Path(out_dir)
    try:
        _refuse_taken(out_dir)
        refused = None
    except CheckpointError as e:
        refused = e
    distributed.sync("save_converted: looked")  # every process looks before process 0 writes
    if refused is not None:
        raise refused
    params = hf_io.pure_params(model_or_state)
    flat = hf_io.flatten_pure(params)
    want = hf_io.param_shapes(hf_io.tensor_table(config), config)
    if {p: tuple(x.shape) for p, x in flat.items()} != want:
        raise CheckpointError("parameters do not match the model config")
    param_dtype = _param_dtype_name(flat)
    work = staging.sibling(out_dir, "partial")
    written = []
    if jax.process_index() == 0:
        staging.begin(out_dir)
        if tokenizer_src is not None:
            names = hf_io.copy_tokenizer_files(tokenizer_src, work / TOKENIZER_DIR)
            written += [f"{TOKENIZER_DIR}/{n}" for n in names]
        if generation_config is not None:
            shutil.copyfile(generation_config, work / GENERATION_CONFIG)
            written.append(GENERATION_CONFIG)
    distributed.sync("save_converted: small files written")
    store = CheckpointStore(work / CHECKPOINTS, keep=1)
    try:
        store.save(CONVERTED_STEP, {"params": params},
                   {"step": CONVERTED_STEP, "model_config": config.to_dict(),
                    "converted_from": str(source)}, force=True)
        store.wait()
    finally:
        store.close()
    written.append(f"{CHECKPOINTS}/{CONVERTED_STEP}")
    distributed.sync("save_converted: checkpoint written")
    if jax.process_index() == 0:
        # The identity goes last: a directory with model_config.json is complete.
        write_model_config(work, config, param_dtype)
        staging.commit(work, out_dir)
    distributed.sync("save_converted: committed")
    return [MODEL_CONFIG] + written


# ---------------------------------------------------------------- `jaxzero convert`


def convert_hf_to_jax(hf_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> None:
    """HF dir (or hub id) -> jaxzero model dir, parameters stored in `dtype`.

    The source must have its tokenizer files: a jaxzero dir without them could not generate
    or train (they are checked to round-trip a chat prompt when loaded).
    """
    from jaxzero.io.tokenizer import require_files
    source = resolve_source(hf_dir)
    if source.kind != "hf":
        raise CheckpointError(f"{hf_dir} is already a jaxzero model dir")
    _refuse_taken(Path(out_dir))
    require_files(source.path)
    config, state = hf_io.load_hf_checkpoint(source.path, param_dtype=dtype)
    written = save_converted(out_dir, state, config, source.path,
                             generation_config=source.generation_config, source=str(hf_dir))
    print(f"converted {hf_dir} ({config.num_params() / 1e9:.3f}B parameters, {dtype}) -> "
          f"{out_dir}: {', '.join(written)}")


def convert_jax_to_hf(ckpt_dir: str | Path, out_dir: str | Path, step: int | None = None,
                      dtype: str = "bfloat16", force: bool = False) -> hf_io.ExportSummary:
    """jaxzero model or run dir (checkpoint `step`, default the latest) -> HF dir in `dtype`.

    A non-empty `out_dir` is refused unless `force`; the export is then written beside it and
    swapped in at the end, so a crash leaves the old files.
    """
    source = resolve_source(ckpt_dir)
    if source.kind != "jaxzero":
        raise CheckpointError(f"{ckpt_dir} is an HF model dir, not a jaxzero one")
    staging.check_target(Path(out_dir), replace=force)
    config, state = load_params(source.path, step=step, param_dtype=source.param_dtype)
    tok = source.tokenizer_dir
    summary = hf_io.export_hf(state, config, out_dir, dtype=dtype,
                              tokenizer_src=tok if tok.is_dir() else None,
                              generation_config=source.generation_config, overwrite=force)
    print(summary.format())
    if not tok.is_dir():
        print(f"note: {source.path} has no {TOKENIZER_DIR}/, so the export has no tokenizer; "
              "copy one in before loading it with transformers' AutoTokenizer")
    return summary


def checkpoints_of(path: str | Path) -> list[tuple[str, int | None]]:
    """A run or converted dir expands to (path, step) for each of its checkpoint steps;
    anything else (an HF dir, a hub id) is one entry with step None."""
    from jaxzero.io.storage import is_remote
    ckpt = checkpoints_location(resolve_source(path).path if is_remote(path) else path)
    if ckpt.is_dir():
        store = CheckpointStore(ckpt)
        try:
            steps = store.all_steps()
        finally:
            store.close()
        if steps:
            return [(str(path), s) for s in steps]
    return [(str(path), None)]
