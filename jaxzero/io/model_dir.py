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

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxzero.io import hf as hf_io
from jaxzero.io.checkpoint import CheckpointStore
from jaxzero.errors import CheckpointError
from jaxzero.model.qwen2 import ModelOptions, Qwen2ForCausalLM, abstract_model
from jaxzero.model.config import Qwen2Config

MODEL_CONFIG = "model_config.json"
TOKENIZER_DIR = "tokenizer"
GENERATION_CONFIG = "generation_config.json"
CHECKPOINTS = "checkpoints"
CONVERTED_STEP = 0
# What a hub download needs: configs, weights, tokenizer; never pickled weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer.model"]


def is_jaxzero_dir(path: str | Path) -> bool:
    return (Path(path) / MODEL_CONFIG).is_file()


def read_model_config(path: str | Path) -> tuple[Qwen2Config, str]:
    """(architecture, param dtype name) from DIR/model_config.json; unknown keys are errors."""
    file = Path(path) / MODEL_CONFIG
    try:
        fields = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from e
    known = {f.name for f in dataclasses.fields(Qwen2Config)}
    unknown = sorted(set(fields) - known - {"param_dtype"})
    if unknown or "param_dtype" not in fields:
        raise CheckpointError(f"{file}: unknown fields {unknown}" if unknown else
                              f"{file}: no param_dtype")
    param_dtype = fields.pop("param_dtype")
    return Qwen2Config.from_dict(fields), param_dtype


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a jaxzero dir or an HF dir (a hub id resolves to one)."""

    kind: str  # "jaxzero" or "hf"
    path: Path
    config: Qwen2Config

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR if self.kind == "jaxzero" else self.path


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, ValueError) as e:
        reason = " ".join(str(e).split())
        raise CheckpointError(
            f"{repo_id!r} is not a local directory and could not be fetched from the HF hub "
            f"or found in its cache ({type(e).__name__}: {reason}). Download it first, e.g. "
            f"`hf download {repo_id}` (`huggingface-cli download {repo_id}` with older "
            "huggingface_hub), or pass a local model directory.") from e


def resolve_source(path_or_hub_id: str | Path) -> ModelSource:
    """Finds the model: a jaxzero dir, an HF dir (config.json), or a hub id such as
    Qwen/Qwen2.5-3B-Instruct (from the HF cache, or downloaded when online)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        if is_jaxzero_dir(path):
            return ModelSource("jaxzero", path, read_model_config(path)[0])
        if (path / "config.json").is_file():
            return ModelSource("hf", path, Qwen2Config.from_hf_dir(path))
        if (path.parent.parent / MODEL_CONFIG).is_file() and path.parent.name == CHECKPOINTS:
            raise CheckpointError(f"{path} is one checkpoint step; pass the model directory "
                                  f"{path.parent.parent} (and the step, if not the latest)")
        raise CheckpointError(f"{path}: neither a jaxzero model dir ({MODEL_CONFIG}) nor an HF "
                              "model dir (config.json)")
    text = str(path_or_hub_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"{text}: no such model directory (nor a hub id like "
                              "Qwen/Qwen2.5-3B-Instruct)")
    local = _download(text)
    return ModelSource("hf", local, Qwen2Config.from_hf_dir(local))


def _store(path: Path) -> CheckpointStore:
    ckpt = path / CHECKPOINTS
    if not ckpt.is_dir():
        raise CheckpointError(f"{path}: no {CHECKPOINTS}/ directory; it holds no weights yet")
    return CheckpointStore(ckpt)


def _restore_params(source: ModelSource, step: int | None, dtype, shardings):
    _, state = abstract_model(source.config, ModelOptions(param_dtype=dtype))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(state))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nnx.to_pure_dict(state), hf_io.pure_params(shardings))
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


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _param_dtype_name(flat: dict) -> str:
    dtypes = {np.dtype(x.dtype).name for x in flat.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"parameters mix dtypes {sorted(dtypes)}; cast them to one")
    return dtypes.pop()


def save_converted(out_dir: str | Path, model_or_state, config: Qwen2Config,
                   tokenizer_src: str | Path | None, *,
                   generation_config: str | Path | None = None,
                   source: str = "") -> list[str]:
    """Writes a jaxzero model dir holding `model_or_state` as checkpoint step 0.

    Refuses a directory that already holds a model. Every process must call this (the
    checkpoint write is collective); process 0 writes the small files. Returns what it wrote.
    """
    out_dir = Path(out_dir)
    taken = is_jaxzero_dir(out_dir) or (out_dir / CHECKPOINTS).exists()
    _sync("save_converted: looked")  # every process looks before process 0 writes
    if taken:
        raise CheckpointError(f"{out_dir} already holds a jaxzero model; choose a new directory")
    params = hf_io.pure_params(model_or_state)
    flat = hf_io.flatten_pure(params)
    want = {t.path: t.shape for t in hf_io.tensor_table(config)}
    if {p: tuple(x.shape) for p, x in flat.items()} != want:
        raise CheckpointError("parameters do not match the model config")
    param_dtype = _param_dtype_name(flat)
    written = []
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MODEL_CONFIG).write_text(
            json.dumps(dict(config.to_dict(), param_dtype=param_dtype), indent=1) + "\n")
        written.append(MODEL_CONFIG)
        if tokenizer_src is not None:
            names = hf_io.copy_tokenizer_files(tokenizer_src, out_dir / TOKENIZER_DIR)
            written += [f"{TOKENIZER_DIR}/{n}" for n in names]
        if generation_config is not None:
            shutil.copyfile(generation_config, out_dir / GENERATION_CONFIG)
            written.append(GENERATION_CONFIG)
    _sync("save_converted: small files written")
    store = CheckpointStore(out_dir / CHECKPOINTS, keep=1)
    try:
        store.save(CONVERTED_STEP, {"params": params},
                   {"step": CONVERTED_STEP, "model_config": config.to_dict(),
                    "converted_from": str(source)}, force=True)
        store.wait()
    finally:
        store.close()
    written.append(f"{CHECKPOINTS}/{CONVERTED_STEP}")
    return written


# ---------------------------------------------------------------- `jaxzero convert`


def convert_hf_to_jax(hf_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> None:
    """HF dir (or hub id) -> jaxzero model dir, parameters stored in `dtype`."""
    source = resolve_source(hf_dir)
    if source.kind != "hf":
        raise CheckpointError(f"{hf_dir} is already a jaxzero model dir")
    config, state = hf_io.load_hf_checkpoint(source.path, param_dtype=dtype)
    has_tokenizer = any((source.path / n).is_file() for n in hf_io.TOKENIZER_FILES)
    gen = source.path / GENERATION_CONFIG
    written = save_converted(out_dir, state, config, source.path if has_tokenizer else None,
                             generation_config=gen if gen.is_file() else None,
                             source=str(hf_dir))
    print(f"converted {hf_dir} ({config.num_params() / 1e9:.3f}B parameters, {dtype}) -> "
          f"{out_dir}: {', '.join(written)}")
    if not has_tokenizer:
        print(f"note: {source.path} has no tokenizer files, so none were copied; set "
              "model.tokenizer when training from this directory")


def convert_jax_to_hf(ckpt_dir: str | Path, out_dir: str | Path, step: int | None = None,
                      dtype: str = "bfloat16") -> hf_io.ExportSummary:
    """jaxzero model or run dir (checkpoint `step`, default the latest) -> HF dir in `dtype`."""
    source = resolve_source(ckpt_dir)
    if source.kind != "jaxzero":
        raise CheckpointError(f"{ckpt_dir} is an HF model dir, not a jaxzero one")
    stored_dtype = read_model_config(source.path)[1]
    config, state = load_params(source.path, step=step, param_dtype=stored_dtype)
    gen = source.path / GENERATION_CONFIG
    tok = source.tokenizer_dir
    summary = hf_io.export_hf(state, config, out_dir, dtype=dtype,
                              tokenizer_src=tok if tok.is_dir() else None,
                              generation_config=gen if gen.is_file() else None)
    print(summary.format())
    if not tok.is_dir():
        print(f"note: {source.path} has no {TOKENIZER_DIR}/, so the export has no tokenizer; "
              "copy one in before loading it with transformers' AutoTokenizer")
    return summary


def checkpoints_of(path: str | Path) -> list[tuple[str, int | None]]:
    """A run or converted dir expands to (path, step) for each of its checkpoint steps;
    anything else (an HF dir, a hub id) is one entry with step None."""
    ckpt = Path(path) / CHECKPOINTS
    if ckpt.is_dir():
        store = CheckpointStore(ckpt)
        try:
            steps = store.all_steps()
        finally:
            store.close()
        if steps:
            return [(str(path), s) for s in steps]
    return [(str(path), None)]
