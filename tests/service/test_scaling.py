"""A target pool follows traffic through gRPC (bench/scale_check.py with short phases): a
real grpc.aio server on loopback over local Ray, a base load, double that load, the base
load again. The pool grows during the doubled load and shrinks after; every request
completes with the reference text or is refused before its first token; the scale events
are in the log and in a real /metrics scrape."""

from __future__ import annotations

import logging

from tandem.bench.scale_check import run_scale_check, scale_config
from tests.service.conftest import ServerThread


def test_pool_grows_under_doubled_grpc_load_and_shrinks_after(ray_local, tmp_path, caplog):
    srv = ServerThread(scale_config(tmp_path, max_replicas=2, downscale_delay_s=4.0), resolve=None)
    try:
        with caplog.at_level(logging.INFO, logger="tandem.autoscale"):
            summary = run_scale_check(srv, base_clients=2, phases_s=(3.0, 6.0, 8.0), max_new_tokens=24, settle_s=30.0, grow_wait_s=90.0)
    finally:
        srv.stop()
    assert summary["checks"] == {"grew_under_double_load": True, "shrank_after": True,
                                 "every_request_completed_or_refused": True, "events_in_metrics": True}, summary
    assert summary["replicas"]["base_max"] == 1 and summary["replicas"]["peak"] == 2 and summary["replicas"]["final"] == 1
    assert summary["list_models_replicas"] == {"grown": 2, "end": 1}  # ListModels reports the live count
    kinds = [e["kind"] for e in summary["events"]]
    assert kinds[:1] == ["up"] and "down" in kinds, kinds
    assert summary["metrics"]['tandem_pool_replicas{pool="small"}'] == 1.0
    logged = [r.getMessage() for r in caplog.records if r.name == "tandem.autoscale"]
    assert any("scale up -> 2 replicas" in m for m in logged) and any("scale down -> 1 replicas" in m for m in logged), logged
