"""A model's identity, resolved in one place: its files, architecture, tokenizer, stop and pad ids.

Every command that names a model (train, generate, eval, convert, plan) goes through here, so
an HF dir, a jaxzero dir (converted or a run), a hub id and the demo are read by one set of
rules: `Qwen2Config.from_hf_dict` for an HF config.json, `Qwen2Config.from_dict` (strict) for
jaxzero's own model_config.json, written only by `write_model_config`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from jaxzero.errors import CheckpointError
from jaxzero.model.config import PRESETS, Qwen2Config, read_json

MODEL_CONFIG = "model_config.json"
TOKENIZER_DIR = "tokenizer"
GENERATION_CONFIG = "generation_config.json"
CHECKPOINTS = "checkpoints"
# In a run directory whose checkpoints are elsewhere (trainer.checkpoint_dir, or a remote
# run directory's mirror): one line, their path or URL.
CHECKPOINTS_AT = "checkpoints.url"
# What a hub download needs: configs, weights, tokenizer; never pickled weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer.model"]
# The demo's tiny model reads and writes the real Qwen2.5 vocabulary.
DEMO_VOCAB, DEMO_BOS, DEMO_EOS = 151936, 151643, (151645,)


# ---------------------------------------------------------------- model_config.json


def is_jaxzero_dir(path: str | Path) -> bool:
    return (Path(path) / MODEL_CONFIG).is_file()


def read_model_config(path: str | Path) -> tuple[Qwen2Config, str]:
    """(architecture, param dtype name) from DIR/model_config.json; unknown keys are errors."""
    file = Path(path) / MODEL_CONFIG
    fields = read_json(file)
    if not isinstance(fields, dict) or "param_dtype" not in fields:
        raise CheckpointError(f"{file}: no param_dtype")
    fields = dict(fields)
    param_dtype = fields.pop("param_dtype")
    return Qwen2Config.from_dict(fields, source=str(file)), param_dtype


def checkpoints_location(path: str | Path):
    """Where the checkpoints of the model or run dir `path` are: DIR/checkpoints, or the
    path or URL its CHECKPOINTS_AT file names (a Path, or an epath.Path for a URL)."""
    from jaxzero.io.storage import storage_path
    pointer = Path(path) / CHECKPOINTS_AT
    if pointer.is_file():
        return storage_path(pointer.read_text().strip())
    return Path(path) / CHECKPOINTS


def write_checkpoints_location(path: str | Path, where) -> None:
    """Records in DIR/CHECKPOINTS_AT where its checkpoints are, when not DIR/checkpoints."""
    pointer = Path(path) / CHECKPOINTS_AT
    if str(where) == str(Path(path).absolute() / CHECKPOINTS):
        pointer.unlink(missing_ok=True)
        return
    tmp = pointer.with_name(pointer.name + ".tmp")
    tmp.write_text(f"{where}\n")
    os.replace(tmp, pointer)


def write_model_config(path: str | Path, config: Qwen2Config, param_dtype: str) -> Path:
    """The one writer of DIR/model_config.json (atomically: a reader never sees half)."""
    file = Path(path) / MODEL_CONFIG
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(dict(config.to_dict(), param_dtype=str(param_dtype)), indent=1)
                   + "\n")
    os.replace(tmp, file)
    return file


# ---------------------------------------------------------------- where the files are


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a jaxzero dir or an HF dir (a hub id resolves to one)."""

    kind: str  # "jaxzero" or "hf"
    path: Path
    config: Qwen2Config
    param_dtype: str | None = None  # as stored, for a jaxzero dir

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR if self.kind == "jaxzero" else self.path

    @property
    def generation_config(self) -> Path | None:
        file = self.path / GENERATION_CONFIG
        return file if file.is_file() else None


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


def _local_source(path: Path) -> ModelSource | None:
    """The source a local directory holds; None when `path` is not a directory."""
    if not path.is_dir():
        return None
    if is_jaxzero_dir(path):
        config, dtype = read_model_config(path)
        return ModelSource("jaxzero", path, config, dtype)
    if (path / "config.json").is_file():
        return ModelSource("hf", path, Qwen2Config.from_hf_dir(path))
    if (path.parent.parent / MODEL_CONFIG).is_file() and path.parent.name == CHECKPOINTS:
        raise CheckpointError(f"{path} is one checkpoint step; pass the model directory "
                              f"{path.parent.parent} (and the step, if not the latest)")
    raise CheckpointError(f"{path}: neither a jaxzero model dir ({MODEL_CONFIG}) nor an HF "
                          "model dir (config.json)")


def _hub_id(text: str, path: Path) -> str:
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"{text}: no such model directory (nor a hub id like "
                              "Qwen/Qwen2.5-3B-Instruct)")
    return text


def _remote_source(url: str) -> ModelSource:
    """A jaxzero dir at a remote URL (a remote run directory or converted model): its small
    files are copied afresh to its local mirror (`storage.local_mirror`), which names the
    remote checkpoints in its CHECKPOINTS_AT; the weights are read from the remote."""
    from jaxzero.io import storage
    storage.check_remote_support(url)
    remote, mirror = storage.storage_path(url), storage.local_mirror(url)
    if not (remote / MODEL_CONFIG).exists():
        raise CheckpointError(f"{url}: no {MODEL_CONFIG} there; a remote model must be a "
                              "jaxzero run or model directory (an HF model: download it)")
    mirror.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_CONFIG, TOKENIZER_DIR, GENERATION_CONFIG, CHECKPOINTS_AT):
        storage.replace_from(remote / name, mirror / name)  # a mirror may be another run's
    if not (remote / CHECKPOINTS_AT).exists():
        write_checkpoints_location(mirror, remote / CHECKPOINTS)
    return _local_source(mirror)


def resolve_source(path_or_hub_id: str | Path) -> ModelSource:
    """Finds the model: a jaxzero dir (local, or remote: gs://, s3://, az://), an HF dir
    (config.json), or a hub id such as Qwen/Qwen2.5-3B-Instruct (from the HF cache, or
    downloaded when online)."""
    from jaxzero.io.storage import is_remote
    if is_remote(path_or_hub_id):
        return _remote_source(str(path_or_hub_id))
    path = Path(path_or_hub_id).expanduser()
    source = _local_source(path)
    if source is not None:
        return source
    local = _download(_hub_id(str(path_or_hub_id), path))
    return ModelSource("hf", local, Qwen2Config.from_hf_dir(local))


def architecture(path_or_hub_id: str | Path) -> Qwen2Config:
    """The architecture of an HF dir, a jaxzero dir, or a Qwen2.5 hub id, without loading or
    downloading weights: a hub id reads its cached config.json, or else its preset, so that
    `jaxzero plan` works before the weights are fetched."""
    path = Path(path_or_hub_id).expanduser()
    source = _local_source(path)
    if source is not None:
        return source.config
    repo_id = _hub_id(str(path_or_hub_id), path)
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id for the cache: no cached copy
        cached = None
    if isinstance(cached, str):
        return Qwen2Config.from_hf_dir(Path(cached).parent)
    name = repo_id.lower().split("/")[-1]
    for key, cfg in PRESETS.items():
        if name.startswith(key + "-") or name == key:
            return cfg
    raise CheckpointError(
        f"{path_or_hub_id}: not an HF model dir (no config.json), not a jaxzero dir (no "
        f"{MODEL_CONFIG}), not in the HF cache, and not a known Qwen2.5 hub id "
        f"({', '.join(PRESETS)})")


def demo_architecture(model) -> Qwen2Config:
    """The demo's tiny Qwen2 model over the real Qwen2.5 vocabulary, from the `model` section."""
    return Qwen2Config(vocab_size=DEMO_VOCAB, hidden_size=model.demo_hidden,
                       intermediate_size=model.demo_intermediate,
                       num_hidden_layers=model.demo_layers, num_attention_heads=model.demo_heads,
                       num_key_value_heads=model.demo_kv_heads, rope_theta=1_000_000.0,
                       tie_word_embeddings=True, max_position_embeddings=4096,
                       bos_token_id=DEMO_BOS, eos_token_id=DEMO_EOS)


def run_architecture(model) -> Qwen2Config:
    """The architecture a run's `model` config section names (no weights are read)."""
    return demo_architecture(model) if model.demo else architecture(model.path)


# ---------------------------------------------------------------- stop and pad ids


def generation_eos_ids(file: Path | None) -> tuple[int, ...]:
    """The eos ids of a generation_config.json (none when there is no file)."""
    if file is None:
        return ()
    gen = read_json(file)
    if not isinstance(gen, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    value = gen.get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CheckpointError(f"{file}: eos_token_id is {value!r}; expected token ids")
    return tuple(ids)


def stop_ids(config: Qwen2Config, tokenizer, generation_config: Path | None) -> tuple[int, ...]:
    """Ids that end a generation: the union of config.json's eos ids, generation_config.json's
    and the tokenizer's (its eos, <|im_end|>, <|endoftext|>), sorted; each must be in the
    vocabulary."""
    from jaxzero.io.tokenizer import stop_token_ids
    ids = sorted(set(config.eos_token_id) | set(generation_eos_ids(generation_config))
                 | set(stop_token_ids(tokenizer)))
    outside = [i for i in ids if i >= config.vocab_size]
    if outside:
        raise CheckpointError(f"stop ids {outside} are outside the vocabulary "
                              f"(vocab_size={config.vocab_size})")
    return tuple(ids)


def pad_id(tokenizer, stops: tuple[int, ...]) -> int:
    """The id prompts are left-padded with: the tokenizer's pad token, else its eos, else the
    first stop id. Padded slots are masked, so any id works; this only has to be one rule."""
    for i in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if i is not None:
            return int(i)
    return stops[0]


# ---------------------------------------------------------------- the whole identity


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """Everything that names one model: its source (None for the demo), architecture,
    tokenizer and the ids generation stops on and pads with."""

    source: ModelSource | None
    config: Qwen2Config
    tokenizer: Any = dataclasses.field(compare=False, repr=False)
    tokenizer_dir: Path = dataclasses.field(compare=False)
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def encode(self, texts: list[str], *, chat: bool) -> list[list[int]]:
        from jaxzero.io.tokenizer import encode_prompts
        return encode_prompts(self.tokenizer, texts, chat=chat)


def _identity(source: ModelSource | None, config: Qwen2Config, tokenizer_src,
              generation_config: Path | None) -> ModelIdentity:
    from jaxzero.io.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(tokenizer_src)
    stops = stop_ids(config, tokenizer, generation_config)
    return ModelIdentity(source, config, tokenizer, Path(str(tokenizer_src)), stops,
                         pad_id(tokenizer, stops))


def identify(path_or_hub_id: str | Path, *, tokenizer: str | Path | None = None
             ) -> ModelIdentity:
    """The identity of a model dir or hub id; `tokenizer` overrides where its tokenizer is."""
    source = resolve_source(path_or_hub_id)
    return _identity(source, source.config, tokenizer or source.tokenizer_dir,
                     source.generation_config)


def identify_run_model(model) -> ModelIdentity:
    """The identity a run's `model` config section names: the demo (its built tokenizer) or
    model.path, with model.tokenizer overriding the directory's own tokenizer."""
    if model.demo:
        from jaxzero.io.tokenizer import demo_tokenizer_dir
        return _identity(None, demo_architecture(model), demo_tokenizer_dir(), None)
    return identify(model.path, tokenizer=model.tokenizer)
