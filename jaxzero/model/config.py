"""Qwen2 architecture config: read from an HF `config.json`, written back on export, plus presets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxzero.errors import CheckpointError

# Fields of an HF Qwen2 config.json that carry no architecture (bookkeeping, generation
# defaults, training-only switches that are off); everything else must be understood.
_IGNORED_HF_KEYS = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "_name_or_path", "pad_token_id", "bos_token_id", "eos_token_id", "max_window_layers",
    "sliding_window", "layer_types", "attention_dropout", "use_mrope", "tokenizer_class",
})


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """The architecture numbers of a Qwen2/Qwen2.5 causal LM (HF field names)."""

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
    eos_token_id: int | list[int] | None = 151645

    def __post_init__(self):
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
        """Query heads per KV head (G in the shape vocabulary)."""
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
        """Validates an HF config dict; refuses other architectures and unsupported features."""
        model_type = hf.get("model_type")
        if model_type != "qwen2":
            raise CheckpointError(
                f"{source}: model_type is {model_type!r}; jaxzero supports only 'qwen2' "
                "(Qwen2 / Qwen2.5 causal LMs)")
        if hf.get("use_sliding_window"):
            raise CheckpointError(
                f"{source}: use_sliding_window is true (sliding_window={hf.get('sliding_window')}); "
                "jaxzero implements full attention only")
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act is {hf['hidden_act']!r}; Qwen2 uses 'silu'")
        rope = hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = hf.get("rope_scaling")
        if rope_type != "default" or scaling:
            raise CheckpointError(
                f"{source}: rope scaling {scaling or rope} is not supported; "
                "jaxzero implements default rotary embeddings")
        if hf.get("attention_dropout", 0.0):
            raise CheckpointError(
                f"{source}: attention_dropout={hf['attention_dropout']}; jaxzero trains without dropout")
        known = {f.name for f in dataclasses.fields(cls)} | {"model_type", "hidden_act",
                                                             "rope_parameters", "rope_scaling",
                                                             "use_sliding_window"}
        unknown = sorted(set(hf) - known - _IGNORED_HF_KEYS)
        if unknown:
            raise CheckpointError(f"{source}: unsupported Qwen2 config fields {unknown}")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            head_dim=hf.get("head_dim") or 0,
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            rope_theta=float(theta),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Qwen2Config":
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path}: no config.json; expected an HF model directory")
        return cls.from_hf_dict(json.loads(config_path.read_text()), source=str(config_path))

    def to_hf_dict(self, *, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """An HF config.json for Qwen2ForCausalLM."""
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
            "eos_token_id": self.eos_token_id,
            "torch_dtype": torch_dtype,
            "use_cache": True,
        }
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            out["head_dim"] = self.head_dim
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Qwen2Config":
        return cls(**d)


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


def resolve_model_config(path_or_id: str) -> Qwen2Config:
    """The architecture of an HF dir, a jaxzero dir, or a Qwen2.5 hub id (by its preset).

    Reading a hub id's preset needs no download, so `jaxzero plan` works before the weights
    are fetched.
    """
    path = Path(path_or_id)
    if (path / "model_config.json").is_file():
        fields = json.loads((path / "model_config.json").read_text())
        known = {f.name for f in dataclasses.fields(Qwen2Config)}
        return Qwen2Config.from_dict({k: v for k, v in fields.items() if k in known})
    if (path / "config.json").is_file():
        return Qwen2Config.from_hf_dir(path)
    name = str(path_or_id).lower().split("/")[-1]
    for key, cfg in PRESETS.items():
        if name.startswith(key + "-") or name == key:
            return cfg
    raise CheckpointError(
        f"{path_or_id}: not an HF model dir (no config.json), not a jaxzero dir (no "
        f"model_config.json), and not a known Qwen2.5 hub id ({', '.join(PRESETS)})")
