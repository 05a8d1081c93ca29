"""Turns on a node's cores (actors/core_turns.py): processes holding turns never compute at
once; only a CPU actor using every core of its Ray node takes them."""

from __future__ import annotations

import multiprocessing as mp
import time

from tandem.actors.core_turns import CoreTurns, node_turns


def _intervals(directory: str, use_turns: bool, out, n: int = 15) -> None:
    turns = CoreTurns("node-a", directory=directory) if use_turns else None
    spans = []
    for _ in range(n):
        if turns is None:
            t0 = time.monotonic(); time.sleep(0.005); spans.append((t0, time.monotonic()))
            continue
        with turns.turn():
            t0 = time.monotonic(); time.sleep(0.005); spans.append((t0, time.monotonic()))
    out.put(spans)


def _overlaps(directory: str, use_turns: bool) -> int:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_intervals, args=(directory, use_turns, out)) for _ in range(2)]
    for p in procs:
        p.start()
    a, b = out.get(timeout=60), out.get(timeout=60)
    for p in procs:
        p.join(timeout=60)
    return sum(1 for s0, e0 in a for s1, e1 in b if s0 < e1 and s1 < e0)


def test_turns_never_overlap_across_processes(tmp_path):
    """Two processes, 15 turns of 5 ms each: with turns no two intervals overlap; the
    control, the same loops without turns, overlaps."""
    assert _overlaps(str(tmp_path), True) == 0
    assert _overlaps(str(tmp_path), False) > 0


def test_only_an_actor_using_every_core_of_a_cpu_node_takes_turns(monkeypatch):
    """No turns on a GPU, with cores split by `threads`, or outside Ray (no node id)."""
    from tandem.actors import devices

    monkeypatch.setattr(devices, "available_threads", lambda: 2)
    monkeypatch.setattr(devices, "node_placement", lambda: {"node_id": "n1", "node_cpus": 2})
    assert isinstance(node_turns("cpu", 2), CoreTurns)
    assert node_turns("cuda", 2) is None
    assert node_turns("cpu", 1) is None
    monkeypatch.setattr(devices, "node_placement", lambda: {"node_id": None, "node_cpus": 2})
    assert node_turns("cpu", 2) is None
