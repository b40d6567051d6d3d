"""Test setup: eight simulated CPU devices, set before jax is imported."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# libtpu (the tpu extra) compiles for TPU topologies in the planner's tests; its lockfile
# would otherwise refuse a second process on the machine.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Compiled programs are cached across tests and the subprocesses they start (several runs of
# the same tiny model compile the same train step); only compiles worth keeping are stored.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "jaxzero-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# Test files in the subfolders import their shared fixtures as `helpers` (tests/helpers.py).
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
