"""What a plan compiles for: this machine's devices (simulated CPU devices included), or a
TPU topology compiled for without any TPU attached.

XLA:TPU compiles for a topology description alone ("deviceless"): libtpu builds the real
chip's programs, memory analysis and cost model on a CPU-only host, and nothing executes. A
target names the platform, its devices and, for TPUs, the chip's public peaks, which turn
XLA's cost model into roofline bounds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from jaxzero.errors import ConfigError

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One device's public peaks, as a JAX device sees it (v4 and v5p: one megacore chip)."""

    name: str
    bf16_flops: float     # dense bfloat16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    hbm_bytes: int


# Google Cloud's published per-chip figures.
CHIPS = {
    "v4": Chip("TPU v4", 275e12, 1228e9, 32 * GiB),
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16 * GiB),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95 * GiB),
    "v6e": Chip("TPU v6e", 918e12, 1640e9, 32 * GiB),
}

_TPU = re.compile(r"tpu:(?P<chip>v[0-9a-z]+):(?P<shape>[0-9]+(x[0-9]+){1,2})")
_CPU = re.compile(r"cpu:(?P<devices>[1-9][0-9]*)")
EXAMPLES = "tpu:v5e:4x4, tpu:v5p:2x2x1, tpu:v6e:2x4, tpu:v4:2x2x1 or cpu:8"


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A parsed `--target` (nothing imported or compiled yet)."""

    platform: str                 # "cpu" or "tpu"
    cpu_devices: int | None = None
    topology: str | None = None   # e.g. "v5e:4x4"
    chip: Chip | None = None

    @property
    def name(self) -> str:
        return f"tpu:{self.topology}" if self.platform == "tpu" else f"cpu:{self.cpu_devices}"


def parse_target(text: str) -> TargetSpec:
    """'tpu:v5e:4x4' or 'cpu:8' -> TargetSpec; anything else is refused with the forms."""
    cpu, tpu = _CPU.fullmatch(text), _TPU.fullmatch(text)
    if cpu:
        return TargetSpec("cpu", cpu_devices=int(cpu["devices"]))
    if not tpu:
        raise ConfigError(f"--target {text!r}: expected e.g. {EXAMPLES}")
    if tpu["chip"] not in CHIPS:
        raise ConfigError(f"--target {text!r}: unknown TPU generation {tpu['chip']!r}; "
                          f"known: {', '.join(CHIPS)}")
    return TargetSpec("tpu", topology=f"{tpu['chip']}:{tpu['shape']}", chip=CHIPS[tpu["chip"]])


def prepare_environment(spec: TargetSpec) -> None:
    """Environment the target needs, set before jax is imported."""
    if spec.platform == "cpu":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={spec.cpu_devices}")
        os.environ["JAX_PLATFORMS"] = "cpu"
        return
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"--target {spec.name} compiles with libtpu, which is not installed: "
                          "pip install 'jaxzero[tpu]' (no TPU is needed)")
    # Nothing runs on a TPU: the CPU is the only backend, and libtpu only compiles. Its
    # lockfile (one TPU user per host) would refuse a second planner on the same machine.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def target_devices(spec: TargetSpec) -> list:
    """The devices to build the mesh of: this process's (CPU), or the topology's (TPU)."""
    import jax
    if spec.platform == "cpu":
        return jax.devices()
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(topology_name=spec.topology,
                                                 platform="tpu").devices)
    except Exception as err:  # libtpu's own message says which part of the name it rejects
        raise ConfigError(f"--target {spec.name}: libtpu does not know this topology "
                          f"({str(err).splitlines()[0]}); e.g. {EXAMPLES}") from None


def device_peaks(spec: TargetSpec, devices) -> Chip | None:
    """The chip's peaks per JAX device: a topology that exposes each TensorCore of a
    two-core chip as its own device (libtpu's default for v4) gets half a chip each."""
    if spec.chip is None:
        return None
    chips = math.prod(int(n) for n in spec.topology.split(":")[1].split("x"))
    share = chips / len(devices)
    return dataclasses.replace(spec.chip, bf16_flops=spec.chip.bf16_flops * share,
                               hbm_bandwidth=spec.chip.hbm_bandwidth * share,
                               hbm_bytes=int(spec.chip.hbm_bytes * share))


def devices_per_host(devices) -> int:
    """Devices that share the first device's host (the span a tensor layout may take)."""
    return sum(d.process_index == devices[0].process_index for d in devices)
