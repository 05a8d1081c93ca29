"""The heartbeat: every actor of the pools pinged on a fixed period; hung actors are taken
out of rotation and replaced, and replicas that answer again are restored."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Sequence

from tandem.actors.remote import control_call

log = logging.getLogger("tandem.health")


class HealthMonitor:
    """Pings every actor of the pools each `interval_s` (DraftWorker.ping and friends are
    answered on an actor's call threads, even mid-forward). An actor that gives no answer
    within `timeout_s` is hung (a stopped or wedged process): its replica leaves the
    rotation at once, its calls fail, and it is killed for Ray to restart (once per
    `restart_grace_s`, which also covers a restart's model load). A replica that answers
    again after any failure is restored."""

    def __init__(self, pools: Sequence[Any], *, interval_s: float = 2.0, timeout_s: float = 10.0, restart_grace_s: float = 300.0):
        self.pools = list(pools)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.restart_grace_s = restart_grace_s
        self.replacements = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s + self.timeout_s + 1.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a monitor never dies of one bad round
                log.exception("heartbeat round failed")

    def check(self) -> None:
        import ray

        for pool in self.pools:  # a shared pool: the directory's view, and dead routers' leftovers
            try:
                pool.sync()
                pool.close_orphans()
            except Exception:  # noqa: BLE001 - the directory did not answer: ping what is known
                log.exception("%s: no view from the pool directory", getattr(pool, "what", "pool"))
        pings = []  # (member, actor handle, ref)
        for pool in self.pools:
            for m in list(pool.members):
                if m.retired:  # scaled down: its actors are gone on purpose
                    continue
                for h in [m.handle, *m.shards]:
                    pings.append((m, h, control_call(h, "ping")))
        ready = set(ray.wait([r for _, _, r in pings], num_returns=len(pings), timeout=self.timeout_s)[0])
        silent: dict[int, list] = {}  # member -> its actors that gave no answer
        failed: set[int] = set()  # members with an actor that answered with an error
        for m, h, ref in pings:
            if ref not in ready:
                silent.setdefault(id(m), []).append(h)
                continue
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001 - dead or restarting: not hung, not healthy either
                failed.add(id(m))
        for pool in self.pools:
            for m in list(pool.members):
                if m.retired:
                    continue
                if id(m) in silent:
                    self._hung(m, silent[id(m)])
                elif id(m) in failed:
                    # dead or restarting (e.g. its node is gone): out of rotation for as long
                    # as its pings fail, not only for the cooldown after the first failure
                    if not m.failures:
                        m.mark_failed()
                    else:
                        m.failed_at = time.monotonic()
                else:
                    if m.hung or m.failures:
                        log.warning("actor replica answers again: back in rotation")
                    m.restore()

    def _hung(self, m: Any, handles: list) -> None:
        import ray

        now = time.monotonic()
        if not m.hung:
            log.warning("actor replica missed its heartbeat (%.0fs): out of rotation", self.timeout_s)
        m.hung = True
        if now - max(m.replaced_at, m.failed_at) < self.restart_grace_s:
            return  # killed (or failed) recently: it may still be restarting and loading
        m.mark_failed()
        m.replaced_at = now
        for h in handles:
            try:
                ray.kill(h, no_restart=False)  # Ray restarts it (max_restarts)
                self.replacements += 1
            except Exception:  # noqa: BLE001 - already gone
                pass
