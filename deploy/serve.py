"""`tandem serve`: config -> Ray (embedded or joined) -> draft and target pools -> router
-> gRPC server, until SIGINT/SIGTERM. `build_app` is also what the service tests start."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from tandem.actors.engine import ActorEngine
from tandem.actors.autoscale import ScalePolicy
from tandem.actors.pools import DRAFT_POOL, DraftPool, DraftPoolSpec, TargetPool, TargetSpec, pool_resources
from tandem.actors.remote import ensure_ray, join_address, stop_ray
from tandem.actors.workers import ModelLoad
from tandem.deploy.config import TandemConfig
from tandem.deploy.models import default_thresholds, trained_exits_for
from tandem.deploy.packs import resolve_model_path
from tandem.services.router import Router, TargetRoute
from tandem.services.server import RunningServer, start_server
from tandem.speculation.goodput import GoodputPolicy
from tandem.speculation.plan import per_replica
from tandem.speculation.sorted_policy import ExitPolicy

log = logging.getLogger("tandem.serve")


def say(msg: str) -> None:
    print(f"[tandem] {msg}", file=sys.stderr, flush=True)


def pool_specs(cfg: TandemConfig, *, resolve=resolve_model_path) -> tuple[DraftPoolSpec, list[TargetSpec]]:
    from tandem.deploy.pack_grid import draft_quantize, resolver_for

    d = cfg.draft_pool
    dq = draft_quantize(d.model, d.quantize)
    draft = DraftPoolSpec(
        load=ModelLoad(
            path=d.model,
            dtype=d.dtype,
            device=d.device,
            quantize=dq,
            exits=tuple(d.exits),
            exit_adapters=trained_exits_for(d.model, d.exit_adapters),
            resolve=resolver_for(resolve, dq),
        ),
        replicas=d.replicas,
        threads=d.threads,
        placement=d.placement.to_placement(),
        kv_budget_bytes=d.kv_budget_bytes,
    )
    targets = [
        TargetSpec(
            name=t.name,
            load=_target_load(t, resolve),
            replicas=t.replicas,
            shards=t.shards,
            threads=t.threads,
            placement=t.placement.to_placement(),
            kv_budget_bytes=t.kv_budget_bytes,
            prefix_cache_bytes=t.prefix_cache_bytes,
        )
        for t in cfg.targets
    ]
    return draft, targets


def _target_load(t, resolve) -> ModelLoad:
    from tandem.deploy.pack_grid import resolver_for, target_quantize

    quantize = target_quantize(t.model_ref, t.quantize) if t.shards == 1 else None
    return ModelLoad(
        path=t.model_ref, dtype=t.dtype, device=t.device, quantize=quantize, resolve=resolver_for(resolve, quantize),
    )


@dataclass
class ServeApp:
    config: TandemConfig
    engine: ActorEngine
    router: Router
    server: RunningServer
    telemetry: object | None

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace: float = 5.0) -> None:
        await self.server.stop(grace)
        self.router.shutdown()
        if self.telemetry is not None:
            self.telemetry.shutdown()


def build_engine(cfg: TandemConfig, *, resolve=resolve_model_path) -> ActorEngine:
    if cfg.ray.shared_pools and not join_address(cfg.ray.address):
        raise ValueError("ray.shared_pools: needs a Ray cluster to join (ray.address, --address or RAY_ADDRESS); "
                         "an embedded Ray ends with its router, and its pools with it")
    if cfg.ray.shared_pools and not cfg.server.heartbeat_s:
        raise ValueError("ray.shared_pools: needs server.heartbeat_s; on each heartbeat a router takes the other "
                         "routers' pool changes and closes what a dead router left on the actors")
    draft_spec, target_specs = pool_specs(cfg, resolve=resolve)
    if join_address(cfg.ray.address):
        say(f"joining Ray at {join_address(cfg.ray.address)}")
    else:
        say("starting an embedded local Ray")
    ensure_ray(
        address=cfg.ray.address,
        num_cpus=cfg.ray.num_cpus or os.cpu_count(),
        # room for every pool at its most replicas (scaling with traffic)
        resources=pool_resources(
            replace(draft_spec, replicas=cfg.draft_pool.max_replicas or draft_spec.replicas),
            [replace(s, replicas=t.max_replicas or s.replicas) for s, t in zip(target_specs, cfg.targets)],
        ),
        namespace=cfg.ray.namespace,
    )
    timeout = cfg.draft_pool.load_timeout_s
    shared = shared_pools(cfg)
    t0 = time.time()
    say(f"{'shared' if shared else 'loading the'} draft pool: {cfg.draft_pool.model} x{cfg.draft_pool.replicas} ({cfg.draft_pool.quantize})")
    draft = DraftPool(draft_spec, timeout_s=timeout, shared=shared(DRAFT_POOL) if shared else None)
    adapters = draft_spec.load.exit_adapters
    say(f"draft pool ready in {time.time() - t0:.0f}s, exits {draft.info['exits']}, {kernel_note(draft.info)}; "
        + (f"trained exits from {adapters}" if adapters else
           f"no trained exits (exit_adapters: {cfg.draft_pool.exit_adapters}; see `tandem train-exits`)"))
    pools = {}
    for spec in target_specs:
        t1 = time.time()
        say(f"loading target {spec.name!r}: {spec.load.path} x{spec.replicas}" + (f", {spec.shards} shards" if spec.shards > 1 else "")
            + (f" ({spec.load.quantize})" if spec.load.quantize else ""))
        pools[spec.name] = TargetPool(spec, timeout_s=timeout, shared=shared(f"target:{spec.name}") if shared else None)
        say(f"target {spec.name!r} ready in {time.time() - t1:.0f}s, {kernel_note(pools[spec.name].info)}")
    return ActorEngine(
        draft,
        pools,
        heartbeat_s=cfg.server.heartbeat_s,
        heartbeat_timeout_s=cfg.server.heartbeat_timeout_s,
        restart_grace_s=cfg.draft_pool.load_timeout_s,
    )


def kernel_note(info: Mapping) -> str:
    """An actor's linear kernel for the ready lines, with the rows up to which its quantized
    kernels serve a block (measured at load, actors/kernels.py)."""
    rows = info.get("quant_max_rows")
    return f"kernel {info.get('kernel')}" + (f" (quantized up to {rows} rows)" if rows else "")


def shared_pools(cfg: TandemConfig):
    """With ray.shared_pools: pool key -> this router's SharedPool tie (actors/directory.py);
    None otherwise. A draining replica settles two heartbeats so every router sees it."""
    if not cfg.ray.shared_pools:
        return None
    from tandem.actors.directory import SharedPool, router_id

    owner = router_id()
    settle = 2 * (cfg.server.heartbeat_s or 2.0)
    return lambda key: SharedPool(key=key, owner=owner, settle_s=settle, router_lease_s=cfg.ray.router_lease_s)


def concurrency_points(max_concurrent: int) -> list[int]:
    """The batch sizes at which a target's batched cost is measured: 2, 4, 8, ... up to the
    requests that run on it at once (the goodput policy interpolates between them)."""
    points, b = [], 2
    while b < max_concurrent:
        points.append(b)
        b *= 2
    return points + [max_concurrent] if max_concurrent >= 2 else []


def overlap_pays(draft_info: Mapping, target_info: Mapping) -> bool:
    """Whether `auto` overlaps drafting with verification (PEARL) or runs them in turn (sd) for
    a target, from where its first actor and the draft pool's run (their `info()`): in turn
    where both share a node whose cores their threads oversubscribe, since both sides then
    compete for the same cores. Measured (2-core Intel Xeon with AMX, 1.5B pack on ggml, a
    draft and a target actor of 2 threads each, code_dev 5 x 96 through gRPC, 2026-12-05):
    overlapped 12.4 tok/s, the router fell back to off; in turn 18.5 tok/s against 12.8 off."""
    node = draft_info.get("node_id")
    if node is None or node != target_info.get("node_id"):
        return True
    cores = min(int(draft_info.get("node_cpus") or 1), int(target_info.get("node_cpus") or 1))
    return int(draft_info.get("threads") or 1) + int(target_info.get("threads") or 1) <= cores


def build_routes(cfg: TandemConfig, engine: ActorEngine) -> dict[str, TargetRoute]:
    import ray

    draft_exits = tuple(engine.draft_pool.info["exits"]) if engine.draft_pool else ()
    routes = {}
    for t in cfg.targets:
        pool = engine.targets[t.name]
        handle = pool.members[0].handle
        tokenizer, eos_ids = ray.get([handle.tokenizer.remote(), handle.eos_ids.remote()])
        policy = None
        if draft_exits:
            # the target's verification cost per block size prices each draft length (goodput.py)
            # and, for concurrent requests sharing its forwards, per batch of such blocks
            costs = ray.get(handle.block_costs.remote(t.max_draft_len + 1))
            batches = concurrency_points(per_replica(cfg.server.max_concurrent, t.replicas))
            batch_costs = ray.get(handle.batch_costs.remote(t.max_draft_len + 1, batches)) if batches else {}
            overlapped = overlap_pays(engine.draft_pool.info, pool.info)
            policy = GoodputPolicy(exits=draft_exits, max_draft_len=t.max_draft_len, overlapped=overlapped, block_costs=costs,
                                   batch_costs=batch_costs)
            log.info("target %s: verification ms per block of 1..%d rows: %s; per batch of such blocks: %s; auto %s", t.name,
                     len(costs), " ".join(f"{1000 * c:.0f}" for c in costs),
                     " ".join(f"{r} rows {1000 * c:.0f}" for r, c in sorted(batch_costs.items())) or "none",
                     "overlaps drafting and verification (pearl)" if overlapped else
                     "drafts and verifies in turn (sd): the draft and target actors share cores")
        sorted_policy = None
        if len(draft_exits) >= 2:
            thresholds = tuple(t.sorted_thresholds) or default_thresholds(engine.draft_pool.spec.load.exit_adapters, draft_exits)
            if len(thresholds) != len(draft_exits) - 1:
                raise ValueError(
                    f"targets[{t.name}].sorted_thresholds: need {len(draft_exits) - 1} values for draft exits {list(draft_exits)}"
                )
            sorted_policy = ExitPolicy(exits=draft_exits, thresholds=thresholds)
        routes[t.name] = TargetRoute(
            name=t.name,
            model=t.model_ref,
            tokenizer=tokenizer,
            eos_ids=tuple(eos_ids),
            max_context=int(pool.info["max_context"]),
            vocab_size=int(pool.info["vocab_size"]),
            default_method=t.method,
            max_draft_len=t.max_draft_len,
            policy=policy,
            sorted_policy=sorted_policy,
            replicas=t.replicas,
            shards=t.shards,
            dtype=t.dtype,
            kv_bytes_per_token=int(pool.info.get("kv_bytes_per_token") or 0),
            kv_budget_bytes=int(pool.info.get("kv_budget_bytes") or 0),
        )
    return routes


def _env_token(env: str | None, field: str) -> str | None:
    if not env:
        return None
    token = os.environ.get(env)
    if not token:
        raise ValueError(f"{field}: environment variable {env} is not set (or empty)")
    return token


async def build_app(cfg: TandemConfig, *, resolve=resolve_model_path, engine: ActorEngine | None = None) -> ServeApp:
    token = _env_token(cfg.server.auth_token_env, "server.auth_token_env")  # fail before loading anything
    metrics_token = _env_token(cfg.server.metrics_auth_token_env, "server.metrics_auth_token_env")
    tls_cert = tls_key = None
    if cfg.server.tls is not None:
        try:
            tls_cert = Path(cfg.server.tls.cert_file).read_bytes()
            tls_key = Path(cfg.server.tls.key_file).read_bytes()
        except OSError as exc:
            raise ValueError(f"server.tls: cannot read {exc.filename}: {exc.strerror}") from None
    if engine is None:
        engine = await asyncio.get_running_loop().run_in_executor(None, lambda: build_engine(cfg, resolve=resolve))
    routes = build_routes(cfg, engine)
    telemetry = None
    if cfg.server.metrics_port is not None or cfg.server.otlp_endpoint:
        from tandem.services.telemetry import Telemetry

        telemetry = Telemetry(
            metrics_port=cfg.server.metrics_port,
            metrics_host=cfg.server.metrics_host or cfg.server.host,
            metrics_token=metrics_token,
            otlp_endpoint=cfg.server.otlp_endpoint,
            trace_rounds_sample_rate=cfg.server.trace_rounds_sample_rate,
        )
    router = Router(
        engine,
        routes,
        max_concurrent=cfg.server.max_concurrent,
        queue_size=cfg.server.queue_size,
        telemetry=telemetry,
        draft_exits=engine.draft_pool.info["exits"] if engine.draft_pool else (),
    )
    d = cfg.draft_pool
    server = await start_server(
        router,
        host=cfg.server.host,
        port=cfg.server.port,
        auth_token=token,
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_message_bytes=cfg.server.max_message_bytes,
        max_new_tokens_limit=cfg.server.max_new_tokens_limit,
        default_max_new_tokens=cfg.server.default_max_new_tokens,
        target_health=getattr(engine, "target_health", None),
        draft_info={"model": d.model, "replicas": d.replicas, "dtype": d.dtype, "exits": engine.draft_pool.info["exits"] if engine.draft_pool else []},
    )
    start_scaling(cfg, engine, router, telemetry)
    return ServeApp(config=cfg, engine=engine, router=router, server=server, telemetry=telemetry)


def scale_policies(cfg: TandemConfig) -> dict[str, ScalePolicy]:
    """The pools that follow traffic (max_replicas above replicas), by pool name."""
    a = cfg.autoscaling
    pools = [(DRAFT_POOL, cfg.draft_pool.replicas, cfg.draft_pool.max_replicas, cfg.draft_pool.load_timeout_s)]
    pools += [(t.name, t.replicas, t.max_replicas, cfg.draft_pool.load_timeout_s) for t in cfg.targets]
    return {
        name: ScalePolicy(
            min_replicas=low, max_replicas=high, target_ongoing_requests=a.target_ongoing_requests,
            upscale_delay_s=a.upscale_delay_s, downscale_delay_s=a.downscale_delay_s, load_timeout_s=timeout,
        )
        for name, low, high, timeout in pools
        if high is not None and high > low
    }


def start_scaling(cfg: TandemConfig, engine: ActorEngine, router: Router, telemetry) -> None:
    policies = scale_policies(cfg)
    if not policies or not hasattr(engine, "start_autoscaler"):
        return

    def queued(pool: str) -> int:  # requests admitted but not yet running: for the draft, all targets'
        waiting = {name: r.waiting for name, r in router.routes.items()}
        return sum(waiting.values()) if pool == DRAFT_POOL else waiting.get(pool, 0)

    def on_event(event) -> None:  # the autoscaler logs each event itself (tandem.autoscale)
        if telemetry is not None:
            telemetry.pool_scaled(pool=event.pool, kind=event.kind)

    scaler = engine.start_autoscaler(policies, queued=queued, on_event=on_event, interval_s=cfg.autoscaling.interval_s)
    if telemetry is not None:
        telemetry.observe_pool_replicas(scaler.replicas)
    say("scaling with traffic: " + ", ".join(f"{n} {p.min_replicas}-{p.max_replicas}" for n, p in policies.items()))


class BackgroundServer:
    """`build_app` on an event loop of its own, in a background thread: tandem served from a
    program that does other work meanwhile (the service tests, `make soak`)."""

    def __init__(self, cfg: TandemConfig, *, engine: ActorEngine | None = None, resolve=resolve_model_path):
        import threading

        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tandem-server", daemon=True)
        self.thread.start()
        try:
            self.app = self.run(build_app(cfg, resolve=resolve, engine=engine))
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            raise

    def run(self, coro, timeout: float = 600):
        """Run a coroutine on the server's loop; wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return f"{self.cfg.server.host}:{self.app.port}"

    @property
    def engine(self) -> ActorEngine:
        return self.app.engine

    def stop(self, *, keep_engine: bool = False) -> None:
        self.run(self.app.stop(grace=1.0))
        if not keep_engine:
            self.app.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


async def serve_forever(cfg: TandemConfig) -> int:
    app = await build_app(cfg)
    where = f"{cfg.server.host}:{app.port}"
    extras = []
    if app.telemetry is not None and getattr(app.telemetry, "metrics_port", None):
        extras.append(f"metrics on :{app.telemetry.metrics_port}/metrics")
    if cfg.server.auth_token_env:
        extras.append(f"bearer auth from ${cfg.server.auth_token_env}")
    say(f"serving tandem.v1.Tandem on {where} (targets: {', '.join(app.router.routes)})" + (f"; {'; '.join(extras)}" if extras else ""))
    say(f"try: tandem generate --server {where} --target {next(iter(app.router.routes))} --prompt 'Write a haiku about Ray'")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    say("shutting down: finishing streams in flight (5 s grace)")
    await app.stop(grace=5.0)
    app.engine.shutdown()
    forced = stop_ray(embedded=not join_address(cfg.ray.address))
    say("stopped" + (f" ({forced} Ray processes ended by force)" if forced else ""))
    return 0
