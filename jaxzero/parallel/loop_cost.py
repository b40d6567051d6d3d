"""XLA's cost model of a compiled program with every while loop counted as often as it runs.

`compiled.cost_analysis()` (XLA's HloCostAnalysis) charges a while loop's body once, whatever
its trip count: a program that scans 28 decoder layers over 4 micro-batches is charged one
layer of one micro-batch. `loop_cost` reads the optimized HLO, finds each loop's trip count
(from XLA's annotation, or the constant bound of a condition that is exactly `i < N`, as
`lax.scan`, `lax.map` and `fori_loop` produce), costs each loop body alone (the module re-entered at
the body, analysed by the CPU client's HloCostAnalysis) and scales the compiler's own
figures by the counted-over-charged ratio. A loop whose bound is not a constant (a
`while_loop` that stops on data) keeps XLA's single count, and is listed.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax

_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$")
_WHILE = re.compile(r"= .*? while\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_CALLEES = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)"
                      r"=%?([\w.\-]+)|branch_computations=\{([^}]*)\}")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONSTANT = re.compile(r"%?([\w.\-]+) = s(?:32|64)\[\]\S* constant\((-?\d+)\)")
_LESS_THAN = re.compile(r"compare\(%?([\w.\-]+), %?([\w.\-]+)\), direction=LT")


@dataclasses.dataclass(frozen=True)
class LoopCost:
    """Per-device FLOPs and bytes accessed of one call, loops counted; and the loops whose
    trip count could not be read (each charged once, as XLA does)."""

    flops: float
    bytes_accessed: float
    uncounted: tuple[str, ...] = ()


def _computations(hlo: str) -> tuple[str, dict[str, list[str]]]:
    """(the entry's name, {computation name: its instruction lines})."""
    entry, bodies, current = None, {}, None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            bodies[current] = []
            if header.group(1):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            bodies[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return entry, bodies


def _trip_count(while_line: str, condition: list[str]) -> int | None:
    """The loop's trip count: XLA's annotation, or N when the condition is exactly a counter
    compared `< N` (JAX's scan, map and fori_loop count from 0 by 1). A condition that also
    tests data (`while_loop` stopping early) has none."""
    known = _KNOWN_TRIPS.search(while_line)
    if known:
        return int(known.group(1))
    constants = {m.group(1): int(m.group(2)) for line in condition
                 for m in [_CONSTANT.search(line)] if m}
    root = next((line for line in condition if line.lstrip().startswith("ROOT ")), "")
    compare = _LESS_THAN.search(root)
    if compare is None or compare.group(2) not in constants:
        return None
    return constants[compare.group(2)]


def _callees(line: str) -> list[str]:
    names = []
    for match in _CALLEES.finditer(line):
        if match.group(1):
            names.append(match.group(1))
        else:
            names += [n.strip().lstrip("%") for n in match.group(2).split(",")]
    return names


def _analysis(hlo: str, entry: str, name: str) -> dict[str, float]:
    """HloCostAnalysis of the module re-entered at computation `name`."""
    from jaxlib import _hlo
    from jax._src.lib import _jax
    lines = hlo.splitlines()
    header = 0 if lines[0].startswith("HloModule") else None
    out = []
    for i, line in enumerate(lines):
        if i == header:
            out.append(f"HloModule cost_of_{name.replace('.', '_')}")
            continue
        match = _HEADER.match(line)
        if match and match.group(2) in (entry, name):
            line = ("ENTRY " if match.group(2) == name else "") + line.removeprefix("ENTRY ")
        out.append(line)
    module = _hlo.hlo_module_from_text("\n".join(out))
    return _jax.hlo_module_cost_analysis(_cpu_client(), module)


@functools.cache
def _cpu_client():
    return jax.devices("cpu")[0].client


def loop_cost(compiled) -> LoopCost:
    """FLOPs and bytes accessed of one call of `compiled` (a `jax.stages.Compiled`), every
    while loop counted for its trip count. XLA's own figures, times what its analysis
    charges the module with loops counted over what it charges with each body once."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    flops, accessed = float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0))
    hlo = compiled.as_text()
    entry, bodies = _computations(hlo)
    loops, uncounted = [], []

    def visit(name: str, times: int) -> None:
        """Every loop reachable from computation `name`, which runs `times` times a call."""
        for line in bodies.get(name, []):
            found = _WHILE.search(line)
            if not found:
                for callee in _callees(line):
                    visit(callee, times)
                continue
            condition, body = found.groups()
            trips = _trip_count(line, bodies.get(condition, []))
            if trips is None:
                uncounted.append(body)
            loops.append((body, times, trips or 1))
            visit(body, times * (trips or 1))

    visit(entry, 1)
    if all(trips == 1 for _, _, trips in loops):
        return LoopCost(flops, accessed, tuple(uncounted))
    whole = _analysis(hlo, entry, entry)
    extra = {"flops": 0.0, "bytes accessed": 0.0}
    for body, times, trips in loops:
        if trips > 1:
            once = _analysis(hlo, entry, body)
            for key in extra:
                extra[key] += (trips - 1) * times * float(once.get(key, 0.0))
    scale = lambda key, ours: ours * (1 + extra[key] / whole[key]) if whole.get(key) else ours
    return LoopCost(scale("flops", flops), scale("bytes accessed", accessed), tuple(uncounted))
