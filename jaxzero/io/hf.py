"""HF safetensors <-> jaxzero Qwen2 parameters: a strict, streaming import and a sharded export.

Only safetensors are read (never pickles). Both directions go tensor by tensor, so the host
holds the parameters plus one tensor on import, and one tensor at a time on export.
Parameter names and shapes follow `model.py`'s vocabulary (D, F, N, K, H, V); torch Linear
weights are [out, in] and are transposed on the way in and out.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from jaxzero.errors import CheckpointError
from jaxzero.io import staging
from jaxzero.model.qwen2 import ModelOptions, abstract_model
from jaxzero.model.config import Qwen2Config
from jaxzero.parallel import distributed
from jaxzero.parallel.sharding import STACKED, to_host
from jaxzero.parallel.trees import path_name

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files a tokenizer may consist of; whichever the source has are copied, nothing else.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model")
_UNSAFE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
# safetensors dtype tag <-> numpy dtype, for the float types a checkpoint may hold.
_ST_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(jnp.bfloat16),
              "F16": np.dtype(np.float16)}
EXPORT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_TIED_CHECK_BYTES = 64 * 2**20  # rows of embed/lm_head compared at once when tied
_MAX_LISTED = 10


# ---------------------------------------------------------------- the name/shape table


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor and the jaxzero parameter it becomes."""

    hf_name: str
    path: tuple[str, ...]         # key path in the pure-dict state
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]        # ours: one layer's, for a stacked decoder parameter
    transposed: bool              # a torch Linear weight: HF [out, in], ours [in, ...out]
    layer: int | None = None      # the index along a stacked parameter's leading L axis

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        return (x.T if self.transposed else x).reshape(self.shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.transposed:
            return x.reshape(self.hf_shape[::-1]).T
        return x.reshape(self.hf_shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def tensor_table(config: Qwen2Config) -> list[TensorMap]:
    """Every tensor of an HF Qwen2ForCausalLM checkpoint with `config`, in HF's order. HF's
    `model.layers.{i}.*` are layer i of our stacked `layers.*` parameters."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    n, k, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    # Per layer: HF name suffix, our key path suffix, HF shape, our shape, transposed.
    layer = [
        ("self_attn.q_proj.weight", ("attn", "q_DNH"), (n * h, d), (d, n, h), True),
        ("self_attn.q_proj.bias", ("attn", "q_bias_NH"), (n * h,), (n, h), False),
        ("self_attn.k_proj.weight", ("attn", "k_DKH"), (k * h, d), (d, k, h), True),
        ("self_attn.k_proj.bias", ("attn", "k_bias_KH"), (k * h,), (k, h), False),
        ("self_attn.v_proj.weight", ("attn", "v_DKH"), (k * h, d), (d, k, h), True),
        ("self_attn.v_proj.bias", ("attn", "v_bias_KH"), (k * h,), (k, h), False),
        ("self_attn.o_proj.weight", ("attn", "o_NHD"), (d, n * h), (n, h, d), True),
        ("mlp.gate_proj.weight", ("mlp", "gate_DF"), (f, d), (d, f), True),
        ("mlp.up_proj.weight", ("mlp", "up_DF"), (f, d), (d, f), True),
        ("mlp.down_proj.weight", ("mlp", "down_FD"), (d, f), (f, d), True),
        ("input_layernorm.weight", ("attn_norm_D",), (d,), (d,), False),
        ("post_attention_layernorm.weight", ("mlp_norm_D",), (d,), (d,), False),
    ]
    table = [TensorMap("model.embed_tokens.weight", ("embed_VD",), (v, d), (v, d), False)]
    for i in range(config.num_hidden_layers):
        table += [TensorMap(f"model.layers.{i}.{name}", (STACKED,) + path, hf_shape, shape,
                            transposed, i) for name, path, hf_shape, shape, transposed in layer]
    table.append(TensorMap("model.norm.weight", ("norm_D",), (d,), (d,), False))
    if not config.tie_word_embeddings:
        table.append(TensorMap("lm_head.weight", ("lm_head_VD",), (v, d), (v, d), False))
    return table


# ---------------------------------------------------------------- pure-dict helpers


def flatten_pure(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    """{key path: leaf} of a nested dict (an nnx pure-dict state)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_pure(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def _set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def pure_params(state_or_model) -> dict:
    """The parameters as a plain nested dict: from a model, an nnx.State or a pure dict."""
    if isinstance(state_or_model, nnx.Module):
        return nnx.to_pure_dict(nnx.state(state_or_model, nnx.Param))
    if isinstance(state_or_model, nnx.State):
        return nnx.to_pure_dict(state_or_model)
    if isinstance(state_or_model, dict):
        return state_or_model
    raise TypeError(f"expected an nnx model, nnx.State or pure dict, got "
                    f"{type(state_or_model).__name__}")


def _listed(names) -> str:
    names = sorted(names)
    more = len(names) - _MAX_LISTED
    return ", ".join(names[:_MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


def _key_problems(want: set[tuple], have: set[tuple]) -> list[str]:
    problems = []
    if want - have:
        problems.append(f"missing {_listed(map(path_name, want - have))}")
    if have - want:
        problems.append(f"unexpected {_listed(map(path_name, have - want))}")
    return problems


# ---------------------------------------------------------------- import


@dataclasses.dataclass(frozen=True)
class _Stored:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors tag, e.g. "BF16"


def _weight_files(hf_dir: Path) -> tuple[dict[str, str] | None, list[Path]]:
    """(the index's weight_map or None, the safetensors files it names or the single file)."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (hf_dir / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing from {hf_dir}: "
                                  f"{_listed(missing)}")
        return weight_map, [hf_dir / n for n in names]
    if (hf_dir / SINGLE_FILE).is_file():
        return None, [hf_dir / SINGLE_FILE]
    unsafe = [n for n in _UNSAFE_WEIGHTS if (hf_dir / n).exists()]
    if unsafe:
        raise CheckpointError(
            f"{hf_dir} holds {', '.join(unsafe)}; jaxzero reads only safetensors (pickled "
            "torch files can run code). Convert it with transformers' save_pretrained "
            "(safe_serialization=True) first.")
    others = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if others:
        raise CheckpointError(f"{hf_dir} has {_listed(others)} but no {INDEX_FILE} saying "
                              f"which tensor is where (nor a single {SINGLE_FILE})")
    raise CheckpointError(f"{hf_dir}: no {SINGLE_FILE} and no {INDEX_FILE}; jaxzero reads "
                          "only safetensors checkpoints")


def read_safetensors_headers(hf_dir: str | Path) -> dict[str, _Stored]:
    """Name, file, shape and dtype of every tensor, from the headers alone."""
    hf_dir = Path(hf_dir)
    weight_map, files = _weight_files(hf_dir)
    found: dict[str, _Stored] = {}
    for path in files:
        try:
            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    if weight_map is not None and weight_map.get(name) != path.name:
                        continue  # the index is authoritative about where a tensor lives
                    s = f.get_slice(name)
                    found[name] = _Stored(path, tuple(s.get_shape()), s.get_dtype())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({path.stat().st_size:,} bytes; "
                f"{' '.join(str(e).split())}); it is truncated or damaged, download it "
                "again") from e
    if weight_map is not None:
        lost = [f"{n} (in {weight_map[n]})" for n in weight_map if n not in found]
        if lost:
            raise CheckpointError(f"{hf_dir / INDEX_FILE} lists tensors that their shard files "
                                  f"do not contain: {_listed(lost)}")
    return found


def _stored_layers(found: dict[str, _Stored]) -> set[int]:
    return {int(name.split(".")[2]) for name in found
            if name.startswith("model.layers.") and name.split(".")[2].isdigit()}


def _check_tensors(found: dict[str, _Stored], table: list[TensorMap], config: Qwen2Config,
                   hf_dir: Path) -> None:
    layers = _stored_layers(found)
    if layers != set(range(config.num_hidden_layers)):
        held = (f"{len(layers)} (model.layers.{min(layers)} .. model.layers.{max(layers)})"
                if layers else "none")
        raise CheckpointError(
            f"{hf_dir / 'config.json'}: num_hidden_layers is {config.num_hidden_layers}, but "
            f"the weights hold layers {held}; the config and the weights are of different "
            "models")
    expected = {t.hf_name: t for t in table}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected) - optional
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listed(unexpected)}")
    for name in sorted(set(expected) & set(found)):
        want, have = expected[name].hf_shape, found[name].shape
        if want != have:
            problems.append(f"{name} has shape {list(have)}, expected {list(want)} "
                            f"(from config.json)")
        if found[name].dtype not in _ST_DTYPES:
            problems.append(f"{name} is {found[name].dtype}; expected a float tensor "
                            f"({', '.join(_ST_DTYPES)})")
    if problems:
        raise CheckpointError(f"{hf_dir} does not match its Qwen2 config.json: "
                              + "; ".join(problems))


def _check_tied_head(found: dict[str, _Stored], hf_dir: Path) -> None:
    """A tied model's checkpoint may carry lm_head.weight; it must then equal the embedding.

    Anything else would silently change the model, since jaxzero keeps one matrix.
    """
    embed, head = found["model.embed_tokens.weight"], found["lm_head.weight"]
    if (embed.shape, embed.dtype) != (head.shape, head.dtype):
        raise CheckpointError(
            f"{hf_dir}: tie_word_embeddings is true but lm_head.weight "
            f"({head.dtype} {list(head.shape)}) differs from model.embed_tokens.weight "
            f"({embed.dtype} {list(embed.shape)})")
    rows = max(1, _TIED_CHECK_BYTES // (embed.shape[1] * _ST_DTYPES[embed.dtype].itemsize))
    with safe_open(embed.file, framework="numpy") as fe, \
            safe_open(head.file, framework="numpy") as fh:
        se, sh = fe.get_slice("model.embed_tokens.weight"), fh.get_slice("lm_head.weight")
        for start in range(0, embed.shape[0], rows):
            stop = min(start + rows, embed.shape[0])
            if not np.array_equal(se[start:stop], sh[start:stop]):
                raise CheckpointError(
                    f"{hf_dir}: tie_word_embeddings is true but lm_head.weight differs from "
                    f"model.embed_tokens.weight (first at rows {start}..); set "
                    "tie_word_embeddings to false in config.json if the head is separate")


def _flat_shardings(shardings, table: list[TensorMap]) -> dict[tuple, jax.sharding.Sharding]:
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return {t.path: device for t in table}
    flat = flatten_pure(pure_params(shardings))
    problems = _key_problems({t.path for t in table}, set(flat))
    if problems:
        raise ValueError("shardings do not match the model's parameters: " + "; ".join(problems))
    return flat


def _no_progress() -> bool | None:
    """tqdm's `disable`: never on other processes; None lets tqdm hide it off a TTY (logs,
    pipes), and TQDM_DISABLE=1 hides it everywhere."""
    if jax.process_index() != 0 or os.environ.get("TQDM_DISABLE", "") not in ("", "0"):
        return True
    return None


def load_hf_checkpoint(hf_dir: str | Path, *, param_dtype, shardings=None):
    """Reads an HF Qwen2 safetensors checkpoint into `(Qwen2Config, nnx.State)`.

    Every name, shape and dtype is checked against config.json before any tensor is read.
    Tensors are then read one at a time, cast to `param_dtype` and placed on their sharding
    (`shardings`: a pytree like the state, default: the first local device) with
    `jax.make_array_from_callback`, so each process keeps only its own shards. The largest
    tensor goes first, while little else is resident, so the host peak is about the
    parameters plus one small tensor.
    """
    hf_dir = Path(hf_dir)
    config = Qwen2Config.from_hf_dir(hf_dir)
    found = read_safetensors_headers(hf_dir)
    table = tensor_table(config)
    _check_tensors(found, table, config, hf_dir)
    if config.tie_word_embeddings and "lm_head.weight" in found:
        _check_tied_head(found, hf_dir)
    dtype = np.dtype(jnp.dtype(param_dtype))
    _, state = abstract_model(config, ModelOptions(param_dtype=dtype))
    where = _flat_shardings(shardings, table)
    shapes = param_shapes(table, config)
    flat: dict[tuple, jax.Array] = {}
    order = sorted(table, key=lambda t: t.size, reverse=True)
    for t in tqdm(order, desc=f"reading {hf_dir.name}", unit="tensor",
                  disable=_no_progress()):
        # One open per tensor: safe_open maps the whole file, and mapped pages that were read
        # count as resident until the mapping closes.
        with safe_open(found[t.hf_name].file, framework="numpy") as f:
            x = t.to_ours(f.get_tensor(t.hf_name)).astype(dtype, copy=False)
        if t.layer is None:
            flat[t.path] = jax.make_array_from_callback(
                t.shape, where[t.path], lambda index, x=x: x[index])
        else:
            if t.path not in flat:
                flat[t.path] = _zeros(shapes[t.path], dtype, where[t.path])
            layer = jax.make_array_from_callback(
                t.shape, _layer_sharding(where[t.path]), lambda index, x=x: x[index])
            flat[t.path] = _set_layer(flat[t.path], layer, np.int32(t.layer))
        del x
    params: dict = {}
    for path, x in flat.items():
        _set_path(params, path, x)
    nnx.replace_by_pure_dict(state, params)
    return config, state


def param_shapes(table: list[TensorMap], config: Qwen2Config) -> dict[tuple, tuple[int, ...]]:
    """The shape of each of our parameters: a stacked one's is [L, one layer's shape]."""
    return {t.path: t.shape if t.layer is None else (config.num_hidden_layers, *t.shape)
            for t in table}


def _layer_sharding(stacked: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer of a stacked parameter (whose L axis is never sharded)."""
    if isinstance(stacked, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(stacked.mesh, jax.sharding.PartitionSpec(
            *stacked.spec[1:]))
    return stacked  # one device


def _zeros(shape, dtype, sharding) -> jax.Array:
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


# The stacked parameter is donated: each layer is written into it in place, so the devices
# hold the parameters plus one layer's tensor, not two copies of a stacked one.
@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked_LX: jax.Array, x_X: jax.Array, layer: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked_LX, x_X.astype(stacked_LX.dtype),
                                               layer, 0)


@jax.jit
def _get_layer(stacked_LX: jax.Array, layer: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(stacked_LX, layer, 0, keepdims=False)


# ---------------------------------------------------------------- export


@dataclasses.dataclass(frozen=True)
class ExportSummary:
    out_dir: Path
    weight_files: tuple[str, ...]
    other_files: tuple[str, ...]
    num_tensors: int
    total_bytes: int
    dtype: str

    def format(self) -> str:
        return (f"wrote {self.num_tensors} tensors ({self.total_bytes / 2**20:,.1f} MiB "
                f"{self.dtype}) "
                f"to {self.out_dir}: {', '.join(self.weight_files + self.other_files)}")


class _SafetensorsWriter:
    """Writes one safetensors file tensor by tensor; the header is fixed up front.

    Format: 8-byte little-endian header length, a JSON header (padded with spaces to a
    multiple of 8) of {name: {dtype, shape, data_offsets}}, then the raw bytes in order.
    """

    def __init__(self, path: Path, tensors: list[TensorMap], st_dtype: str):
        itemsize = _ST_DTYPES[st_dtype].itemsize
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._expected = []
        for t in tensors:
            end = offset + t.size * itemsize
            header[t.hf_name] = {"dtype": st_dtype, "shape": list(t.hf_shape),
                                 "data_offsets": [offset, end]}
            self._expected.append((t.hf_name, end - offset))
            offset = end
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.path, self._tmp = path, path.with_name(path.name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._next = 0

    def write(self, name: str, x: np.ndarray) -> None:
        want_name, want_bytes = self._expected[self._next]
        assert (name, x.nbytes) == (want_name, want_bytes), (name, x.nbytes, want_name)
        self._file.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)
        self._next += 1

    def close(self) -> None:
        assert self._next == len(self._expected), "not every tensor was written"
        self._file.close()
        os.replace(self._tmp, self.path)


def _plan_shards(table: list[TensorMap], itemsize: int, max_shard_bytes: int):
    """Consecutive tensors in files of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[TensorMap]] = [[]]
    size = 0
    for t in table:
        nbytes = t.size * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    if len(shards) == 1:
        return [(SINGLE_FILE, shards[0])]
    n = len(shards)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", s) for i, s in enumerate(shards)]


def _from_main(flag: bool) -> bool:
    """Process 0's value of `flag`, on every process."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def default_generation_config(config: Qwen2Config) -> dict[str, Any]:
    """Qwen2.5's convention: <|endoftext|> (the bos id) also ends generation and pads.

    For Qwen2.5-Instruct this gives eos [151645, 151643] and pad 151643, as it ships.
    """
    eos_ids = list(config.eos_token_id)
    out: dict[str, Any] = {"bos_token_id": config.bos_token_id}
    if config.bos_token_id is not None:
        if config.bos_token_id not in eos_ids:
            eos_ids.append(config.bos_token_id)
        out["pad_token_id"] = config.bos_token_id
    out["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    return out


def tokenizer_files(src: str | Path) -> list[str]:
    """The TOKENIZER_FILES that `src` has; an error when it has none."""
    names = [n for n in TOKENIZER_FILES if (Path(src) / n).is_file()]
    if not names:
        raise CheckpointError(
            f"{src}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    return names


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copies the tokenizer files `src` has into `dst`; their names."""
    src, dst = Path(src), Path(dst)
    names = tokenizer_files(src)
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copyfile(src / n, dst / n)
    return names


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def export_hf(state_or_model, config: Qwen2Config, out_dir: str | Path, *,
              dtype: str = "bfloat16", max_shard_bytes: int = 5 * 10**9,
              tokenizer_src: str | Path | None = None,
              generation_config: str | Path | dict | None = None,
              overwrite: bool = False) -> ExportSummary:
    """Writes an HF Qwen2ForCausalLM directory that `from_pretrained` loads.

    Weights go to `model.safetensors`, or to `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json` when they exceed `max_shard_bytes`, cast to `dtype`. Also
    config.json, generation_config.json (copied from a path, written from a dict, or the
    Qwen defaults) and the tokenizer files of `tokenizer_src`. Tensors are fetched to the
    host one at a time; with several processes every one must call this (they take part in
    the gathers) and only process 0 writes. A non-empty `out_dir` is refused unless
    `overwrite`; the files are written into a hidden sibling that replaces `out_dir` only once
    complete, so a failed export leaves the old directory as it was.
    """
    if dtype not in EXPORT_DTYPES:
        raise CheckpointError(f"export dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    st_dtype = EXPORT_DTYPES[dtype]
    np_dtype = _ST_DTYPES[st_dtype]
    flat = flatten_pure(pure_params(state_or_model))
    table = tensor_table(config)
    want = param_shapes(table, config)
    problems = _key_problems(set(want), set(flat))
    problems += [f"{path_name(p)} has shape {tuple(flat[p].shape)}, the config says "
                 f"{shape}" for p, shape in want.items()
                 if p in flat and tuple(flat[p].shape) != shape]
    if problems:
        raise CheckpointError("parameters do not match the model config: " + "; ".join(problems))

    if tokenizer_src is not None:
        tokenizer_files(tokenizer_src)  # fail before writing gigabytes, not after
    if isinstance(generation_config, (str, Path)) and not Path(generation_config).is_file():
        raise CheckpointError(f"{generation_config}: no such generation config file")
    out_dir = Path(out_dir)
    main = jax.process_index() == 0
    refused = None
    if main:
        try:
            staging.check_target(out_dir, replace=overwrite)
        except CheckpointError as e:
            refused = e
    if _from_main(refused is not None):  # every process stops, not only the one that looked
        raise refused or CheckpointError(f"{out_dir}: process 0 refused to export there")
    shards = _plan_shards(table, np_dtype.itemsize, max_shard_bytes)
    work = staging.begin(out_dir) if main else None
    with tqdm(total=len(table), desc=f"writing {out_dir.name}", unit="tensor",
              disable=_no_progress()) as bar:
        for file_name, tensors in shards:
            writer = _SafetensorsWriter(work / file_name, tensors, st_dtype) if main else None
            for t in tensors:
                x = flat[t.path]
                host = to_host(x if t.layer is None else _get_layer(x, np.int32(t.layer)))
                if writer is not None:
                    writer.write(t.hf_name, t.to_hf(host).astype(np_dtype, copy=False))
                del host
                bar.update()
            if writer is not None:
                writer.close()

    total = sum(t.size for t in table) * np_dtype.itemsize
    others = ["config.json", "generation_config.json"]
    if main:
        if len(shards) > 1:
            _write_json(work / INDEX_FILE, {
                "metadata": {"total_size": total},
                "weight_map": {t.hf_name: name for name, ts in shards for t in ts}})
            others.insert(0, INDEX_FILE)
        _write_json(work / "config.json", config.to_hf_dict(torch_dtype=dtype))
        if isinstance(generation_config, (str, Path)):
            shutil.copyfile(generation_config, work / "generation_config.json")
        else:
            _write_json(work / "generation_config.json",
                        generation_config or default_generation_config(config))
        if tokenizer_src is not None:
            others += copy_tokenizer_files(tokenizer_src, work)
        staging.commit(work, out_dir)
    distributed.sync("export_hf")
    return ExportSummary(out_dir, tuple(name for name, _ in shards), tuple(others),
                         len(table), total, dtype)
