"""Orbax checkpoints of the trainer: a tree of (sharded) arrays plus a JSON dict per step.

Layout: `<directory>/<step>/arrays` (an orbax PyTree item) and `<directory>/<step>/meta`
(a JSON item: step, data-iterator state, run and model config). Orbax writes each step into
`<step>.orbax-checkpoint-tmp*` and renames it to `<step>` on commit, so a save killed
half-way leaves only a temporary directory that step listings and restores ignore (and the
next save of that step replaces). Every process calls every method; orbax's own barriers
decide which process writes what.

Failures are one line each: a step whose files are torn or truncated raises
`DamagedCheckpointError` naming it, and a save that runs out of disk (or hits any other OS
error) raises `CheckpointError` naming the path, the errno and the last good checkpoint.
"""

from __future__ import annotations

import errno as errno_lib
import json
import logging
import os
import re
import shutil
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxzero.errors import CheckpointError
from jaxzero.io.storage import storage_path
from jaxzero.parallel.trees import path_name

_ARRAYS, _META = "arrays", "meta"
_MAX_LISTED = 8   # mismatches named in one error message
_MAX_REASON = 300  # characters of a low-level error quoted in a one-line message
# JSON files of a committed step that orbax parses on every restore.
_JSON_FILES = (f"{_META}/metadata", f"{_ARRAYS}/_METADATA")
_SET_ASIDE = ".damaged"   # suffix of a damaged step moved out of the step listing
# On gs:// orbax writes a step in place and marks it committed with this file (a rename is
# not atomic there); elsewhere the rename of `<step>.orbax-checkpoint-tmp` commits it.
_COMMIT_FILE = "commit_success.txt"


class DamagedCheckpointError(CheckpointError):
    """A committed checkpoint step whose files cannot be read back (torn, truncated, missing).

    Unlike a checkpoint of another shape or architecture, an older step may still restore.
    """

    def __init__(self, checkpoint: Path, reason: str):
        super().__init__(f"checkpoint {checkpoint} cannot be read: {reason}")
        self.checkpoint, self.reason = checkpoint, reason


class _DropRethrownThreadErrors(logging.Filter):
    """Orbax logs every failing background thread's traceback and then re-raises the same
    exception to the caller, which reports it once; a full disk printed 50 tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_SignalingThread.run() raised an exception" not in str(record.msg)


if not any(isinstance(f, _DropRethrownThreadErrors) for f in logging.getLogger("absl").filters):
    logging.getLogger("absl").addFilter(_DropRethrownThreadErrors())


def _is_late_write_callback(unraisable) -> bool:
    """tensorstore's completion callback of a write still in flight when a failed save closed
    orbax's event loop: harmless (its save already failed), printed once per array."""
    if not isinstance(unraisable.exc_value, RuntimeError) or \
            str(unraisable.exc_value) != "Event loop is closed":
        return False
    frames = [f.name for f in traceback.extract_tb(unraisable.exc_traceback)]
    return "call_soon_threadsafe" in frames


def _quiet_late_write_callbacks() -> None:
    """Drops `_is_late_write_callback` reports from here on; everything else still reaches
    the previous hook. Installed before each save: the reports can arrive before the failed
    save raises, or long after."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxzero_quiet", False):
        return

    def hook(unraisable):
        if not _is_late_write_callback(unraisable):
            previous(unraisable)

    hook._jaxzero_quiet = True
    sys.unraisablehook = hook


def _innermost(err: BaseException) -> BaseException:
    """The root of an exception chain: tensorstore's own message, not orbax's wrappers."""
    seen = {id(err)}
    while (nxt := err.__cause__ or err.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        err = nxt
    return err


def _reason(err: BaseException) -> str:
    """One short line saying why a read or write failed."""
    root = _innermost(err)
    text = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
    text = text.split(" [tensorstore_spec=")[0]
    if isinstance(root, KeyError):
        text = text.strip("'\"")
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON] + "..."


def _os_error(err: BaseException) -> tuple[int, str | None] | None:
    """(errno, path) when an OS error caused `err`: a Python OSError, or tensorstore's
    message, which carries the errno as `os_error_code` and quotes the file it wrote."""
    seen, e = set(), err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno, e.filename
        code = re.search(r"os_error_code='?(\d+)", str(e))
        if code:
            path = re.search(r'Failed writing: "([^"]+)"', str(e)) or \
                re.search(r'local file "([^"]+)"', str(e))
            return int(code.group(1)), path.group(1) if path else None
        e = e.__cause__ or e.__context__
    return None


def _flat(tree) -> dict[str, Any]:
    # `params.layers.attn.q_DNH`: the same dotted name orbax gives the stored array.
    return {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _json_roundtrip_check(meta: Mapping[str, Any]) -> None:
    try:
        text = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint meta must be plain JSON: {e}") from e
    if json.loads(text) != meta:
        raise TypeError("checkpoint meta must survive a JSON round trip unchanged "
                        "(use str keys, lists instead of tuples, no NaN)")


class CheckpointStore:
    """Saves and restores numbered checkpoints in `directory`, keeping the last `keep`.

    With `async_save`, `save` returns once arrays are copied off the device and the
    write finishes in the background; `wait()` blocks until it is committed.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = False,
                 compress: bool = False):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = storage_path(directory)  # a Path, or an epath.Path for gs:// etc.
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        # Declared up front so a fresh store can read metadata before any save or restore.
        # Uncompressed by default: zstd buffers a second copy of each array on the host while
        # saving (1.9x the model's size in a conversion, against 1.2x without), for ~25% disk.
        arrays_handler = ocp.PyTreeCheckpointHandler(use_compression=compress)
        for args in (ocp.args.PyTreeSave, ocp.args.PyTreeRestore):
            registry.add(_ARRAYS, args, arrays_handler)
        for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
            registry.add(_META, args)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            # Reading a mistyped path must not create it; saves create it as needed.
            create=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              handler_registry=registry)
        self._pending: tuple[int, int | None] | None = None  # an async save's (step, before)

    # ---- steps ----

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step saved, committed or still being written by an async save."""
        return self._manager.latest_step()

    def committed_steps(self) -> list[int]:
        """The steps whose directories are committed now, read from storage without waiting
        for a save in flight (its temporary directory is not a step)."""
        if not self.directory.exists():
            return []
        by_marker = str(self.directory).startswith("gs://")
        return sorted(int(p.name) for p in self.directory.iterdir()
                      if p.name.isdigit() and p.is_dir()
                      and (not by_marker or (p / _COMMIT_FILE).exists()))

    def save_seconds(self, step: int) -> float | None:
        """How long the committed `step` took from its start to its commit, as orbax
        recorded it (None when it did not): the estimate of the next save's duration."""
        meta = self._manager.metadata(step)
        start, end = meta.init_timestamp_nsecs, meta.commit_timestamp_nsecs
        return None if start is None or end is None else (end - start) / 1e9

    def _resolve(self, step: int | None) -> int:
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"it has steps {', '.join(map(str, steps))}")
        return step

    # ---- save ----

    def save(self, step: int, arrays, meta: Mapping[str, Any], *, force: bool = False) -> bool:
        """Saves `arrays` (a pytree of jax arrays) and the JSON dict `meta` as `step`.

        Returns False, saving nothing, when `step` is not after the latest saved step,
        unless `force`; forcing a step that exists is an error. A save that fails on an OS
        error (a full disk) raises one `CheckpointError` and leaves earlier steps intact.
        """
        _json_roundtrip_check(meta)
        args = ocp.args.Composite(**{_ARRAYS: ocp.args.PyTreeSave(arrays),
                                     _META: ocp.args.JsonSave(dict(meta))})
        before = self.latest_step()
        _quiet_late_write_callbacks()
        try:
            saved = bool(self._manager.save(step, args=args, force=force))
        except ocp.checkpoint_manager.StepAlreadyExistsError as e:
            raise CheckpointError(f"checkpoint step {step} already exists in "
                                  f"{self.directory}") from e
        except Exception as e:
            failure = self._save_failed(step, before, e)
            if failure is None:
                raise
            raise failure from e
        if saved:
            self._pending = (step, before)
        return saved

    def _save_failed(self, step: int, before: int | None,
                     err: Exception) -> CheckpointError | None:
        """A one-line CheckpointError for a save that an OS error stopped; None for any other
        error (a bug, which keeps its traceback)."""
        found = _os_error(err)
        if found is None:
            return None
        code, path = found
        # The step's own half-written files only hold disk space; a rerun would replace them.
        if jax.process_index() == 0:
            for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                if isinstance(tmp, Path):
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.rmtree()
        last = (f"the last good checkpoint is {self.directory / str(before)}"
                if before is not None else "no earlier checkpoint was saved")
        return CheckpointError(
            f"saving checkpoint step {step} failed: {os.strerror(code)} "
            f"(errno {code}, {errno_lib.errorcode.get(code, '?')}) writing "
            f"{path or self.directory}; {last}")

    def wait(self) -> None:
        """Blocks until every started save is committed."""
        pending, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            failure = None if pending is None else self._save_failed(*pending, e)
            if failure is None:
                raise
            raise failure from e

    def close(self) -> None:
        self._manager.close()

    def delete(self, step: int) -> None:
        """Deletes the committed `step`."""
        self._manager.delete(self._resolve(step))

    def set_aside(self, step: int) -> Path:
        """Moves the damaged `step` out of the step listing (to `<step>.damaged`), so a
        resumed run can save that step again; returns where it went."""
        step = self._resolve(step)
        target = self.directory / f"{step}{_SET_ASIDE}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}{_SET_ASIDE}-{n}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpoint set aside {step}")
        self._manager.reload()
        return target

    # ---- restore ----

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON dict of `step` (default: latest), without reading any array."""
        step = self._resolve(step)
        self._check_json(step, (f"{_META}/metadata",))
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
        except Exception as e:
            raise self._damaged(step, _reason(e)) from e
        return restored[_META]

    def restore(self, step: int | None = None, *, abstract_arrays,
                cast: bool = False) -> tuple[Any, dict[str, Any]]:
        """Restores `(arrays, meta)` of `step` (default: latest).

        `abstract_arrays` is a pytree of `jax.ShapeDtypeStruct` with shardings; each process
        reads only its addressable shards straight onto them. Its top-level keys may be a
        subset of the saved ones (e.g. only "params"); within each, names and shapes must
        match the checkpoint exactly, and dtypes too unless `cast` converts them. A step
        whose files cannot be read raises `DamagedCheckpointError`.
        """
        step = self._resolve(step)
        for name, leaf in _flat(abstract_arrays).items():
            if not isinstance(leaf, jax.ShapeDtypeStruct) or leaf.sharding is None:
                raise TypeError(f"abstract_arrays leaf {name} must be a jax.ShapeDtypeStruct "
                                f"with a sharding, got {leaf!r}")
        self._check_json(step, _JSON_FILES)
        try:
            stored = self._manager.item_metadata(step)[_ARRAYS]
        except Exception as e:
            raise self._damaged(step, _reason(e)) from e
        if stored is None:
            raise self._damaged(step, f"it has no {_ARRAYS}")
        stored_tree = stored.tree
        self._check_matches(step, stored_tree, abstract_arrays, cast=cast)
        partial = set(abstract_arrays) != set(stored_tree)
        args = ocp.args.PyTreeRestore(
            item=abstract_arrays,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_arrays),
            partial_restore=partial)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{_ARRAYS: args, _META: ocp.args.JsonRestore()}))
        except Exception as e:
            # Names and shapes matched above, so what fails here is reading the files.
            raise self._damaged(step, _reason(e)) from e
        return restored[_ARRAYS], restored[_META]

    def restore_newest(self, *, abstract_arrays, cast: bool = False
                       ) -> tuple[int, Any, dict[str, Any], list[tuple[int, str]]]:
        """`(step, arrays, meta, skipped)` of the newest step that restores.

        `skipped` lists the newer steps that are damaged, with the reason, newest first. A
        checkpoint that does not match `abstract_arrays` still raises: older steps of the
        same run would not match either.
        """
        skipped: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                arrays, meta = self.restore(step, abstract_arrays=abstract_arrays, cast=cast)
            except DamagedCheckpointError as e:
                skipped.append((step, e.reason))
                continue
            return step, arrays, meta, skipped
        if not skipped:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        raise CheckpointError(f"no checkpoint in {self.directory} restores: " + "; ".join(
            f"step {step}: {why}" for step, why in skipped))

    def _check_json(self, step: int, names) -> None:
        """A torn JSON file named as such: orbax's own error names neither file nor step."""
        for name in names:
            path = self.directory / str(step) / name
            try:
                json.loads(path.read_text())
            except FileNotFoundError:
                raise self._damaged(step, f"{name} is missing") from None
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise self._damaged(step, f"{name} is not valid JSON (a torn write?): "
                                          f"{e}") from None

    def _damaged(self, step: int, reason: str) -> DamagedCheckpointError:
        return DamagedCheckpointError(self.directory / str(step), reason)

    def _check_matches(self, step: int, stored_tree, abstract_arrays, *, cast: bool) -> None:
        where = f"checkpoint step {step} in {self.directory}"
        if not isinstance(abstract_arrays, Mapping):
            raise TypeError("abstract_arrays must be a dict of named subtrees")
        missing_items = sorted(set(abstract_arrays) - set(stored_tree))
        if missing_items:
            raise CheckpointError(f"{where} has no {', '.join(missing_items)} "
                                  f"(it has {', '.join(sorted(stored_tree))})")
        stored = _flat({k: stored_tree[k] for k in abstract_arrays})
        expected = _flat(abstract_arrays)
        problems = [f"this model expects {name}, which the checkpoint lacks"
                    for name in sorted(set(expected) - set(stored))]
        problems += [f"checkpoint has {name}, which this model does not expect"
                     for name in sorted(set(stored) - set(expected))]
        for name in sorted(set(stored) & set(expected)):
            have, want = stored[name], expected[name]
            if tuple(have.shape) != tuple(want.shape):
                problems.append(f"checkpoint has {name} with shape {tuple(have.shape)}; "
                                f"this model expects {tuple(want.shape)}")
            elif not cast and have.dtype != want.dtype:
                problems.append(f"checkpoint has {name} as {have.dtype}; this model expects "
                                f"{want.dtype} (restore with cast=True to convert)")
        if problems:
            more = len(problems) - _MAX_LISTED
            listed = problems[:_MAX_LISTED] + ([f"and {more} more"] if more > 0 else [])
            per_layer = lambda names: any(re.search(r"\.layers\.\d+\.", n) for n in names)
            if per_layer(stored) and not per_layer(expected):
                listed.append("its decoder layers are stored one by one, as jaxzero wrote them "
                              "before it stacked them for the layer scan: export it to HF "
                              "with the jaxzero that wrote it, then convert that again")
            raise CheckpointError(f"{where} does not match: " + "; ".join(listed))
