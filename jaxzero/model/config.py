"""Qwen2 architecture config: the one rule for an HF `config.json`'s keys, the export, presets."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from jaxzero.errors import CheckpointError
from jaxzero.model.rope import yarn_attention_factor

log = logging.getLogger(__name__)

# Keys that describe the file or the saving library, not the computation.
_METADATA_KEYS = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "output_hidden_states", "output_attentions", "return_dict",
    "torchscript", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder",
    "id2label", "label2id", "problem_type", "finetuning_task", "task_specific_params",
    "prefix", "tokenizer_class", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "tf_legacy_loss", "use_bfloat16", "pruned_heads",
})
# Generation defaults that older savers put into config.json; generation_config.json and
# the sampler's own settings are what jaxzero uses.
_GENERATION_KEYS = frozenset({
    "max_length", "min_length", "max_new_tokens", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
})
# Keys transformers' Qwen2 reads that jaxzero supports only with one value (or, for the
# sliding-window numbers, only while sliding windows are off; the rotary keys with the rope
# types of `_read_rope`; auto_map, ignored, only for a Qwen2ForCausalLM).
_SWITCHES = frozenset({
    "model_type", "hidden_act", "use_sliding_window", "sliding_window", "max_window_layers",
    "layer_types", "use_mrope", "rope_scaling", "rope_parameters", "attention_dropout",
    "quantization_config", "auto_map",
})
ROPE_TYPES = ("default", "yarn")  # what rope_scaling / rope_parameters may name
# transformers' keys of a "yarn" rope dict (besides rope_type/type, and rope_theta in
# rope_parameters).
_YARN_KEYS = frozenset({"factor", "original_max_position_embeddings", "attention_factor",
                        "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"})


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """transformers' static YaRN rotary scaling (rope_type "yarn"), its defaults resolved."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0  # multiplies cos and sin

    def to_hf_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), rope_type="yarn")


def _token_ids(value, key: str, source: str) -> tuple[int, ...]:
    """An HF token-id field (an int, a list of ints or null) as a tuple."""
    ids = [] if value is None else value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise CheckpointError(f"{source}: {key} is {value!r}; expected a token id, a list of "
                              "them or null")
    return tuple(ids)


def _refuse(source: str, key: str, value, why: str) -> CheckpointError:
    return CheckpointError(f"{source}: {key}={json.dumps(value)} is not supported: {why}")


def _check_switches(hf: dict[str, Any], source: str) -> None:
    """Refuses any value that would change the computation (the rotary keys: `_read_rope`)."""
    if hf.get("model_type") != "qwen2":
        raise CheckpointError(
            f"{source}: model_type is {hf.get('model_type')!r}; jaxzero supports only 'qwen2' "
            "(Qwen2 / Qwen2.5 causal LMs)")
    archs = hf.get("architectures")
    if archs is not None and archs != ["Qwen2ForCausalLM"]:
        raise _refuse(source, "architectures", archs, "jaxzero reads Qwen2ForCausalLM "
                      "checkpoints (a language-model head), nothing else")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(source, "hidden_act", hf["hidden_act"], "Qwen2 uses 'silu'")
    if hf.get("use_sliding_window"):
        raise _refuse(source, "use_sliding_window", hf["use_sliding_window"],
                      f"jaxzero implements full attention only (sliding_window="
                      f"{hf.get('sliding_window')})")
    layer_types = hf.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise _refuse(source, "layer_types", layer_types, "jaxzero implements "
                      "full_attention layers only")
    if hf.get("use_mrope"):
        raise _refuse(source, "use_mrope", hf["use_mrope"], "multimodal rotary embeddings "
                      "are Qwen2-VL's; jaxzero implements text-only Qwen2")
    if hf.get("attention_dropout") not in (None, 0, 0.0):
        raise _refuse(source, "attention_dropout", hf["attention_dropout"],
                      "jaxzero trains without dropout")
    if "quantization_config" in hf:
        raise _refuse(source, "quantization_config", hf["quantization_config"],
                      "jaxzero reads unquantised float weights only")
    if "auto_map" in hf:
        # Custom modelling code for transformers' trust_remote_code: jaxzero runs its own
        # Qwen2 and never imports it, which is only the same model for a Qwen2ForCausalLM.
        if archs != ["Qwen2ForCausalLM"]:
            raise _refuse(source, "auto_map", hf["auto_map"], "custom modelling code is "
                          'ignored only in a config with architectures ["Qwen2ForCausalLM"]; '
                          f"this one has {json.dumps(archs)}")
        log.warning("%s: ignoring auto_map %s (custom modelling code): jaxzero runs its own "
                    "Qwen2ForCausalLM", source, json.dumps(hf["auto_map"]))


def _number(rope: dict, key: str, what: str, source: str, *, minimum: float = 0.0,
            integer: bool = False) -> float | int | None:
    """rope[key] checked to be a number >= minimum (an int if `integer`), or None if absent."""
    value = rope.get(key)
    kinds = (int,) if integer else (int, float)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
        raise CheckpointError(f"{source}: {what}.{key}={json.dumps(value)} is not supported: "
                              f"expected {'an integer' if integer else 'a number'} >= {minimum}")
    return value


def _read_yarn(rope: dict, what: str, hf: dict[str, Any], source: str) -> YarnScaling:
    """A yarn rope dict as transformers' `_compute_yarn_parameters` reads it (its defaults:
    beta_fast 32, beta_slow 1 for a missing or zero value, truncate true, the original length
    max_position_embeddings, the attention factor from factor, mscale and mscale_all_dim)."""
    if rope.get("factor") is None:
        raise CheckpointError(f"{source}: {what}={json.dumps(rope)} has no factor; yarn needs "
                              "one (the context length's multiple, e.g. 4.0)")
    factor = _number(rope, "factor", what, source, minimum=1.0)
    original = _number(rope, "original_max_position_embeddings", what, source, minimum=1,
                       integer=True) or int(hf.get("max_position_embeddings", 32768))
    truncate = rope.get("truncate", True)
    if not isinstance(truncate, bool):
        raise CheckpointError(f"{source}: {what}.truncate={json.dumps(truncate)} is not "
                              "supported: expected true or false")
    attention = _number(rope, "attention_factor", what, source)
    if attention is None:
        attention = yarn_attention_factor(factor, _number(rope, "mscale", what, source),
                                          _number(rope, "mscale_all_dim", what, source))
    return YarnScaling(factor=float(factor), original_max_position_embeddings=original,
                       beta_fast=float(_number(rope, "beta_fast", what, source) or 32),
                       beta_slow=float(_number(rope, "beta_slow", what, source) or 1),
                       truncate=truncate, attention_factor=float(attention))


def _read_rope(hf: dict[str, Any], source: str) -> tuple[float, YarnScaling | None]:
    """The rotary embedding of an HF config: rope_theta and YaRN scaling, if any, from
    `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5); `type` and
    `rope_type` both name the kind. Any kind but default and yarn is refused."""
    found = {}
    for key, extra in (("rope_scaling", set()), ("rope_parameters", {"rope_theta"})):
        rope = hf.get(key)
        if rope is None or rope == {}:
            continue
        if not isinstance(rope, dict):
            raise _refuse(source, key, rope, "expected an object (or null)")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if "type" in rope and "rope_type" in rope and rope["type"] != rope["rope_type"]:
            raise _refuse(source, key, rope, "type and rope_type disagree; keep one")
        if kind not in ROPE_TYPES:
            raise _refuse(source, key, rope, f"jaxzero implements rope types "
                          f"{', '.join(ROPE_TYPES)}, not {kind!r}")
        allowed = {"type", "rope_type"} | extra | (_YARN_KEYS if kind == "yarn" else set())
        if set(rope) - allowed:
            raise _refuse(source, key, rope, f"unknown {kind} rope keys "
                          f"{sorted(set(rope) - allowed)}; jaxzero reads {sorted(allowed)}")
        found[key] = (kind, rope)
    if len(found) == 2 and any(kind != "default" for kind, _ in found.values()):
        raise CheckpointError(f"{source}: both rope_scaling and rope_parameters are set and one "
                              "scales; keep one of them (transformers 5 would ignore the "
                              "other)")
    theta = hf.get("rope_theta", 10000.0)
    yarn = None
    for key, (kind, rope) in found.items():
        theta = rope.get("rope_theta", theta)
        if kind == "yarn":
            yarn = _read_yarn(rope, key, hf, source)
    return theta, yarn


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """The architecture numbers of a Qwen2/Qwen2.5 causal LM (HF field names).

    Hashable, so it can be part of a static jit argument: `eos_token_id` is always a tuple.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads, as HF Qwen2 does
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: tuple[int, ...] = (151645,)
    yarn: YarnScaling | None = None  # None: default rotary embeddings

    def __post_init__(self):
        object.__setattr__(self, "eos_token_id",
                           _token_ids(self.eos_token_id, "eos_token_id", "Qwen2Config"))
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (Q in the shape vocabulary)."""
        return self.num_attention_heads // self.num_key_value_heads

    def num_params(self) -> int:
        """Parameter count, embeddings included (lm_head counted once when tied)."""
        d, f, n, k, h = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                         self.num_key_value_heads, self.head_dim)
        attn = d * n * h + n * h + 2 * (d * k * h + k * h) + n * h * d
        block = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * block + embed + d

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json") -> "Qwen2Config":
        """The one rule for an HF config.json: keys beginning with `_`, metadata and
        generation defaults are ignored; the architecture numbers are read; a key that would
        change the computation, or one jaxzero does not know, is refused, naming it."""
        if not isinstance(hf, dict):
            raise CheckpointError(f"{source}: expected a JSON object, found "
                                  f"{type(hf).__name__}")
        _check_switches(hf, source)
        rope_theta, yarn = _read_rope(hf, source)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in hf if not k.startswith("_") and k not in fields
                         and k not in _METADATA_KEYS | _GENERATION_KEYS | _SWITCHES)
        if unknown:
            raise CheckpointError(
                f"{source}: unknown Qwen2 config keys "
                + ", ".join(f"{k}={json.dumps(hf[k])}" for k in unknown)
                + "; jaxzero cannot tell whether they change the computation, so it refuses "
                "them (delete them from the file if they are only notes)")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in hf]
        if missing:
            raise CheckpointError(f"{source}: missing {', '.join(missing)}")
        try:
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=int(hf["num_attention_heads"]),
                num_key_value_heads=int(hf.get("num_key_value_heads")
                                        or hf["num_attention_heads"]),
                head_dim=int(hf.get("head_dim") or 0),
                max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
                rope_theta=float(rope_theta),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=_token_ids(hf.get("eos_token_id"), "eos_token_id", source),
                yarn=yarn,
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: {e}") from e
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from e

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Qwen2Config":
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path}: no config.json; expected an HF model directory")
        return cls.from_hf_dict(read_json(config_path), source=str(config_path))

    def to_hf_dict(self, *, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """An HF config.json for Qwen2ForCausalLM."""
        eos = list(self.eos_token_id)
        out = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
            "torch_dtype": torch_dtype,
            "use_cache": True,
        }
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            out["head_dim"] = self.head_dim
        if self.yarn is not None:  # the transformers-4 key, which transformers 5 reads too
            out["rope_scaling"] = self.yarn.to_hf_dict()
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-native fields (lists, not tuples), as model_config.json and checkpoint metas
        store them."""
        return dict(dataclasses.asdict(self), eos_token_id=list(self.eos_token_id))

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "model config") -> "Qwen2Config":
        """The inverse of to_dict; an unknown or missing field is an error naming `source`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"{source}: unknown fields {unknown}")
        try:
            if d.get("yarn") is not None:
                d = dict(d, yarn=YarnScaling(**d["yarn"]))
            return cls(**d)
        except TypeError as e:
            raise CheckpointError(f"{source}: {e}") from e


def read_json(path: Path) -> Any:
    """A JSON file's content; a missing, unreadable or malformed file is one error naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column "
                              f"{e.colno})") from e


# Public Qwen2.5-Instruct architecture numbers (their HF config.json files).
PRESETS: dict[str, Qwen2Config] = {
    "qwen2.5-0.5b": Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_hidden_layers=24, num_attention_heads=14,
                                num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                num_hidden_layers=28, num_attention_heads=12,
                                num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-3b": Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                              num_hidden_layers=36, num_attention_heads=16,
                              num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                              num_hidden_layers=28, num_attention_heads=28,
                              num_key_value_heads=4, tie_word_embeddings=False),
}


def preset(name: str) -> Qwen2Config:
    key = name.lower()
    if key not in PRESETS:
        raise CheckpointError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[key]
