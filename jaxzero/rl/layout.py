"""Rollouts laid out in rows for the train step, without the padded batch's waste (host numpy).

The sampler's batch is [B, P + R]: every prompt left-padded to its bucket P, every response
right-padded to R = max_new_tokens. Here each rollout becomes one segment (its real prompt
tokens, then its real response tokens) at the start of a row, and either

- `trimmed`: one rollout per row, rows as wide as the batch's longest rollout rounded up to a
  multiple of `width_multiple` (few widths, so few compiles), in `micro_batches` micro-batches;
- `packed`: whole rollouts packed into rows of at most `width` tokens (a token budget), one
  row per data-parallel shard per micro-batch, and as many micro-batches as the tokens need,
  up to a fixed count (empty ones are skipped on the device); the rows then narrowed to a
  multiple of `width_multiple` that still holds them, so few widths compile.

Every scored slot (a response token) carries its rollout's advantage and its loss weights
(`grpo.token_weights`, from the whole padded batch), so the loss, its gradient and the metrics
are those of the padded batch up to float32 summation order. Shapes: B rollouts, P prompt
slots, R response slots; M micro-batches, K rows per micro-batch, W tokens and N slots a row.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxzero.rl import grpo
from jaxzero.rl.train_step import RowLoss, Rows


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each rollout of a padded batch goes: a row (m·K + k over the M micro-batches of
    K rows), its first token's position in the row and its first scored slot."""

    micro_batches: int     # M
    rows: int              # K rows per micro-batch
    width: int             # W tokens per row
    slots: int             # N scored slots per row
    prompt_slots: int      # P of the padded batch
    row_B: np.ndarray      # int64
    offset_B: np.ndarray   # int64, the segment's first position in its row
    slot_B: np.ndarray     # int64, the segment's first scored slot in its row
    prompt_len_B: np.ndarray    # int64, real prompt tokens
    response_len_B: np.ndarray  # int64, real response tokens (each one a scored slot)

    @property
    def padding_fraction(self) -> float:
        """The share of the laid-out token positions that hold no token (empty micro-batches,
        which the device skips, left out)."""
        used = np.unique(self.row_B // self.rows).size * self.rows * self.width
        return 1.0 - float((self.prompt_len_B + self.response_len_B).sum()) / used

    def _slots(self):
        """(row, slot, rollout, response index) of every scored slot."""
        b_S = np.repeat(np.arange(self.row_B.size), self.response_len_B)
        r_S = np.arange(b_S.size) - np.repeat(np.cumsum(self.response_len_B)
                                               - self.response_len_B, self.response_len_B)
        return self.row_B[b_S], self.slot_B[b_S] + r_S, b_S, r_S

    def scatter(self, x_BR: np.ndarray, fill=0) -> np.ndarray:
        """Per-response-token values [B, R] -> the scored slots [M, K, N]."""
        row, slot, b, r = self._slots()
        out = np.full((self.micro_batches * self.rows, self.slots), fill, x_BR.dtype)
        out[row, slot] = x_BR[b, r]
        return out.reshape(self.micro_batches, self.rows, self.slots)

    def gather(self, x_MKN: np.ndarray, response_slots: int, fill=0) -> np.ndarray:
        """The scored slots [M, K, N] -> [B, R] (`fill` where a rollout has no token)."""
        row, slot, b, r = self._slots()
        out = np.full((self.row_B.size, response_slots), fill, x_MKN.dtype)
        out[b, r] = np.asarray(x_MKN).reshape(-1, self.slots)[row, slot]
        return out

    def rows_of(self, tokens_BT: np.ndarray) -> Rows:
        """The model's inputs: each rollout's real tokens at its place in its row."""
        total = self.micro_batches * self.rows
        tokens = np.zeros((total, self.width), np.int32)
        segments = np.zeros((total, self.width), np.int32)
        positions = np.zeros((total, self.width), np.int32)
        pick = np.zeros((total, self.slots), np.int32)
        targets = np.zeros((total, self.slots), np.int32)
        seen = np.zeros(total, np.int32)
        p = self.prompt_slots
        for b, (row, off, plen, rlen) in enumerate(zip(self.row_B, self.offset_B,
                                                       self.prompt_len_B, self.response_len_B)):
            seen[row] += 1
            n = plen + rlen
            tokens[row, off:off + n] = np.concatenate([tokens_BT[b, p - plen:p],
                                                       tokens_BT[b, p:p + rlen]])
            segments[row, off:off + n] = seen[row]
            positions[row, off:off + n] = np.arange(n)
            slot = self.slot_B[b]
            # Response token r sits at off + plen + r and is scored from the position before.
            pick[row, slot:slot + rlen] = off + plen - 1 + np.arange(rlen)
            targets[row, slot:slot + rlen] = tokens_BT[b, p:p + rlen]
        used_K = np.zeros(total, np.int64)
        np.maximum.at(used_K, self.row_B, self.slot_B + self.response_len_B)
        shape = (self.micro_batches, self.rows, self.width)
        slots = (self.micro_batches, self.rows, self.slots)
        return Rows(tokens.reshape(shape), segments.reshape(shape), positions.reshape(shape),
                    pick.reshape(slots), targets.reshape(slots),
                    used_K.reshape(self.micro_batches, self.rows).max(-1).astype(np.int32))

    def loss_of(self, response_mask_BR: np.ndarray, advantages_B: np.ndarray,
                config: grpo.LossConfig) -> RowLoss:
        """The loss inputs of every scored slot, the old and reference log-probs left None
        (they come from the log-prob passes, or `scatter` of the sampler's). The weights are
        the padded batch's (`grpo.token_weights` of its [B, R] mask), whatever the layout."""
        mask_BR = np.asarray(response_mask_BR, np.float32)
        norm = grpo.aggregation_norms(mask_BR, config.agg, group_rows=config.group_rows)
        weights = lambda mode: self.scatter(np.asarray(grpo.token_weights(mask_BR, mode, norm)))
        adv_BR = np.broadcast_to(np.asarray(advantages_B, np.float32)[:, None], mask_BR.shape)
        return RowLoss(self.scatter(adv_BR), weights(config.agg), weights("token-mean"),
                       None, None)


def _lengths(valid_BT: np.ndarray, response_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Real prompt and response tokens of each rollout; checks they are contiguous (prompts
    left-padded, responses right-padded) and that every prompt has a token to score from."""
    valid_BT = np.asarray(valid_BT, bool)
    p = valid_BT.shape[1] - response_slots
    prompt_BP, response_BR = valid_BT[:, :p], valid_BT[:, p:]
    plen_B, rlen_B = prompt_BP.sum(-1), response_BR.sum(-1)
    left_padded = (prompt_BP == (np.arange(p)[None] >= p - plen_B[:, None])).all()
    right_padded = (response_BR == (np.arange(response_slots)[None] < rlen_B[:, None])).all()
    if not (left_padded and right_padded):
        raise ValueError("valid_BT must be left-padded prompts then right-padded responses")
    if (plen_B == 0).any():
        raise ValueError("every rollout needs at least one prompt token")
    return plen_B.astype(np.int64), rlen_B.astype(np.int64)


def trimmed(valid_BT: np.ndarray, response_slots: int, *, micro_batches: int,
            width_multiple: int, rows_multiple: int = 1) -> Layout:
    """One rollout per row, rows as wide as the longest rollout rounded up to a multiple of
    `width_multiple` (at most the padded width); rollout b in micro-batch b mod M, as the
    padded update's strided micro-batches, each with empty rows to a multiple of
    `rows_multiple` (the data-parallel shards) where the rollouts do not divide."""
    plen_B, rlen_B = _lengths(valid_BT, response_slots)
    b = plen_B.size
    if b % micro_batches:
        raise ValueError(f"{micro_batches} micro-batches do not divide {b} rollouts")
    longest = int((plen_B + rlen_B).max())
    width = min(math.ceil(longest / width_multiple) * width_multiple, valid_BT.shape[1])
    rows = math.ceil(b // micro_batches / rows_multiple) * rows_multiple
    index = np.arange(b)
    zeros = np.zeros(b, np.int64)
    # One rollout a row: at most its response's slots.
    return Layout(micro_batches, rows, width, min(width, response_slots),
                  valid_BT.shape[1] - response_slots, row_B=(index % micro_batches) * rows + index // micro_batches,
                  offset_B=zeros, slot_B=zeros, prompt_len_B=plen_B, response_len_B=rlen_B)


def packed(valid_BT: np.ndarray, response_slots: int, *, width: int, rows: int,
           micro_batches: int, width_multiple: int | None = None) -> Layout:
    """Whole rollouts packed into rows of at most `width` tokens (the token budget), `rows`
    rows per micro-batch (one per data-parallel shard), `micro_batches` of them (the unused
    ones empty).

    Best-fit decreasing: longest rollout first, each into the fullest row it fits, a new row
    when none does. Every row costs its full width, so the fewest rows is the least waste.
    With `width_multiple`, the rows are then narrowed to the narrowest multiple of it that
    still packs the batch into as many micro-batches: the last row's empty tail is spread
    over all of them and shrinks (each width compiles once).
    """
    plen_B, rlen_B = _lengths(valid_BT, response_slots)
    len_B = plen_B + rlen_B
    if len_B.max() > width:
        raise ValueError(f"a rollout of {int(len_B.max())} tokens does not fit a packed row "
                         f"of {width}; raise the token budget")
    count, placed = _best_fit(len_B, rlen_B, width)
    groups = math.ceil(count / rows)
    if groups > micro_batches:
        raise ValueError(f"the rollouts need {groups} micro-batches of {rows} rows of "
                         f"{width} tokens; at most {micro_batches} were allowed")
    if width_multiple is not None:
        narrowest = max(int(len_B.max()), math.ceil(int(len_B.sum()) / (groups * rows)))
        for narrower in range(math.ceil(narrowest / width_multiple) * width_multiple, width,
                              width_multiple):
            fewer, fit = _best_fit(len_B, rlen_B, narrower)
            if math.ceil(fewer / rows) <= groups:
                width, placed = narrower, fit
                break
    row_B, offset_B, slot_B = placed
    return Layout(micro_batches, rows, width, width, valid_BT.shape[1] - response_slots,
                  row_B=row_B, offset_B=offset_B, slot_B=slot_B, prompt_len_B=plen_B,
                  response_len_B=rlen_B)


def _best_fit(len_B: np.ndarray, rlen_B: np.ndarray, width: int):
    """Best-fit decreasing into rows of `width`: (rows used, (row_B, offset_B, slot_B))."""
    fill = np.zeros(len_B.size, np.int64)   # at most one row per rollout
    slots = np.zeros(len_B.size, np.int64)
    row_B, offset_B, slot_B = (np.zeros(len_B.size, np.int64) for _ in range(3))
    count = 0
    for b in np.argsort(-len_B, kind="stable"):
        room = width - fill[:count] - len_B[b]
        fits = np.flatnonzero(room >= 0)
        k = fits[np.argmin(room[fits])] if fits.size else count
        count = max(count, k + 1)
        row_B[b], offset_B[b], slot_B[b] = k, fill[k], slots[k]
        fill[k] += len_B[b]
        slots[k] += rlen_B[b]
    return count, (row_B, offset_B, slot_B)
