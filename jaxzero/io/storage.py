"""Where runs and checkpoints can live: local paths, remote URLs (gs://, s3://, az://) through
etils epath, the local mirror of a remote run directory and the copies between them, and the
mounts on which orbax's commit by directory rename is not atomic."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REMOTE_SCHEMES = ("gs://", "s3://", "az://")
# Object stores mounted as a filesystem: a directory rename copies and deletes object by
# object (gcsfuse refuses it outright on a flat bucket unless --rename-dir-limit allows it),
# so a save killed during its commit can leave a step half there.
NON_ATOMIC_FILESYSTEMS = frozenset({
    "fuse.gcsfuse", "fuse.s3fs", "fuse.goofys", "fuse.mountpoint-s3", "fuse.rclone",
    "fuse.blobfuse", "fuse.blobfuse2"})
MOUNTINFO = Path("/proc/self/mountinfo")
# The fsspec filesystem etils epath reads each scheme through (without tensorflow installed).
FSSPEC_PACKAGES = {"gs://": "gcsfs", "s3://": "s3fs", "az://": "adlfs"}
MIRRORS = Path("~/.cache/jaxzero/runs")
TMP_SUFFIX = ".jaxzero-tmp"  # a file being written, renamed into place when whole


def is_remote(path: str | os.PathLike) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def storage_path(path: str | os.PathLike):
    """An absolute local `Path`, or an etils `epath.Path` for a remote URL (a pathlib `Path`
    would fold `gs://b` into `gs:/b`)."""
    if is_remote(path):
        from etils import epath
        return epath.Path(str(path))
    return Path(path).absolute()


def check_remote_support(url: str) -> None:
    """Refuses a remote URL whose filesystem package is not installed, before anything runs
    (epath would fail only at the first file it writes)."""
    import importlib.util

    import fsspec
    from jaxzero.errors import ConfigError
    scheme = url.split("://", 1)[0]
    if importlib.util.find_spec("tensorflow") is not None:
        return  # epath then reads gs:// through tf.io.gfile
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError):
        package = FSSPEC_PACKAGES[scheme + "://"]
        raise ConfigError(f"{url}: reading and writing {scheme}:// needs the {package} "
                          f"package; pip install {package}") from None


def local_mirror(url: str, local_dir: str | None = None) -> Path:
    """The local directory that mirrors the remote run directory `url`: `local_dir`, or
    ~/.cache/jaxzero/runs/<scheme>/<bucket>/<path>."""
    if local_dir is not None:
        return Path(local_dir).expanduser().absolute()
    scheme, rest = url.split("://", 1)
    return (MIRRORS / scheme / rest.strip("/")).expanduser().absolute()


def upload(local: Path, remote) -> None:
    """Copies a local file or directory tree to the remote path (each file one object write,
    so a reader sees a file whole or not at all)."""
    if local.is_dir():
        remote.mkdir(parents=True, exist_ok=True)
        for child in sorted(local.iterdir()):
            upload(child, remote / child.name)
    elif local.is_file():
        remote.write_bytes(local.read_bytes())


def download(remote, local: Path) -> None:
    """Copies a remote file or directory tree to `local`, each file written beside its place
    and renamed there, so an interrupted copy never leaves a torn file."""
    if remote.is_dir():
        local.mkdir(parents=True, exist_ok=True)
        for child in sorted(remote.iterdir(), key=str):
            download(child, local / child.name)
    elif remote.exists():
        tmp = local.with_name(f"{local.name}.{os.getpid()}{TMP_SUFFIX}")
        tmp.write_bytes(remote.read_bytes())
        os.replace(tmp, local)


def remove(path: Path) -> None:
    """Deletes a local file or directory tree, if there (a symlink itself, not its target)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_from(remote, local: Path) -> None:
    """Makes `local` a copy of the remote file or tree; deletes it where the remote has
    none (a mirror must not keep what its source no longer has)."""
    remove(local)
    if remote.exists():
        download(remote, local)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_of(path: str | os.PathLike, mountinfo: str) -> tuple[str, str] | None:
    """(mount point, filesystem type) of the mount holding `path`, from the text of a
    /proc/<pid>/mountinfo; None when no line covers it."""
    target = os.path.abspath(path)
    best: tuple[str, str] | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 5 or sep + 1 >= len(fields):
            continue
        point, fstype = _unescape(fields[4]), fields[sep + 1]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        # The deepest mount point wins; of equal ones, the last (it is mounted over the others).
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)
    return best


def non_atomic_warning(path: str | os.PathLike, mountinfo: str | None = None) -> str | None:
    """A warning when `path` sits on a mount that cannot commit a checkpoint atomically
    (gcsfuse and other object-store mounts); None otherwise, and for remote URLs (orbax
    commits those by a marker file instead of a rename)."""
    if is_remote(path):
        return None
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError:  # not Linux: nothing to read the mounts from
            return None
    found = mount_of(path, mountinfo)
    if found is None or found[1] not in NON_ATOMIC_FILESYSTEMS:
        return None
    point, fstype = found
    return (f"{path} is on a {fstype} mount ({point}): renaming a directory there is not "
            "atomic (gcsfuse refuses it on a flat bucket unless --rename-dir-limit is set), "
            "so a save killed during its commit can leave a broken step (on a bucket with "
            "hierarchical namespace folder renames are atomic: ignore this). Put checkpoints "
            "on gs:// directly (trainer.checkpoint_dir=gs://BUCKET/PATH), on local disk or "
            "on NFS")
