"""Shared pools: draft and target pools that several routers on one Ray cluster use at once,
so that no router is a single point of failure (docs/deploy.md, "Several routers").

A shared pool is a set of detached, named actors (Ray keeps them when the router that
started them exits) listed in the pool directory, itself a detached named actor
(DIRECTORY_NAME in the config's Ray namespace). The first router to start claims the right
to create a pool, starts its actors and lists them once loaded; routers that start later, or
a router that restarts, find the listing and attach to the same actors by name, loading
nothing. Every router refreshes its view of each pool from the directory once a heartbeat
(replicas added, draining or gone), and lists its view again if the directory lost it (the
directory actor restarted).

One router at a time scales a shared pool: the holder of the pool's scaling lease, renewed
each autoscaler tick and taken over by another router once it lapses (its holder died). Its
demand signal is the requests the pool's actors hold, whichever router sent them, plus its
own queue. A draining replica is retired once its actors hold no request, after the other
routers have had `settle_s` to see it draining.

A router that dies leaves its requests' state (KV caches) on the actors. Each router keeps a
lease in the directory (`router:<owner>`, for router_lease_s, renewed every sixth of it) and prefixes the
keys of its requests' state with its owner id (actors/engine.py); once a router's lease has
lapsed, the others' heartbeat closes whatever state its keys still hold.

Why a directory actor rather than Ray's actor list (ray.util.state): the state API goes
through the dashboard, which a cluster may run without, and it cannot say which replicas are
draining or who may create and scale; the directory holds that in ~100 lines.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tandem.actors.remote import control_call

log = logging.getLogger("tandem.directory")

DIRECTORY_NAME = "tandem-pools"
ROUTER_LEASE_S = 30.0  # default: a router unheard of this long is gone, its requests' state closed


class PoolDirectory:
    """The listing of shared pools (a detached Ray actor): per pool, the fingerprint of its
    spec and its replicas' records ({"name", "shards", "pg", "draining"}); leases by key."""

    def __init__(self):
        self._pools: dict[str, dict] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._version = 0

    def ping(self) -> int:
        return os.getpid()

    def claim(self, key: str, owner: str, ttl_s: float) -> bool:
        """Take or renew the lease `key` for ttl_s; False while another owner holds it."""
        now = time.monotonic()
        holder = self._leases.get(key)
        if holder is not None and holder[0] != owner and holder[1] > now:
            return False
        self._leases[key] = (owner, now + ttl_s)
        return True

    def release(self, key: str, owner: str) -> None:
        if self._leases.get(key, ("",))[0] == owner:
            del self._leases[key]

    def holder(self, key: str) -> str | None:
        holder = self._leases.get(key)
        return holder[0] if holder is not None and holder[1] > time.monotonic() else None

    def pool(self, key: str) -> dict | None:
        rec = self._pools.get(key)
        return None if rec is None else {**rec, "members": [dict(m) for m in rec["members"]]}

    def pools(self) -> dict[str, dict]:
        return {k: self.pool(k) for k in self._pools}

    def create(self, key: str, fingerprint: str, members: list[dict]) -> bool:
        """List a pool unless it is listed already (then False: attach to that one)."""
        if key in self._pools:
            return False
        self._version += 1
        self._pools[key] = {"fingerprint": fingerprint, "members": [dict(m) for m in members], "version": self._version}
        return True

    def add(self, key: str, member: dict) -> None:
        self._change(key)["members"].append(dict(member))

    def mark_draining(self, key: str, name: str) -> None:
        for m in self._change(key)["members"]:
            if m["name"] == name:
                m["draining"] = True

    def remove(self, key: str, name: str) -> None:
        rec = self._change(key)
        rec["members"] = [m for m in rec["members"] if m["name"] != name]

    def drop(self, key: str) -> dict | None:
        return self._pools.pop(key, None)

    def _change(self, key: str) -> dict:
        if key not in self._pools:
            raise KeyError(f"pool {key!r} is not listed")
        self._version += 1
        self._pools[key]["version"] = self._version
        return self._pools[key]


def directory():
    """The cluster's pool directory actor, started (detached, no CPU) if none runs yet."""
    import ray

    return ray.remote(PoolDirectory).options(
        name=DIRECTORY_NAME, lifetime="detached", get_if_exists=True, num_cpus=0, max_restarts=-1,
        max_task_retries=-1, enable_task_events=False,
    ).remote()


def spec_fingerprint(spec: Any) -> str:
    """What routers sharing a pool must agree on: its model and how it is loaded and run
    (replica counts aside: they change with traffic)."""
    load = spec.load
    parts = (type(spec).__name__, getattr(spec, "name", ""), load.path, load.dtype, load.device, load.quantize,
             tuple(load.exits), load.exit_adapters, getattr(spec, "shards", 1), spec.threads, spec.kv_budget_bytes)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def router_prefix(pid: int) -> str:
    """How the ids of the routers a process runs begin (host:pid:): what its request keys on
    the actors start with."""
    return f"{socket.gethostname()}:{pid}:"


def router_id() -> str:
    return f"{router_prefix(os.getpid())}{uuid.uuid4().hex[:6]}"


@dataclass
class SharedPool:
    """One router's tie to one shared pool (held by the pool: actors/pools.py _Pool.shared)."""

    key: str  # "draft" or "target:<name>"
    owner: str = field(default_factory=router_id)
    settle_s: float = 4.0  # a draining replica is kept this long before it may retire
    lease_s: float = 10.0  # the scaling lease lapses this long after its holder's last tick
    router_lease_s: float = ROUTER_LEASE_S  # this router's liveness lease (keep_router_lease)
    version: int = -1  # the directory version this router's view is at
    handle: Any = None

    @property
    def directory(self):
        if self.handle is None:
            self.handle = directory()
        return self.handle

    def actor_name(self, suffix: str = "") -> str:
        return f"tandem-{self.key.replace(':', '-')}-{uuid.uuid4().hex[:8]}{suffix}"

    def call(self, method: str, *args, timeout_s: float = 30.0):
        import ray

        return ray.get(getattr(self.directory, method).remote(*args), timeout=timeout_s)

    def may_scale(self) -> bool:
        """Whether this router holds (and has just renewed) the pool's scaling lease."""
        try:
            return bool(self.call("claim", f"scale:{self.key}", self.owner, self.lease_s, timeout_s=5.0))
        except Exception:  # noqa: BLE001 - no directory answer: do not scale this tick
            log.exception("scaling lease of %s: no answer from the pool directory", self.key)
            return False


class Shareable:
    """What a pool (actors/pools.py _Pool) does when shared; no-ops for an unshared pool.
    Kept here, beside the directory it talks to. The pool provides members, chooser, spec,
    shared, member_type and end()."""

    shared: SharedPool | None

    def member_from(self, rec: dict):
        """A replica the directory lists, by its actors' names."""
        import ray

        return self.member_type(
            handle=ray.get_actor(rec["name"]),
            shards=[ray.get_actor(n) for n in rec.get("shards", [])],
            pg=ray.util.get_placement_group(rec["pg"]) if rec.get("pg") else None,
            name=rec["name"], shard_names=tuple(rec.get("shards", [])), pg_name=rec.get("pg"),
            draining=bool(rec.get("draining")), draining_since=time.monotonic() if rec.get("draining") else 0.0,
        )

    @staticmethod
    def record(m) -> dict:
        return {"name": m.name, "shards": list(m.shard_names), "pg": m.pg_name, "draining": m.draining}

    def sync(self) -> None:
        """A shared pool: take the directory's view (replicas another router added, drained
        or retired); list this router's view again if the directory lost it. No-op otherwise."""
        shared = self.shared
        if shared is None:
            return
        listed = shared.call("pool", shared.key, timeout_s=10.0)
        if listed is None:  # the directory restarted empty: list what this router knows
            records = [self.record(m) for m in self.members if not m.retired]
            shared.call("create", shared.key, spec_fingerprint(self.spec), records)
            log.warning("pool directory had no %s: listed this router's %d replicas again", shared.key, len(records))
            return
        if listed["version"] == shared.version:
            return
        by_name = {rec["name"]: rec for rec in listed["members"]}
        known = {m.name for m in self.members if not m.retired}
        new, missing = [], []
        for name, rec in by_name.items():
            if name not in known:
                try:
                    new.append(self.member_from(rec))
                except ValueError:  # listed, but no such actor (ended outside tandem): skipped
                    missing.append(name)
        if missing:
            log.warning("%s: the directory lists replicas with no actor, skipped: %s", shared.key, ", ".join(missing))
        with self.chooser._lock:
            for m in self.members:
                if m.retired:
                    continue
                if m.name not in by_name:
                    m.retired = True  # retired by another router: its actors are gone
                elif by_name[m.name]["draining"] and not m.draining:
                    m.draining, m.draining_since = True, time.monotonic()
        for m in new:
            self.chooser.place(m)
        shared.version = listed["version"] if not missing else -1  # look again next time

    def close_orphans(self) -> int:
        """A shared pool: close the state other routers left on its actors once their lease
        has lapsed (they died); how many requests were closed."""
        import ray

        shared = self.shared
        if shared is None:
            return 0
        alive: dict[str, bool] = {shared.owner: True}
        closed = 0
        for m in [m for m in self.members if not m.retired]:
            for key in self._live_keys(m) or ():
                owner, sep, _ = key.partition("/")
                if not sep:
                    continue  # not a shared-pool router's key
                if owner not in alive:
                    alive[owner] = shared.call("holder", f"router:{owner}", timeout_s=10.0) is not None
                if not alive[owner]:
                    try:
                        ray.get(m.handle.close.remote(key), timeout=30.0)
                        closed += 1
                    except Exception:  # noqa: BLE001 - gone meanwhile, or the actor is down
                        pass
        if closed:
            log.warning("%s: closed %d requests of routers that are gone (%s)", shared.key, closed,
                        ", ".join(o for o, up in alive.items() if not up))
        return closed

    def may_scale(self) -> bool:
        """Whether this router scales the pool now (a shared pool: it holds the lease)."""
        return True if self.shared is None else self.shared.may_scale()

    def idle(self, member) -> bool:
        """A draining replica may retire: no request of this router on it (a shared pool:
        every router has had settle_s to see it draining, and its actor holds no request)."""
        if member.inflight > 0:
            return False
        if self.shared is None:
            return True
        if time.monotonic() - member.draining_since < self.shared.settle_s:
            return False
        return self._live(member) <= 0  # none held, or its actor is gone

    def shared_load(self) -> int:
        """Requests in flight on a shared pool's serving replicas, every router's, as their
        actors hold them (this router's count where an actor does not answer)."""
        return sum(max(m.inflight, self._live(m)) for m in self.members if m.serving)

    def _live(self, member) -> int:
        """Requests the replica's front actor holds, from every router (-1: no answer)."""
        keys = self._live_keys(member)
        return -1 if keys is None else len(keys)

    @staticmethod
    def _live_keys(member) -> list[str] | None:
        """The keys of the requests the replica's front actor holds (None: no answer)."""
        import ray

        try:
            return list(ray.get(control_call(member.handle, "live_requests"), timeout=5.0))
        except Exception:  # noqa: BLE001 - dead or restarting
            return None



_router_leases: dict[str, threading.Thread] = {}


def keep_router_lease(shared: SharedPool) -> None:
    """Renew this router's liveness lease in the directory for as long as the process runs
    (one thread per router, whatever number of pools it shares)."""
    import ray

    owner, ttl = shared.owner, shared.router_lease_s
    shared.call("claim", f"router:{owner}", owner, ttl)
    if owner in _router_leases:
        return

    def renew() -> None:
        while True:
            time.sleep(ttl / 6)
            try:  # the directory as it is now (it may have restarted), never a new one
                handle = ray.get_actor(DIRECTORY_NAME)
            except ValueError:  # ended (tandem pools-down): no pools left to hold a lease on
                _router_leases.pop(owner, None)
                return
            try:
                ray.get(handle.claim.remote(f"router:{owner}", owner, ttl), timeout=10.0)
            except Exception:  # noqa: BLE001 - restarting: try again next round
                log.warning("router lease: no answer from the pool directory")

    _router_leases[owner] = thread = threading.Thread(target=renew, name="router-lease", daemon=True)
    thread.start()


def attach_or_create(pool: Any, shared: SharedPool, spec: Any, count: int, *, timeout_s: float) -> tuple[list, bool]:
    """The pool's members: attached from the directory's listing, or started by this router
    (count replicas) when it wins the pool's creation lease. (members, created)."""
    keep_router_lease(shared)
    fingerprint = spec_fingerprint(spec)
    deadline = time.monotonic() + 2 * timeout_s + 30.0
    while True:
        listed = shared.call("pool", shared.key)
        if listed is not None:
            if listed["fingerprint"] != fingerprint:
                raise ValueError(
                    f"ray.shared_pools: pool {shared.key!r} on this cluster was started with another "
                    f"model or loading options; routers sharing pools need the same draft_pool and targets "
                    f"(or stop the old pools: tandem pools-down)"
                )
            shared.version = listed["version"]
            try:
                return [pool.member_from(rec) for rec in listed["members"]], False
            except ValueError as exc:
                raise ValueError(f"ray.shared_pools: pool {shared.key!r} lists a replica whose actor is gone ({exc}); "
                                 f"end the pools with `tandem pools-down` and start again") from None
        if shared.call("claim", f"create:{shared.key}", shared.owner, timeout_s + 30.0):
            members = pool.launch_loaded(count, timeout_s=timeout_s)
            if not shared.call("create", shared.key, fingerprint, [pool.record(m) for m in members]):
                pool.end(members)  # listed meanwhile by a router whose lease had lapsed: use that
                continue
            shared.call("release", f"create:{shared.key}", shared.owner)
            shared.version = shared.call("pool", shared.key)["version"]
            return members, True
        if time.monotonic() > deadline:
            raise TimeoutError(f"pool {shared.key!r}: another router holds its creation and listed nothing "
                               f"within {deadline:.0f}s")
        time.sleep(1.0)


def pools_down(*, namespace: str | None = None, timeout_s: float = 30.0) -> dict[str, int]:
    """End every shared pool the directory in `namespace` (default: this driver's) lists
    (their actors and placement groups), then the directory: `tandem pools-down`. Replicas
    ended per pool."""
    import ray

    try:
        handle = ray.get_actor(DIRECTORY_NAME, namespace=namespace)
    except ValueError:
        return {}
    ended = {}
    for key, rec in ray.get(handle.pools.remote(), timeout=timeout_s).items():
        for m in rec["members"]:
            end_record(m, namespace=namespace)
        ended[key] = len(rec["members"])
    ray.kill(handle, no_restart=True)
    return ended


def end_record(rec: dict, *, namespace: str | None = None) -> None:
    """End one listed replica's actors and free its placement group."""
    import ray

    for name in [rec["name"], *rec.get("shards", [])]:
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
    if rec.get("pg"):
        try:
            ray.util.remove_placement_group(ray.util.get_placement_group(rec["pg"]))
        except Exception:  # noqa: BLE001
            pass
