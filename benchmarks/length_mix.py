"""Response lengths that vary as a reasoning model's do, and the FLOPs their padding costs.

A random model never chooses to stop, so the benchmarks make it stop:

- `grpo_step.py --length-mix LOW`: each rollout's response length is drawn log-uniform on
  [LOW, --new-tokens] (numpy seed = the step index) and its stop is forced there after
  sampling: the tokens after it become padding and the rollout counts as stopped. Sampling
  itself still runs --new-tokens steps, as a real batch does whenever its longest response
  reaches the limit. With --new-tokens 1024 and LOW 50 that is 50-1,024 tokens, mean ~323.
- `rollout.py --mean-length N`: a stop set of V/N token ids, which the sampler honours; the
  random model's next-token distribution is nearly uniform, so each step stops a row with
  probability ~1/N: lengths are geometric with mean ~N, cut at --new-tokens (measured and
  printed).
"""

from __future__ import annotations

import numpy as np


def draw_lengths(seed: int, count: int, low: int, high: int) -> np.ndarray:
    """`count` integer lengths, log-uniform on [low, high]."""
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= low <= high, got {low}, {high}")
    rng = np.random.default_rng(seed)
    return np.round(np.exp(rng.uniform(np.log(low), np.log(high), count))).astype(np.int64)


def force_stops(host, lengths_B: np.ndarray, pad_id: int):
    """A host SampleOutput with row b cut to lengths_B[b] tokens (its last one the stop)."""
    keep_BR = np.arange(host.tokens.shape[1])[None] < lengths_B[:, None]
    keep_BR &= np.asarray(host.mask, bool)
    return host._replace(tokens=np.where(keep_BR, host.tokens, pad_id), mask=keep_BR,
                         logprobs=np.where(keep_BR, host.logprobs, 0.0),
                         lengths=keep_BR.sum(-1).astype(host.lengths.dtype),
                         stopped=np.ones_like(host.stopped))


def stop_set(vocab: int, mean_length: int, avoid: int) -> tuple[int, ...]:
    """Every (vocab / mean_length)-th token id (not `avoid`, the pad): a stop set that a
    near-uniform sampler hits with probability ~1/mean_length per step."""
    step = max(1, mean_length)
    return tuple(i for i in range(step // 2, vocab, step) if i != avoid)


def sequence_flops(cfg, seq: int, scored: int, attended: float | None = None) -> float:
    """Model FLOPs of a forward pass over one row of `seq` tokens with logits at `scored`
    positions: the dense matmuls, attention over `attended` query-key pairs (default all
    seq x seq, the PaLM convention), the lm_head. The embedding gather, norms and softmax are
    not counted."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    n, k, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_token = 2 * cfg.num_hidden_layers * (d * n * h + 2 * d * k * h + n * h * d + 3 * d * f)
    pairs = seq * seq if attended is None else attended
    return seq * per_token + 4 * cfg.num_hidden_layers * n * h * pairs + \
        scored * 2 * d * cfg.vocab_size


def computed_pairs(width: int) -> int:
    """Query-key pairs the einsum attention forms over a row of `width` slots: each query
    block against the keys up to its end (`jaxzero.model.attention.query_blocks`)."""
    from jaxzero.model.attention import query_blocks
    return sum((end - start) * end for start, end in query_blocks(width))


def useful_flops(cfg, prompt_len_B, response_len_B) -> float:
    """What a pass needs: each rollout alone, each of its tokens attending to itself and the
    tokens before it (s(s+1)/2 pairs), logits at its response tokens only."""
    return float(sum(sequence_flops(cfg, int(p + r), int(r), (p + r) * (p + r + 1) / 2)
                     for p, r in zip(prompt_len_B, response_len_B)))


def padded_flops(cfg, rows: int, width: int, response_slots: int) -> float:
    """The padded batch's pass: every row prompt bucket + max_new_tokens wide, all scored."""
    return rows * sequence_flops(cfg, width, response_slots, computed_pairs(width))


def layout_flops(cfg, lay, live_M, chunk: int) -> float:
    """A pass over `jaxzero.rl.layout` rows: every row of the micro-batches in use at full
    width (attention as `computed_pairs`), logits for the live chunks of scored slots."""
    flops = 0.0
    for live in np.asarray(live_M):
        if live:
            scored = -(-int(live) // chunk) * chunk
            flops += lay.rows * sequence_flops(cfg, lay.width, min(scored, lay.slots),
                                               computed_pairs(lay.width))
    return flops
