"""Batches of prompt records on grain: seeded per-epoch shuffle, split by process, resumable.

Every process builds the same global order: epoch e is a permutation of the records seeded by
(seed + e), cut into global batches of batch_size × process_count prompts. Process p takes the
p-th contiguous slice of each global batch, so the processes see disjoint prompts and stay in
step. The iterator state is one integer (the next global batch) plus what it depends on, so a
resumed run continues with exactly the next batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain

from jaxzero.errors import CheckpointError, DataError

# Fields of the state that must match on restore: the same index means another batch otherwise.
_LAYOUT = ("num_records", "batch_size", "process_count", "seed", "shuffle", "drop_remainder")


class PromptLoader:
    """Iterates lists of `batch_size` records (this process's part of each global batch)."""

    def __init__(self, records: Sequence[dict], *, batch_size: int, seed: int,
                 shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0,
                 process_count: int = 1, drop_remainder: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        if not drop_remainder and process_count > 1:
            # A short last batch cannot be split evenly, and uneven batches break lockstep.
            raise ValueError("drop_remainder=False needs process_count == 1")
        global_batch = batch_size * process_count
        if len(records) < global_batch and drop_remainder:
            raise DataError(
                f"{len(records)} training prompts are fewer than one global batch "
                f"({batch_size} per process × {process_count} processes)")
        if not records:
            raise DataError("no training prompts")

        self._records = list(records)
        self._layout = dict(num_records=len(records), batch_size=batch_size,
                            process_count=process_count, seed=seed, shuffle=shuffle,
                            drop_remainder=drop_remainder)
        order = grain.MapDataset.range(len(records))
        if shuffle:
            # grain reseeds with (seed + epoch) when the index runs into a later epoch.
            order = order.shuffle(seed=seed)
        # batch() before repeat(): each epoch is batched on its own, so no batch spans two.
        batches = order.batch(global_batch, drop_remainder=drop_remainder)
        self.batches_per_epoch = len(batches)
        lo = process_index * batch_size
        self._dataset = batches.repeat(num_epochs).map(
            lambda idx_G: [self._records[i] for i in idx_G[lo:lo + batch_size]])
        # Threads would only prefetch list slices; without them the state is just the index.
        self._iterator = self._dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()

    def __iter__(self) -> PromptLoader:
        return self

    def __next__(self) -> list[dict]:
        return next(self._iterator)

    @property
    def step(self) -> int:
        """Batches delivered so far (counting those before a restore)."""
        return int(self._iterator.get_state()["next_index"])

    @property
    def epoch(self) -> int:
        """The epoch of the most recent batch (0 before the first)."""
        return max(self.step - 1, 0) // self.batches_per_epoch

    def get_state(self) -> dict:
        """JSON-serialisable; the same on every process."""
        return {"next_index": self.step, **self._layout}

    def set_state(self, state: dict) -> None:
        changed = [f"{k}: saved {state[k] if k in state else 'nothing'}, now {v}"
                   for k, v in self._layout.items() if k not in state or state[k] != v]
        if changed:
            raise CheckpointError(
                "the saved data-loader state belongs to another data layout "
                f"({'; '.join(changed)}); the resumed run would not see the next batch")
        self._iterator.set_state({"next_index": int(state["next_index"])})
