"""Checkpoint store: exact round trips, sharded restore, retention, errors, crash safety,
damaged steps and a full disk."""

import asyncio
import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxzero.io.checkpoint import CheckpointStore, DamagedCheckpointError
from jaxzero.errors import CheckpointError


def mesh():
    return jax.make_mesh((8,), ("fsdp",))


def replicated_abstract(tree):
    rep = NamedSharding(mesh(), P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)


def sample_arrays(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "embed": jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16),
        # int keys, as nnx's pure-dict state has for layer lists
        "layers": {0: {"q": jnp.asarray(rng.normal(size=(8, 4, 2)), jnp.float32)},
                   1: {"q": jnp.asarray(rng.normal(size=(8, 4, 2)), jnp.float32)}},
    }
    opt_state = optax.adamw(1e-3).init(params)
    return {"params": params, "opt_state": opt_state,
            "rng": jnp.asarray(jax.random.key_data(jax.random.key(seed)), jnp.uint32),
            "count": jnp.asarray(7 + seed, jnp.int32)}


META = {"step": 3, "data_state": {"epoch": 1, "order": [3, 1, 2]},
        "config": {"grpo": {"clip_c": None, "loss_agg": "token-mean"}},
        "model_config": {"hidden_size": 8, "tie_word_embeddings": True}}


def assert_trees_equal(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_round_trip_is_bit_exact(tmp_path):
    arrays = sample_arrays()
    store = CheckpointStore(tmp_path / "ckpt")
    assert store.latest_step() is None and store.all_steps() == []
    assert store.save(3, arrays, META)
    store.wait()
    restored, meta = store.restore(abstract_arrays=replicated_abstract(arrays))
    assert_trees_equal(restored, arrays)
    assert meta == META
    # optax's NamedTuple states come back as the same types, not as dicts.
    assert jax.tree.structure(restored) == jax.tree.structure(arrays)
    store.close()
    # A fresh store (a resumed run) sees the step and reads the JSON alone.
    again = CheckpointStore(tmp_path / "ckpt")
    assert again.latest_step() == 3
    assert again.restore_meta() == META


def test_restore_onto_sharded_target(tmp_path):
    fsdp = NamedSharding(mesh(), P("fsdp"))
    rep = NamedSharding(mesh(), P())
    pick = lambda x: fsdp if x.ndim and x.shape[0] % 8 == 0 else rep
    host = sample_arrays()
    sharded = jax.tree.map(lambda x: jax.device_put(x, pick(x)), host)
    store = CheckpointStore(tmp_path)
    store.save(1, sharded, META)
    store.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=pick(x)),
                            host)
    restored, _ = store.restore(1, abstract_arrays=abstract)
    q = restored["params"]["layers"][0]["q"]
    assert q.sharding == fsdp
    assert [s.data.shape for s in q.addressable_shards] == [(1, 4, 2)] * 8
    assert restored["count"].sharding == rep
    assert_trees_equal(restored, host)
    # Saved sharded, restored replicated: the target sharding decides, not the saved one.
    restored, _ = store.restore(1, abstract_arrays=replicated_abstract(host))
    assert restored["params"]["layers"][0]["q"].sharding == rep
    assert_trees_equal(restored, host)


def test_restore_only_some_items(tmp_path):
    arrays = sample_arrays()
    store = CheckpointStore(tmp_path)
    store.save(1, arrays, META)
    store.wait()
    restored, meta = store.restore(abstract_arrays=replicated_abstract(
        {"params": arrays["params"]}))
    assert set(restored) == {"params"}
    assert_trees_equal(restored["params"], arrays["params"])


def test_keeps_last_k_and_skips_old_steps(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    small = {"x": jnp.arange(4, dtype=jnp.float32)}
    for step in (1, 2, 3, 4):
        assert store.save(step, jax.tree.map(lambda a: a + step, small), {"step": step})
    store.wait()
    assert store.all_steps() == [3, 4]
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]
    assert not store.save(4, small, {"step": 4})      # not after the latest: skipped
    with pytest.raises(CheckpointError, match="already exists"):
        store.save(4, small, {"step": 4}, force=True)
    restored, meta = store.restore(3, abstract_arrays=replicated_abstract(small))
    np.testing.assert_array_equal(restored["x"], np.arange(4) + 3)
    assert meta == {"step": 3}


def test_async_save_copies_before_returning(tmp_path):
    arrays = sample_arrays(1)
    expected = jax.tree.map(np.asarray, arrays)
    store = CheckpointStore(tmp_path, async_save=True)
    assert store.save(5, arrays, META)
    for x in jax.tree.leaves(arrays):   # as the next train step's donation does
        x.delete()
    store.wait()
    restored, _ = store.restore(abstract_arrays=replicated_abstract(expected))
    assert_trees_equal(restored, expected)
    store.close()


def test_error_messages(tmp_path):
    empty = CheckpointStore(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match=f"no checkpoint in {tmp_path / 'nothing'}"):
        empty.restore_meta()
    assert not (tmp_path / "nothing").exists()   # reading does not create the directory

    arrays = {"params": {"layers": {"0": {"attn": {"q": jnp.zeros((64, 4, 16))}}},
                         "norm": jnp.ones(4)}}
    store = CheckpointStore(tmp_path / "run")
    store.save(2, arrays, {"step": 2})
    store.save(4, arrays, {"step": 4})
    store.wait()
    with pytest.raises(CheckpointError, match="no checkpoint for step 3 .*it has steps 2, 4"):
        store.restore_meta(3)

    wrong_shape = {"params": {"layers": {"0": {"attn": {"q": jnp.zeros((64, 8, 16))}}},
                              "norm": jnp.ones(4)}}
    with pytest.raises(CheckpointError, match=r"checkpoint has params\.layers\.0\.attn\.q with "
                                              r"shape \(64, 4, 16\); this model expects "
                                              r"\(64, 8, 16\)"):
        store.restore(abstract_arrays=replicated_abstract(wrong_shape))

    renamed = {"params": {"layers": {"0": {"attn": {"q": jnp.zeros((64, 4, 16))}}},
                          "final_norm": jnp.ones(4)}}
    with pytest.raises(CheckpointError) as info:
        store.restore(abstract_arrays=replicated_abstract(renamed))
    assert "this model expects params.final_norm, which the checkpoint lacks" in str(info.value)
    assert "checkpoint has params.norm, which this model does not expect" in str(info.value)

    stacked = {"params": {"layers": {"attn": {"q": jnp.zeros((1, 64, 4, 16))}},
                          "norm": jnp.ones(4)}}
    with pytest.raises(CheckpointError, match="decoder layers are stored one by one"):
        store.restore(abstract_arrays=replicated_abstract(stacked))

    with pytest.raises(CheckpointError, match="has no opt_state"):
        store.restore(abstract_arrays=replicated_abstract(
            {"params": arrays["params"], "opt_state": {"mu": jnp.ones(4)}}))

    as_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), arrays)
    with pytest.raises(CheckpointError, match="as float32; this model expects bfloat16"):
        store.restore(abstract_arrays=replicated_abstract(as_bf16))
    restored, _ = store.restore(abstract_arrays=replicated_abstract(as_bf16), cast=True)
    assert restored["params"]["norm"].dtype == jnp.bfloat16

    with pytest.raises(TypeError, match="ShapeDtypeStruct with a sharding"):
        store.restore(abstract_arrays=jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), arrays))
    with pytest.raises(TypeError, match="JSON"):
        store.save(6, arrays, {"order": (1, 2)})


CRASHING_SAVER = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from jaxzero.io.checkpoint import CheckpointStore

    directory, method, target, async_save = sys.argv[1:]
    store = CheckpointStore(directory, async_save=async_save == "async")
    store.save(1, {"w": jnp.full((256, 256), 1.0)}, {"step": 1})
    store.wait()

    cls = atomicity.AtomicRenameTemporaryPath
    original = getattr(cls, method)

    async def hang_at_target(self, *args, **kwargs):
        hang = self.get_final().name == target
        if hang and method == "finalize":   # written, not yet renamed
            print("hanging", flush=True)
            time.sleep(120)
        result = await original(self, *args, **kwargs)
        if hang:                            # directory created, nothing written
            print("hanging", flush=True)
            time.sleep(120)
        return result

    setattr(cls, method, hang_at_target)
    store.save(2, {"w": jnp.full((256, 256), 2.0)}, {"step": 2})
    print("save returned", flush=True)
    store.wait()   # async: the write goes on in the background, as the next steps run
""")


# Killed after creating the step's temporary directory, after writing and committing the
# array item inside it, and just before the step directory's own commit rename; an async
# save is killed in its background thread, after `save` returned.
@pytest.mark.parametrize("method,target,mode", [
    ("create", "2", "sync"), ("finalize", "arrays", "sync"), ("finalize", "2", "sync"),
    ("finalize", "arrays", "async"), ("finalize", "2", "async")])
def test_killed_save_leaves_previous_checkpoint(tmp_path, method, target, mode):
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_SAVER, str(tmp_path), method,
                             target, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=dict(os.environ))
    try:
        lines = [proc.stdout.readline().strip()]
        if mode == "async":   # save() returns while its write goes on (to the hang)
            lines.append(proc.stdout.readline().strip())
            assert sorted(lines) == ["hanging", "save returned"], lines
        else:
            assert lines == ["hanging"], lines
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    leftovers = sorted(n for n in os.listdir(tmp_path) if n != "1")
    assert leftovers == ["2.orbax-checkpoint-tmp"]

    store = CheckpointStore(tmp_path)
    assert store.all_steps() == [1] and store.latest_step() == 1
    abstract = replicated_abstract({"w": jnp.zeros((256, 256))})
    restored, meta = store.restore(abstract_arrays=abstract)
    assert meta == {"step": 1} and float(restored["w"][0, 0]) == 1.0
    with pytest.raises(CheckpointError, match="it has steps 1"):
        store.restore(2, abstract_arrays=abstract)
    # The rerun of step 2 replaces the stale temporary directory.
    assert store.save(2, {"w": jnp.full((256, 256), 3.0)}, {"step": 2})
    store.wait()
    restored, meta = store.restore(abstract_arrays=abstract)
    assert meta == {"step": 2} and float(restored["w"][0, 0]) == 3.0
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


# ---------------------------------------------------------------- damaged checkpoints, full disk

def _w(value, shape=(64, 64)):
    return {"params": {"w": jnp.full(shape, float(value))}}


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _largest_data_file(step_dir):
    return max((p for p in (step_dir / "arrays").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def _one_line(err):
    text = str(err)
    assert "\n" not in text and len(text) < 600, text
    return text


def test_torn_checkpoints_are_named_and_resume_falls_back(tmp_path):
    store = CheckpointStore(tmp_path, keep=10)
    for step in (1, 2, 3, 4):
        store.save(step, _w(step), {"step": step})
    store.wait()
    _truncate(_largest_data_file(tmp_path / "4"))          # a torn array file
    _truncate(tmp_path / "3" / "meta" / "metadata")        # a torn JSON item
    _truncate(tmp_path / "2" / "arrays" / "_METADATA")     # a torn array index
    abstract = replicated_abstract(_w(0))
    store = CheckpointStore(tmp_path, keep=10)
    assert store.all_steps() == [1, 2, 3, 4]

    with pytest.raises(DamagedCheckpointError) as info:
        store.restore(4, abstract_arrays=abstract)
    assert _one_line(info.value).startswith(f"checkpoint {tmp_path / '4'} cannot be read: ")
    assert "params.w" in str(info.value)                   # tensorstore's reason, kept short
    with pytest.raises(DamagedCheckpointError,
                       match=rf"checkpoint {tmp_path / '3'} cannot be read: meta/metadata is "
                             r"not valid JSON"):
        store.restore_meta(3)
    with pytest.raises(DamagedCheckpointError, match="arrays/_METADATA is not valid JSON"):
        store.restore(2, abstract_arrays=abstract)

    step, arrays, meta, skipped = store.restore_newest(abstract_arrays=abstract)
    assert step == 1 and meta == {"step": 1} and float(arrays["params"]["w"][0, 0]) == 1.0
    assert [s for s, _ in skipped] == [4, 3, 2]
    assert "meta/metadata is not valid JSON" in skipped[1][1]

    # A checkpoint of another shape is not damage: no older step of the run would fit either.
    with pytest.raises(CheckpointError, match="this model expects") as info:
        store.restore_newest(abstract_arrays=replicated_abstract(_w(0, shape=(8, 8))))
    assert not isinstance(info.value, DamagedCheckpointError)

    # Set aside, a damaged step leaves the listing and can be saved again.
    moved = store.set_aside(4)
    assert moved == tmp_path / "4.damaged" and moved.is_dir()
    assert store.all_steps() == [1, 2, 3] and store.latest_step() == 3
    assert store.save(4, _w(40), {"step": 4}, force=True)
    store.wait()
    restored, _ = store.restore(4, abstract_arrays=abstract)
    assert float(restored["params"]["w"][0, 0]) == 40.0


def test_no_checkpoint_restores(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(1, _w(1), {"step": 1})
    store.wait()
    shutil.rmtree(tmp_path / "1" / "meta")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* restores: step 1: "
                                              r"meta/metadata is missing"):
        store.restore_newest(abstract_arrays=replicated_abstract(_w(0)))


def _enospc(monkeypatch):
    """The JSON item's writer hits a full disk, inside orbax's real save path."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    async def full_disk(self, item, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_disk)


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capfd,
                                                              async_save):
    store = CheckpointStore(tmp_path, async_save=async_save)
    store.save(1, _w(1), {"step": 1})
    store.wait()
    capfd.readouterr()
    with monkeypatch.context() as patch:
        _enospc(patch)
        with pytest.raises(CheckpointError) as info:
            store.save(2, _w(2), {"step": 2})
            store.wait()   # an async save fails here
    text = _one_line(info.value)
    assert text.startswith("saving checkpoint step 2 failed: No space left on device "
                           "(errno 28, ENOSPC) writing ")
    assert str(tmp_path / "2.orbax-checkpoint-tmp") in text
    assert text.endswith(f"; the last good checkpoint is {tmp_path / '1'}")
    assert "Traceback" not in capfd.readouterr().err   # orbax's per-thread logs are dropped
    assert sorted(os.listdir(tmp_path)) == ["1"]        # the half-written step is removed
    restored, meta = store.restore(abstract_arrays=replicated_abstract(_w(0)))
    assert meta == {"step": 1} and float(restored["params"]["w"][0, 0]) == 1.0
    store.close()


def test_first_save_on_a_full_disk(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    _enospc(monkeypatch)
    with pytest.raises(CheckpointError, match="; no earlier checkpoint was saved$"):
        store.save(1, _w(1), {"step": 1})


def test_a_real_full_filesystem(tmp_path):
    """tensorstore's own ENOSPC (a ValueError carrying os_error_code) on a 1 MiB tmpfs."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        store = CheckpointStore(mount / "ckpt")
        store.save(1, _w(1), {"step": 1})
        store.wait()
        with pytest.raises(CheckpointError) as info:
            store.save(2, _w(2, shape=(512, 1024)), {"step": 2})   # 2 MiB of float32
        text = _one_line(info.value)
        # Which write tensorstore fails first depends on timing: the step's temporary
        # directory, or (seen once under load in CI) the checkpoint directory itself.
        assert "No space left on device (errno 28, ENOSPC) writing " \
               f"{mount / 'ckpt'}" in text
        assert text.endswith(f"the last good checkpoint is {mount / 'ckpt' / '1'}")
        assert store.all_steps() == [1]
        restored, _ = store.restore(abstract_arrays=replicated_abstract(_w(0)))
        assert float(restored["params"]["w"][0, 0]) == 1.0
        store.close()
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_late_write_callbacks_of_a_failed_save_are_quiet(tmp_path, monkeypatch):
    """tensorstore writes still in flight when a failed save closed orbax's event loop each
    report `Event loop is closed` (41 tracebacks in a demo run on a full disk); nothing else
    is dropped."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    CheckpointStore(tmp_path).save(1, _w(1), {"step": 1})
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        late = e
    closed_elsewhere = RuntimeError("Event loop is closed")   # not from a write callback
    for exc in (late, ValueError("a real problem"), closed_elsewhere):
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(exc), exc_value=exc,
                                                 exc_traceback=exc.__traceback__,
                                                 err_msg=None, object=None))
    assert [u.exc_value for u in reported] == [reported[0].exc_value, closed_elsewhere]
    assert str(reported[0].exc_value) == "a real problem"
