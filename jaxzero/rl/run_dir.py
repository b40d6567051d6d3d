"""The run directory: jaxzero's marker, the run's lock, its saved identity, and what
`--overwrite` may delete.

A run directory is jaxzero's only when it holds `MARKER`, written when jaxzero creates (or
adopts an empty) directory. Its identity (`config.yaml`, and `run.json` with the resolved
model paths and a content hash of the prepared data) is written only once setup succeeds,
each file atomically, so a failed start leaves nothing that blocks the corrected command.
The main process holds an exclusive `flock` on `LOCK` for the run's lifetime; the kernel
drops it when the holder dies, so a killed run never blocks its restart.

A remote run directory (gs://, s3://, az://) is worked on through a local mirror
(`trainer.local_dir`): everything above happens there, the main process copies the
`MIRRORED` entries up (the identity at commit, the logs at each save and at the end), and
every start first copies the identity down (the remote is the run) and the logs the mirror
lacks (a new machine resuming). Checkpoints and the reference go to the remote directory
itself (`RunDir.durable`). The lock guards the
mirror only: two machines must not run on one remote directory at once.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterable

import jax

from jaxzero.config import files as config_files
from jaxzero.config import schema as config_lib
from jaxzero.errors import CheckpointError, ConfigError, DataError, JaxzeroError
from jaxzero.io.identity import CHECKPOINTS_AT, MODEL_CONFIG, TOKENIZER_DIR
from jaxzero.io.storage import (TMP_SUFFIX, check_remote_support, download, is_remote,
                                local_mirror, remove, replace_from, storage_path, upload)

MARKER = ".jaxzero-run"
LOCK = ".jaxzero-run.lock"
CONFIG = "config.yaml"
IDENTITY = "run.json"
_TMP = TMP_SUFFIX  # suffix of a file being written atomically
# Everything jaxzero writes into a run directory (setup, the trainer, `jaxzero plot`):
# the only entries `--overwrite` deletes.
OWNED = frozenset({MARKER, LOCK, CONFIG, IDENTITY, MODEL_CONFIG, TOKENIZER_DIR, "data",
                   "checkpoints", "reference", "tb", "plots", CHECKPOINTS_AT})
# What a remote run directory holds beside its checkpoints and reference: the identity, then
# the logs (`LOGS`, copied up again at every save).
LOGS = ("tb", "plots")
MIRRORED = (MARKER, CONFIG, IDENTITY, MODEL_CONFIG, TOKENIZER_DIR, "data", CHECKPOINTS_AT,
            *LOGS)

# Keys a resumed run may change: how long it runs and how it logs, evaluates, saves and
# exports. They cannot change the results of the steps it has taken.
RESUMABLE_KEYS = frozenset({
    "trainer.max_steps", "trainer.total_epochs", "trainer.eval_every", "trainer.save_every",
    "trainer.keep_checkpoints", "trainer.log_every", "trainer.eval_examples_logged",
    "trainer.export_hf", "data.eval_max_prompts", "trainer.async_checkpoint",
    "trainer.preemption_grace_s", "trainer.peer_timeout_s", "trainer.local_dir",
})
# Compared through run.json instead of as written: a path spelled `R/`, `./R` or relative to
# another working directory is the same path, and data files are compared by content.
PATH_KEYS = ("model.path", "model.tokenizer")
DATA_KEYS = {"train": "data.train_file", "test": "data.test_file"}
NOT_COMPARED = RESUMABLE_KEYS | {"trainer.run_dir", *PATH_KEYS, *DATA_KEYS.values()}
_MAX_NAMED = 8


class RunDir:
    """An opened run directory; on the main process it holds the run's lock until `close`."""

    def __init__(self, path: Path, lock_fd: int | None, saved: dict | None, remote=None):
        self.path = path  # local: the run directory, or the remote one's mirror
        self.remote = remote  # the remote run directory (an epath.Path), or None
        self._lock_fd = lock_fd
        self._saved = saved  # run.json of the run this resumes; None for a fresh run

    def durable(self, name: str):
        """Where an entry that must outlive this machine goes (checkpoints, the reference):
        in the remote run directory when there is one."""
        return (self.path if self.remote is None else self.remote) / name

    def push(self, names: Iterable[str] = MIRRORED) -> None:
        """Copies these entries of the mirror up to the remote run directory (main process;
        nothing for a local run directory)."""
        if self.remote is None:
            return
        for name in names:
            if (self.path / name).exists():
                upload(self.path / name, self.remote / name)

    @property
    def is_fresh(self) -> bool:
        return self._saved is None

    def check_data(self, files: dict[str, Path | None]) -> dict[str, Any]:
        """The data fingerprint of `files` ({"train": path, "test": path or None}); refuses
        a resumed run whose files differ in content from the ones it started on."""
        found = fingerprint(files)
        if self._saved is None:
            return found
        started = self._saved["data"]
        differ = [name for name in sorted(set(found) | set(started))
                  if _digest(found.get(name)) != _digest(started.get(name))]
        if differ:
            raise DataError(f"{self.path} holds a run started on other data: " + "; ".join(
                f"{name} file {_describe(found.get(name))} now, "
                f"{_describe(started.get(name))} when the run started" for name in differ)
                + ". Resume with the data the run started on, or choose another "
                "trainer.run_dir")
        return found

    def commit(self, cfg, data: dict[str, Any]) -> None:
        """Writes the run's identity: run.json once (a resumed run keeps its own), then
        config.yaml with this start's resumable keys. Call on the main process only."""
        if self._saved is None:
            _write_atomic(self.path / IDENTITY, json.dumps(
                {"paths": resolved_paths(cfg), "data": data}, indent=1) + "\n")
            self._saved = json.loads((self.path / IDENTITY).read_text())
        tmp = _tmp_name(self.path / CONFIG)
        config_files.save_config(cfg, tmp)
        os.replace(tmp, self.path / CONFIG)
        self.push(name for name in MIRRORED if name not in LOGS)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def open_run_dir(cfg, *, resume: bool, overwrite: bool, main: bool) -> RunDir:
    """Claims `cfg.trainer.run_dir` for this run: refuses a directory jaxzero did not create,
    one another run holds, and one that holds a run of another config; `overwrite` first
    deletes what jaxzero wrote there. Only the main process writes and locks."""
    url, remote = cfg.trainer.run_dir, None
    if is_remote(url):
        check_remote_support(url)
        remote = storage_path(url)
        path = local_mirror(url, cfg.trainer.local_dir)
        if jax.process_count() > 1:  # a mirror per process: none copies over another's files
            path = path / f"process-{jax.process_index()}"
        _refuse_foreign_remote(remote)
    else:
        path = Path(url)
    _refuse_foreign(path)
    if overwrite and cfg.trainer.checkpoint_dir is not None:
        _refuse_old_checkpoints(cfg.trainer.checkpoint_dir)
    if remote is None and resume and not (path / CONFIG).exists():
        # Before a mistyped path gets created.
        raise CheckpointError(f"--resume: {path} holds no run to resume")
    lock_fd = None
    if main:
        path.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(path)
    try:
        if remote is not None:
            if not overwrite:
                _pull(remote, path)  # under the mirror's lock
            if resume and not (path / CONFIG).exists():
                raise CheckpointError(f"--resume: {url} holds no run to resume")
        if main and not (path / MARKER).exists():
            _write_atomic(path / MARKER, json.dumps({
                "created_by": "jaxzero", "host": socket.gethostname(),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}) + "\n")
        if main and remote is not None and not (remote / MARKER).exists():
            # First, so the checkpoints and reference written before the commit are seen as
            # this run's by a restart.
            upload(path / MARKER, remote / MARKER)
        if overwrite:
            if main:
                if remote is not None:
                    _clear_remote(remote)
                _clear(path, also=_exports_inside(path, cfg))
            saved = None
        else:
            saved = _saved_run(cfg, path)
        if resume and saved is None:
            raise CheckpointError(f"--resume with --overwrite: {path} will hold no run to "
                                  "resume")
        return RunDir(path, lock_fd, saved, remote)
    except BaseException:
        if lock_fd is not None:
            os.close(lock_fd)
        raise


# ---------------------------------------------------------------- ownership and the lock

def _names(entries: Iterable[str]) -> str:
    entries = sorted(entries)
    more = len(entries) - _MAX_NAMED
    return ", ".join(entries[:_MAX_NAMED]) + (f" and {more} more" if more > 0 else "")


def _refuse_foreign(path: Path) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"trainer.run_dir={path}: exists and is not a directory")
    _refuse_unmarked(path, {e for e in os.listdir(path) if e != LOCK and not e.endswith(_TMP)})


def _refuse_foreign_remote(remote) -> None:
    if remote.exists():
        _refuse_unmarked(remote, {e.name for e in remote.iterdir()})


def _refuse_unmarked(where, entries: set[str]) -> None:
    if entries and MARKER not in entries:
        raise ConfigError(f"trainer.run_dir={where} is not a jaxzero run directory (it has no "
                          f"{MARKER} marker) and is not empty: it holds {_names(entries)}. "
                          "jaxzero writes only into its own or empty directories; choose "
                          "another trainer.run_dir")


def _refuse_foreign_files(where, foreign: set[str]) -> None:
    """--overwrite deletes nothing where anything jaxzero did not write is there."""
    if foreign:
        raise ConfigError(f"--overwrite: {where} holds files jaxzero did not write: "
                          f"{_names(foreign)}; nothing was deleted. Move them out, or choose "
                          "another trainer.run_dir")


def _pull(remote, path: Path) -> None:
    """Makes the mirror's identity the remote run directory's (the remote is the run: a
    mirror left from an earlier run at this URL must not stand in for it), and copies down
    the logs the mirror lacks (a new machine resuming; logs it has are as new or newer)."""
    if not remote.exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    for name in MIRRORED:
        local, there = path / name, remote / name
        if name not in LOGS:
            replace_from(there, local)
        elif not local.exists() and there.exists():
            download(there, local)


def _clear_remote(remote) -> None:
    """--overwrite on a remote run directory: deletes what jaxzero wrote there (its marker
    stays); refuses, deleting nothing, when anything else is there."""
    if not remote.exists():
        return
    entries = {e.name: e for e in remote.iterdir()}
    _refuse_foreign_files(remote, set(entries) - OWNED)
    for name, entry in sorted(entries.items()):
        if name != MARKER:
            entry.rmtree() if entry.is_dir() else entry.unlink()


def _refuse_old_checkpoints(where: str) -> None:
    """--overwrite deletes only the run directory: checkpoints kept elsewhere would be resumed
    from, so a fresh start there is refused."""
    directory = storage_path(where)
    if directory.exists() and any(directory.iterdir()):
        raise ConfigError(f"--overwrite: trainer.checkpoint_dir={where} holds checkpoints, "
                          "which --overwrite does not delete (they are outside the run "
                          "directory); delete them, or choose another trainer.checkpoint_dir")


def _lock(path: Path) -> int:
    """An exclusive, non-blocking flock on the run's lock file, recording host and pid."""
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        raise JaxzeroError(f"{path} is in use by another run ({holder}); wait for it to "
                           "finish or stop it, or choose another trainer.run_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
    return fd


def _exports_inside(path: Path, cfg) -> set[str]:
    """Entries of `path` that are the HF export of this config or of the saved run's (the
    demo exports into its run directory)."""
    configs = [cfg]
    if (path / CONFIG).exists():
        try:
            configs.append(config_files.load_config(path / CONFIG))
        except ConfigError:
            pass  # a config this version cannot read names no export; --overwrite goes on
    return {Path(c.trainer.export_hf).name for c in configs if c.trainer.export_hf
            and Path(c.trainer.export_hf).resolve().parent == path.resolve()}


def _clear(path: Path, also: set[str]) -> None:
    """Deletes what jaxzero wrote in `path` (its marker and lock stay); refuses, deleting
    nothing, when anything else is there."""
    entries = set(os.listdir(path))
    owned = OWNED | also
    # Half-written files of jaxzero's atomic writes (its own, io.identity's `NAME.tmp`).
    _refuse_foreign_files(path, {e for e in entries if e not in owned and not e.endswith(_TMP)
                                 and not (e.endswith(".tmp") and e[:-len(".tmp")] in owned)})
    for name in sorted(entries - {MARKER, LOCK}):
        remove(path / name)


# ---------------------------------------------------------------- identity

def resolved_paths(cfg) -> dict[str, str | None]:
    """The path-valued keys, absolute where they name an existing path (hub ids as given)."""
    flat = config_lib.flatten(cfg)
    return {key: _resolve(flat[key]) for key in PATH_KEYS}


def _resolve(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _saved_run(cfg, path: Path) -> dict | None:
    """run.json of the run in `path`, after checking that `cfg` continues it; None when
    `path` holds no committed run."""
    if not (path / CONFIG).exists():
        return None
    if not (path / IDENTITY).exists():
        raise ConfigError(f"{path} has a {CONFIG} but no {IDENTITY}: it was not written by "
                          "this version of jaxzero; choose another trainer.run_dir")
    saved = json.loads((path / IDENTITY).read_text())
    old, new = config_lib.flatten(config_files.load_config(path / CONFIG)), \
        config_lib.flatten(cfg)
    differ = [f"{k}: {config_lib.show_value(old[k])} in the run, "
              f"{config_lib.show_value(new[k])} now"
              for k in new if k not in NOT_COMPARED and old.get(k) != new[k]]
    now = resolved_paths(cfg)
    differ += [f"{k}: {saved['paths'][k]} in the run, {now[k]} now"
               for k in PATH_KEYS if saved["paths"].get(k) != now[k]]
    if differ:
        more = len(differ) - _MAX_NAMED
        raise ConfigError(
            f"{path} holds a run of another config ({'; '.join(differ[:_MAX_NAMED])}"
            + (f"; and {more} more" if more > 0 else "") + "). To continue that run, use its "
            f"values (they are in {path / CONFIG}); for a new run, choose another "
            "trainer.run_dir")
    return saved


# ---------------------------------------------------------------- data

def fingerprint(files: dict[str, Path | None]) -> dict[str, Any]:
    """{name: {"file", "bytes", "sha256"} or None}: the content hash of each prepared file."""
    out: dict[str, Any] = {}
    for name, file in files.items():
        if file is None:
            out[name] = None
            continue
        digest, size = hashlib.sha256(), 0
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        out[name] = {"file": str(Path(file).resolve()), "bytes": size,
                     "sha256": digest.hexdigest()}
    return out


def _digest(entry: dict | None) -> str | None:
    return None if entry is None else entry["sha256"]


def _describe(entry: dict | None) -> str:
    if entry is None:
        return "(none)"
    return f"{entry['file']} ({entry['bytes']} bytes, sha256 {entry['sha256'][:12]})"


def check_token_ids(records: list[dict], file: Path, vocab_size: int) -> None:
    """Refuses a prompt token id outside [0, vocab_size), naming file, line and id: the model
    would embed it silently as some other token (a gather clamps out-of-range ids)."""
    for record in records:
        bad = [t for t in record["prompt_token_ids"] if not 0 <= t < vocab_size]
        if bad:
            raise DataError(f"{file}:{_line_of(file, record['id'])}: prompt token id {bad[0]} is "
                            f"outside the model's vocabulary (ids 0 to {vocab_size - 1}); "
                            "was it prepared with another model's tokenizer? Re-run "
                            "`jaxzero prepare-data` with this model's tokenizer")


def _line_of(file: Path, record_id: str) -> int | str:
    """The line of the record with this id in a JSONL file (records may have been dropped
    since, so their position says nothing); '?' when it is not found."""
    for number, raw in enumerate(Path(file).read_bytes().split(b"\n"), start=1):
        if raw.strip():
            try:
                if json.loads(raw).get("id") == record_id:
                    return number
            except (ValueError, AttributeError):
                continue
    return "?"


# ---------------------------------------------------------------- atomic writes

def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}{_TMP}")


def _write_atomic(path: Path, text: str) -> None:
    """`path` holds either its old content or all of `text`, never a torn write."""
    tmp = _tmp_name(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
