"""A real tandem server for service tests: grpc.aio on a free loopback port, its own event
loop on a background thread, actor pools on the session's local Ray, tiny models with a
word-level tokenizer."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tandem.deploy.config import parse_config
from tandem.deploy.serve import BackgroundServer


class ServerThread(BackgroundServer):
    """deploy.serve.BackgroundServer from a config dict; model paths are used as they are."""

    def __init__(self, config_dict: dict, engine=None, resolve=None):
        super().__init__(parse_config(config_dict), engine=engine, resolve=resolve)


class EngineGate:
    """Holds every request at the engine until `open` is set (engine.agenerate, polled on the
    server's event loop, so a held request holds no thread); counts the calls."""

    def __init__(self, engine, monkeypatch):
        self.open = threading.Event()
        self.calls = 0
        real = engine.agenerate

        async def agenerate(*args, **kwargs):
            self.calls += 1
            for _ in range(6000):
                if self.open.is_set():
                    break
                await asyncio.sleep(0.01)
            assert self.open.is_set(), "gate never opened"
            return await real(*args, **kwargs)

        monkeypatch.setattr(engine, "agenerate", agenerate)


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
    srv = ServerThread(
        service_config(
            tiny_service_models, max_concurrent=4, queue_size=4, metrics_port=0, trace_rounds_sample_rate=1.0, default_max_new_tokens=8
        )
    )
    yield srv
    srv.stop()
