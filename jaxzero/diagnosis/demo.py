"""The built-in demo's devices: a tiny Qwen2 model made on the fly, its data split, and a
supervised warm-up that stands in for pretraining.

A random tiny model can neither write `<answer>` nor read a case, so before GRPO a short
supervised warm-up teaches it both, on the training cases of every disease:
- the *familiar* diseases' cases get their own diagnosis, so the model learns to read a
  case's findings, as a pretrained model already can;
- every other disease's cases get a name drawn at random from the unfamiliar ones, so the
  model learns the format and those names, but never which case has which.

GRPO then trains and is evaluated on the unfamiliar diseases only (`demo_splits`): their
held-out accuracy starts at chance, and whatever it gains is the reward's doing. Real runs
(the shipped Qwen2.5 configs) have no warm-up.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxzero.diagnosis.rarearena import read_prepared, write_prepared
from jaxzero.errors import ConfigError
from jaxzero.io import identity
from jaxzero.parallel.sharding import batch_sharding
from jaxzero.rl.train_step import completion_logprobs

WARMUP_THINK = "The findings point to one rare disease."
SPLITS = ("train", "test", "warmup")


def warmup_target(diagnosis: str) -> str:
    return f"<think>\n{WARMUP_THINK}\n</think>\n<answer> {diagnosis} </answer>"


def disease(record: dict) -> str:
    """A prepared record's disease: its Orphanet name (the last label)."""
    return record["labels"][-1]


def check_familiar(familiar: Sequence[str], diseases: Sequence[str]) -> None:
    """Every familiar disease is one of the cases', and at least two are left for GRPO."""
    for name in familiar:
        if name not in diseases:
            close = difflib.get_close_matches(name, diseases, n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"demo.familiar_diseases: {name!r} is not one of the demo's "
                              f"diseases ({', '.join(diseases)}){hint}")
    if len(set(diseases) - set(familiar)) < 2:
        raise ConfigError(f"demo.familiar_diseases names {len(familiar)} of the "
                          f"{len(diseases)} diseases: leave at least two for GRPO to learn")


def demo_splits(prepared_dir: Path, out_dir: Path, familiar: Sequence[str]) -> dict[str, int]:
    """From a prepared train/test split of the demo cases, writes out_dir/train.jsonl and
    test.jsonl (the unfamiliar diseases' cases: what GRPO trains on and is evaluated on) and
    warmup.jsonl (every training case, familiar or not); returns the count of each."""
    train, test = (read_prepared(prepared_dir / f"{name}.jsonl") for name in ("train", "test"))
    check_familiar(familiar, sorted({disease(r) for r in train + test}))
    splits = {"train": [r for r in train if disease(r) not in familiar],
              "test": [r for r in test if disease(r) not in familiar],
              "warmup": train}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        write_prepared(records, out_dir / f"{name}.jsonl")
    return {name: len(records) for name, records in splits.items()}


def warmup_answers(own: list[str], familiar: Sequence[str], unfamiliar: Sequence[str],
                   rng: np.random.Generator) -> list[str]:
    """The warm-up's answer for each case of diagnosis `own[i]`: its own when familiar, else
    one of `unfamiliar` drawn uniformly, whatever the case."""
    return [o if o in familiar else unfamiliar[rng.integers(len(unfamiliar))] for o in own]


def warmup_batch(prompt_ids: list[list[int]], target_ids: list[list[int]], prompt_len: int,
                 response_len: int, pad_id: int):
    """Left-padded prompts followed by right-padded targets: tokens, valid and target mask."""
    b = len(prompt_ids)
    tokens = np.full((b, prompt_len + response_len), pad_id, np.int32)
    valid = np.zeros(tokens.shape, bool)
    for i, (p, t) in enumerate(zip(prompt_ids, target_ids)):
        p, t = p[-prompt_len:], t[:response_len]
        tokens[i, prompt_len - len(p): prompt_len] = p
        valid[i, prompt_len - len(p): prompt_len] = True
        tokens[i, prompt_len: prompt_len + len(t)] = t
        valid[i, prompt_len: prompt_len + len(t)] = True
    return tokens, valid, valid[:, prompt_len:].astype(np.float32)


def run_warmup(graphdef, params, mesh, *, records, tokenizer, familiar: Sequence[str],
               steps: int, lr: float, batch_size: int, prompt_len: int, response_len: int,
               logit_chunk: int = 128, seed: int, log=print):
    """The supervised warm-up (a demo device) on `records` (every training case): returns the
    new params and the final loss."""
    if steps <= 0:
        return params, float("nan")
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(params)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = identity.pad_id(tokenizer, (eos,))
    rng = np.random.default_rng(seed)
    unfamiliar = sorted({disease(r) for r in records} - set(familiar))

    def loss_fn(p, tokens, valid, mask):
        logp, _ = completion_logprobs(nnx.merge(graphdef, p), tokens, valid, response_len,
                                      chunk=logit_chunk)
        return -(logp * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    # The params keep the shardings they came with (the trainer's), whatever XLA would pick.
    param_shardings = jax.tree.map(lambda x: x.sharding, params)

    @jax.jit(out_shardings=(param_shardings, None, None))
    def sft_step(p, o, tokens, valid, mask):
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens, valid, mask)
        updates, o = optimizer.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    rows = batch_sharding(mesh, 2)
    loss = jnp.nan
    for step in range(steps):
        picks = rng.choice(len(records), batch_size, replace=len(records) < batch_size)
        prompts = [records[i]["prompt_token_ids"] for i in picks]
        answers = warmup_answers([disease(records[i]) for i in picks], familiar, unfamiliar,
                                 rng)
        targets = [tokenizer.encode(warmup_target(a), add_special_tokens=False) + [eos]
                   for a in answers]
        tokens, valid, mask = warmup_batch(prompts, targets, prompt_len, response_len, pad)
        params, opt_state, loss = sft_step(params, opt_state, jax.device_put(tokens, rows),
                                           jax.device_put(valid, rows), jax.device_put(mask, rows))
        if step % 10 == 0 or step == steps - 1:
            log(f"demo warm-up {step + 1}/{steps}: loss {float(loss):.3f}")
    return params, float(loss)
