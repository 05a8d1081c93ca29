"""Turns on a node's cores: pool actors on one CPU node whose threads each take every core
run their model work one at a time, in turn, instead of at once.

Why: with many requests in flight the draft actor and the target actor are no longer in step
(one request drafts while another's block is verified), so both would compute at once; on a
CPU each then runs on cores the other's threads also spin on, and both slow down far more
than twice. Measured through gRPC on the 2-core AMX host (1.5B pack target and the 0.5B int4
draft, two threads each, 8 code requests in flight, `sd`): a verification of 24 rows took
391 ms and a 2-step draft 393 ms, where each alone costs ~200 and ~60 (docs/deploy.md,
"Gathering a batch"). One request alone already runs in turn (it waits for its own draft),
so the turns change nothing there.

How: an advisory file lock per node (fcntl.flock; the kernel lets it go if a process dies)
held for each batch. A process waiting for it gets it next even while another takes turns
back to back: measured here, a waiter against a process holding 10 ms turns with no gap got
its turn after the one in progress, 10 times of 10 (so no turnstile of our own is needed).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from typing import Iterator


class CoreTurns:
    """The lock of one node (`node` names it: its Ray node id)."""

    def __init__(self, node: str, *, directory: str | None = None):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", node)[:64]
        self.path = os.path.join(directory or tempfile.gettempdir(), f"tandem-cores-{safe}.lock")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # held for the process's life

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the node's cores for the block (one thread per process may use this)."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


def node_turns(device_type: str, threads: int) -> CoreTurns | None:
    """The turns for a pool actor on this node: where it computes on the CPU with every
    core the node gives it (threads >= available cores) inside Ray, else None (it shares
    nothing: a GPU, cores split by `threads`, or a process outside Ray)."""
    from tandem.actors.devices import available_threads, node_placement

    if device_type != "cpu" or threads < available_threads():
        return None
    node = node_placement().get("node_id")
    return CoreTurns(node) if node else None
