"""Checkpoint storage: remote URLs kept as URLs, and the mounts that cannot commit atomically."""

from pathlib import Path

import pytest

from jaxzero.io.checkpoint import CheckpointStore
from jaxzero.io.storage import is_remote, mount_of, non_atomic_warning, storage_path

# A fake /proc/self/mountinfo: root on ext4, a gcsfuse bucket (its mount point has a space,
# escaped as mountinfo writes it), an NFS share, and a tmpfs mounted inside the bucket.
MOUNTINFO = """\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
95 22 0:50 / /mnt/my\\040bucket rw,nosuid,nodev,relatime shared:60 - fuse.gcsfuse demo-bucket rw,user_id=0,group_id=0
96 22 0:51 / /mnt/share rw,relatime shared:61 - nfs4 filestore:/vol1 rw,vers=4.1
97 95 0:52 / /mnt/my\\040bucket/scratch rw,relatime shared:62 - tmpfs tmpfs rw
98 22 0:53 / /mnt/sharedthing rw,relatime - fuse.gcsfuse other-bucket rw
"""


@pytest.mark.parametrize("path,mount", [
    ("/home/u/runs/demo", ("/", "ext4")),
    ("/mnt/my bucket", ("/mnt/my bucket", "fuse.gcsfuse")),
    ("/mnt/my bucket/runs/7b/checkpoints", ("/mnt/my bucket", "fuse.gcsfuse")),
    ("/mnt/my bucket/scratch/x", ("/mnt/my bucket/scratch", "tmpfs")),
    ("/mnt/share/runs", ("/mnt/share", "nfs4")),
    ("/mnt/sharedthing/runs", ("/mnt/sharedthing", "fuse.gcsfuse")),  # not /mnt/share
])
def test_mount_of_finds_the_deepest_mount(path, mount):
    assert mount_of(path, MOUNTINFO) == mount


def test_only_object_store_mounts_are_warned_about():
    warning = non_atomic_warning("/mnt/my bucket/runs/7b", MOUNTINFO)
    assert warning.startswith("/mnt/my bucket/runs/7b is on a fuse.gcsfuse mount "
                              "(/mnt/my bucket): renaming a directory there is not atomic")
    assert "trainer.checkpoint_dir=gs://BUCKET/PATH" in warning
    for fine in ("/home/u/runs/demo", "/mnt/share/runs", "/mnt/my bucket/scratch/x",
                 "gs://bucket/runs/7b"):
        assert non_atomic_warning(fine, MOUNTINFO) is None, fine
    assert mount_of("/x", "garbage line\n") is None


def test_this_machines_own_mountinfo_parses(tmp_path):
    text = Path("/proc/self/mountinfo").read_text()
    assert mount_of(tmp_path, text) is not None
    assert non_atomic_warning(tmp_path) is None


def test_remote_urls_stay_urls(tmp_path):
    assert is_remote("gs://b/run") and is_remote("s3://b/run") and not is_remote("/gs/b")
    remote = storage_path("gs://bucket/run/checkpoints")
    assert str(remote / "3") == "gs://bucket/run/checkpoints/3"   # pathlib would drop a '/'
    assert storage_path("rel/dir") == Path("rel/dir").absolute()
    # A local store lists only committed steps: a temporary directory is no step.
    (tmp_path / "4.orbax-checkpoint-tmp").mkdir()
    (tmp_path / "3").mkdir()
    assert CheckpointStore(tmp_path).committed_steps() == [3]
    assert CheckpointStore(tmp_path / "none").committed_steps() == []
