"""Shared test fixtures: tiny random models (jaxzero and transformers), GRPO batches, paths.

Test files import from here and never from one another.
"""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from safetensors import safe_open

from jaxzero.model.config import Qwen2Config
from jaxzero.rl import grpo
from jaxzero.rl.train_step import TrainBatch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"

# ---------------------------------------------------------------- transformers models

FAKE_TOKENIZER = {"tokenizer.json": '{"fake": "tokenizer"}',
                  "tokenizer_config.json": '{"model_max_length": 64}'}


def make_hf_model(*, tie=False, heads=4, kv_heads=2, hidden=32, head_dim=None, layers=2,
                  vocab=96, intermediate=48, seed=0):
    """A tiny random transformers Qwen2ForCausalLM; norms and biases random too (HF makes
    them 1 and 0, which would hide a mix-up between them)."""
    torch.manual_seed(seed)
    extra = {"head_dim": head_dim} if head_dim else {}
    cfg = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        tie_word_embeddings=tie, bos_token_id=vocab - 2, eos_token_id=vocab - 1, **extra)
    cfg._attn_implementation = "eager"
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def save_hf(model, path, *, dtype=torch.float32, max_shard_size="50GB", tokenizer=True):
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    if tokenizer:
        for name, text in FAKE_TOKENIZER.items():
            (path / name).write_text(text)
    return path


def hf_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of an HF dir (single file or shards), by name."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                assert name not in out
                out[name] = f.get_tensor(name)
    return out


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        # Bytes, not values: bit-exact, NaN- and -0.0-proof.
        assert a[name].tobytes() == b[name].tobytes(), name


# ---------------------------------------------------------------- a tiny jaxzero model, a GRPO batch

TINY = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
R = 6  # response slots of the GRPO batch fixture
LOSS = grpo.LossConfig(entropy_coeff=0.01, use_kl_loss=True, kl_coef=0.1)


def grpo_batch(seed=0, b=8, p=10):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, TINY.vocab_size, (b, p + R)).astype(np.int32)
    valid = np.ones((b, p + R), bool)
    for i in range(b):
        valid[i, : rng.randint(0, 5)] = False          # left padding
        valid[i, p + rng.randint(1, R + 1):] = False    # early stop
    mask = valid[:, p:].astype(np.float32)
    return TrainBatch(jnp.array(tokens), jnp.array(valid), jnp.array(mask),
                      jnp.array(rng.randn(b).astype(np.float32)),
                      jnp.array(-rng.rand(b, R).astype(np.float32) - 4.5),
                      jnp.array(-rng.rand(b, R).astype(np.float32) - 4.5))
