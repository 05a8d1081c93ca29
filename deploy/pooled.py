"""The server without its gRPC port: `tandem batch --engine pools` sends records through the
same actor pools (deploy/serve.py build_engine), router, admission and goodput policy per
target (services/router.py) and request validation (services/servicer.py parse) as `tandem
serve`, with many records in flight, from any number of threads.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable

from tandem.deploy.local import LocalOutcome, collect


class PooledServer:
    """Pools, router and validation of `cfg`, on an event loop of their own (a daemon thread).
    `generate` is thread-safe and blocks its caller until the request ends; a request refused
    for a full queue waits the router's retry delay and tries again, so nothing is lost."""

    def __init__(self, cfg, *, resolve=None, default_max_new_tokens: int | None = None):
        from tandem.deploy.serve import build_engine, build_routes, start_scaling
        from tandem.services.router import Router
        from tandem.services.servicer import TandemServicer

        self.cfg = cfg
        self.engine = build_engine(cfg, resolve=resolve)  # resolve None: model paths used as they are
        try:
            self.router = Router(
                self.engine, build_routes(cfg, self.engine),
                max_concurrent=cfg.server.max_concurrent, queue_size=cfg.server.queue_size,
                draft_exits=self.engine.draft_pool.info["exits"] if self.engine.draft_pool else (),
            )
            self.servicer = TandemServicer(
                self.router, max_new_tokens_limit=cfg.server.max_new_tokens_limit,
                default_max_new_tokens=default_max_new_tokens or cfg.server.default_max_new_tokens,
            )
        except BaseException:
            self.engine.shutdown()
            raise
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tandem-pooled", daemon=True)
        self._thread.start()
        start_scaling(cfg, self.engine, self.router, None)
        self.retries = 0  # requests sent again after a full queue

    @property
    def in_flight(self) -> int:
        """Requests worth keeping in flight: every target's running places at its largest size."""
        return sum(self.cfg.server.max_concurrent * (t.max_replicas or t.replicas) for t in self.cfg.targets)

    def generate(self, on_delta: Callable[[Any], None] | None = None, **request) -> LocalOutcome:
        """build_generate_request's keywords (target included) -> the outcome; ValueError
        naming the field when the request is bad, exactly as the server words it."""
        from tandem.services.admission import QueueFullError
        from tandem.services.wire import build_generate_request

        req = self.servicer.parse(build_generate_request(**request), None)
        while True:
            try:
                return asyncio.run_coroutine_threadsafe(collect(self.router, req, on_delta), self._loop).result()
            except QueueFullError as exc:
                self.retries += 1
                time.sleep(exc.retry_after_s)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self.servicer.shutdown()
        self.router.shutdown()
        self.engine.shutdown()
