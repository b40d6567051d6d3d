"""The built-in demo's devices: a tiny Qwen2 model made on the fly and a format warm-up.

A random tiny model never writes `<answer>` by chance, so the demo first teaches it the
output format by a short supervised warm-up. Its answers are the case's own Orphanet name
only `correct_fraction` of the time and a random one of the demo's diagnoses otherwise; the
demo config sets the fraction to 0, so the warm-up teaches the format and the set of names but
nothing about which case has which, and whatever accuracy the policy gains during GRPO is the
reward's doing. Real runs (the shipped Qwen2.5 configs) have no warm-up.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxzero.io import identity
from jaxzero.parallel.sharding import batch_sharding
from jaxzero.rl.train_step import completion_logprobs

WARMUP_THINK = "The findings point to one rare disease."


def warmup_target(diagnosis: str) -> str:
    return f"<think>\n{WARMUP_THINK}\n</think>\n<answer> {diagnosis} </answer>"


def warmup_answers(own: list[str], diagnoses: list[str], correct_fraction: float,
                   rng: np.random.Generator) -> list[str]:
    """The warm-up's answer for each case: its own diagnosis `own[i]` with probability
    `correct_fraction`, else one of `diagnoses` drawn uniformly, whatever the case."""
    return [o if rng.random() < correct_fraction else diagnoses[rng.integers(len(diagnoses))]
            for o in own]


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


def run_format_warmup(graphdef, params, mesh, *, records, tokenizer, diagnoses: list[str],
                      steps: int, lr: float, batch_size: int, correct_fraction: float,
                      prompt_len: int, response_len: int, logit_chunk: int = 128, seed: int,
                      log=print):
    """Supervised format warm-up (a demo device): returns the new params and the final loss."""
    if steps <= 0:
        return params, float("nan")
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(params)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = identity.pad_id(tokenizer, (eos,))
    rng = np.random.default_rng(seed)

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
        answers = warmup_answers([records[i]["labels"][-1] for i in picks], diagnoses,
                                 correct_fraction, rng)
        targets = [tokenizer.encode(warmup_target(a), add_special_tokens=False) + [eos]
                   for a in answers]
        tokens, valid, mask = warmup_batch(prompts, targets, prompt_len, response_len, pad)
        params, opt_state, loss = sft_step(params, opt_state, jax.device_put(tokens, rows),
                                           jax.device_put(valid, rows), jax.device_put(mask, rows))
        if step % 10 == 0 or step == steps - 1:
            log(f"demo format warm-up {step + 1}/{steps}: loss {float(loss):.3f}")
    return params, float(loss)
