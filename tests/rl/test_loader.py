"""The grain prompt loader: batches, per-epoch shuffles, process split, exact resumption."""

import itertools
import json

import pytest

from jaxzero.rl.loader import PromptLoader
from jaxzero.errors import CheckpointError, DataError

DISEASES = ["Erdheim-Chester disease", "Fabry disease", "Takayasu arteritis",
            "Castleman disease", "Guillain-Barré syndrome", "Wilson disease",
            "Kikuchi-Fujimoto disease", "Behçet disease", "Whipple disease",
            "Hereditary angioedema", "IgG4-related disease", "Langerhans cell histiocytosis",
            "Pheochromocytoma", "Gaucher disease type 1", "Cryoglobulinemic vasculitis",
            "Sarcoidosis", "Wegener granulomatosis", "Alport syndrome", "Pompe disease",
            "Niemann-Pick disease type C", "Addison disease", "Cushing disease"]
RECORDS = [{"id": f"PMC{9000 + i}", "diagnosis": d, "labels": [d]}
           for i, d in enumerate(DISEASES)]


def ids(batch):
    return [r["id"] for r in batch]


def take(loader, n):
    return [ids(b) for b in itertools.islice(loader, n)]


def test_batches_are_deterministic_from_the_seed():
    a = take(PromptLoader(RECORDS, batch_size=4, seed=7), 12)
    assert a == take(PromptLoader(RECORDS, batch_size=4, seed=7), 12)
    assert a != take(PromptLoader(RECORDS, batch_size=4, seed=8), 12)
    assert all(len(b) == 4 for b in a)


def test_each_epoch_is_a_fresh_permutation():
    loader = PromptLoader(RECORDS, batch_size=5, seed=0)
    assert loader.batches_per_epoch == 4  # 22 prompts: the last 2 of each epoch are left out
    epochs = [sum(take(loader, 4), []) for _ in range(3)]
    for epoch in epochs:
        assert len(set(epoch)) == 20
    assert epochs[0] != epochs[1] != epochs[2]
    assert loader.epoch == 2 and loader.step == 12


def test_without_shuffle_batches_follow_file_order():
    loader = PromptLoader(RECORDS, batch_size=4, seed=0, shuffle=False)
    first = sum(take(loader, 5), [])
    assert first == [r["id"] for r in RECORDS[:20]]
    assert take(loader, 1) == [[r["id"] for r in RECORDS[:4]]]


def test_processes_take_disjoint_slices_of_each_global_batch():
    single = take(PromptLoader(RECORDS, batch_size=6, seed=3), 10)
    parts = [take(PromptLoader(RECORDS, batch_size=2, seed=3, process_index=p,
                               process_count=3), 10) for p in range(3)]
    for step, global_batch in enumerate(single):
        assert parts[0][step] + parts[1][step] + parts[2][step] == global_batch


def test_finite_epochs_stop_and_count():
    loader = PromptLoader(RECORDS, batch_size=8, seed=1, num_epochs=2)
    batches = list(loader)
    assert len(batches) == 2 * 2 and loader.epoch == 1
    loader = PromptLoader(RECORDS, batch_size=8, seed=1, num_epochs=1, drop_remainder=False)
    assert [len(b) for b in loader] == [8, 8, 6]


@pytest.mark.parametrize("consumed", [0, 1, 3, 4, 9])
def test_resuming_continues_with_exactly_the_next_batch(consumed):
    kwargs = dict(batch_size=3, seed=11, process_index=1, process_count=2)
    reference = take(PromptLoader(RECORDS, **kwargs), consumed + 6)
    first = PromptLoader(RECORDS, **kwargs)
    take(first, consumed)
    state = json.loads(json.dumps(first.get_state()))
    resumed = PromptLoader(RECORDS, **kwargs)
    resumed.set_state(state)
    assert resumed.step == consumed and resumed.epoch == first.epoch
    assert take(resumed, 6) == reference[consumed:]


def test_restoring_into_another_layout_is_refused():
    loader = PromptLoader(RECORDS, batch_size=3, seed=11)
    take(loader, 2)
    state = loader.get_state()
    for other in [PromptLoader(RECORDS, batch_size=4, seed=11),
                  PromptLoader(RECORDS[:-1], batch_size=3, seed=11),
                  PromptLoader(RECORDS, batch_size=3, seed=12),
                  PromptLoader(RECORDS, batch_size=3, seed=11, shuffle=False)]:
        with pytest.raises(CheckpointError, match="another data layout"):
            other.set_state(state)
    with pytest.raises(CheckpointError, match="batch_size: saved nothing"):
        loader.set_state({"next_index": 2})


def test_bad_arguments():
    with pytest.raises(DataError, match="fewer than one global batch"):
        PromptLoader(RECORDS[:5], batch_size=3, seed=0, process_count=2)
    with pytest.raises(DataError, match="no training prompts"):
        PromptLoader([], batch_size=1, seed=0, drop_remainder=False)
    with pytest.raises(ValueError, match="process_index"):
        PromptLoader(RECORDS, batch_size=2, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="drop_remainder"):
        PromptLoader(RECORDS, batch_size=2, seed=0, process_count=2, drop_remainder=False)
    with pytest.raises(ValueError, match="seed"):
        PromptLoader(RECORDS, batch_size=2, seed=-1)
