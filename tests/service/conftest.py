"""A real tandem server for service tests: grpc.aio on a free loopback port, its own event
loop on a background thread, actor pools on the session's local Ray, tiny models with a
word-level tokenizer."""

from __future__ import annotations

import asyncio
import threading

import pytest

from deploy.config import parse_config


class ServerThread:
    """Runs deploy.serve.build_app in a background event loop."""

    def __init__(self, config_dict: dict, engine=None, resolve=None):
        self.cfg = parse_config(config_dict)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        from deploy.serve import build_app

        try:
            self.app = self.run(build_app(self.cfg, resolve=resolve, engine=engine))
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            raise

    def run(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    @property
    def engine(self):
        return self.app.engine

    def stop(self, *, keep_engine: bool = False) -> None:
        self.run(self.app.stop(grace=1.0))
        if not keep_engine:
            self.app.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def service_config(models: dict, **server) -> dict:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, **server},
        "draft_pool": {"model": models["draft"], "dtype": "float32", "quantize": "none", "exits": [2]},
        "targets": [
            {"name": "small", "model": models["small"], "dtype": "float32", "max_draft_len": 6},
            {"name": "other", "model": models["other"], "dtype": "float32", "max_draft_len": 6},
        ],
    }


@pytest.fixture(scope="module")
def server(ray_local, tiny_service_models):
    srv = ServerThread(service_config(tiny_service_models, max_concurrent=4, queue_size=4, metrics_port=0, trace_rounds_sample_rate=1.0))
    yield srv
    srv.stop()
