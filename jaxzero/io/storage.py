"""Where checkpoints can live: local paths, remote URLs (gs://, s3://, az://) through etils
epath, and the mounts on which orbax's commit by directory rename is not atomic."""

from __future__ import annotations

import os
from pathlib import Path

REMOTE_SCHEMES = ("gs://", "s3://", "az://")
# Object stores mounted as a filesystem: a directory rename copies and deletes object by
# object (gcsfuse refuses it outright on a flat bucket unless --rename-dir-limit allows it),
# so a save killed during its commit can leave a step half there.
NON_ATOMIC_FILESYSTEMS = frozenset({
    "fuse.gcsfuse", "fuse.s3fs", "fuse.goofys", "fuse.mountpoint-s3", "fuse.rclone",
    "fuse.blobfuse", "fuse.blobfuse2"})
MOUNTINFO = Path("/proc/self/mountinfo")


def is_remote(path: str | os.PathLike) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def storage_path(path: str | os.PathLike):
    """An absolute local `Path`, or an etils `epath.Path` for a remote URL (a pathlib `Path`
    would fold `gs://b` into `gs:/b`)."""
    if is_remote(path):
        from etils import epath
        return epath.Path(str(path))
    return Path(path).absolute()


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
