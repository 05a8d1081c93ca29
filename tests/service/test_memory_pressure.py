"""Memory pressure through gRPC (issue 12; bench/pressure_check.py with fewer requests): a
real grpc.aio server on loopback over local Ray, a target whose KV cache is large per
position (~12 MiB per 1,500-token request) and a KV budget of two such requests; 16 long
requests sent at once. The target actor's resident memory stays within (its idle memory +
the budget) x 1.1, no actor restarts, and every request completes with the reference text or
is refused with RESOURCE_EXHAUSTED before its first token. Negative control: the same flood
with a budget that admits all 16 at once passes that bound, so the check can fail."""

from __future__ import annotations

from tandem.bench.pressure_check import MiB, pressure_config, run_pressure_check
from tests.service.conftest import ServerThread

PROMPT_TOKENS = 1500
CLIENTS = 16


def _flood(tmp_path, budget_bytes: int, max_concurrent: int, queue_size: int) -> dict:
    cfg = pressure_config(tmp_path, budget_bytes=budget_bytes, max_concurrent=max_concurrent, queue_size=queue_size,
                          prompt_tokens=PROMPT_TOKENS)
    srv = ServerThread(cfg, resolve=None)
    try:
        return run_pressure_check(srv, clients=CLIENTS, prompt_tokens=PROMPT_TOKENS, budget_bytes=budget_bytes, timeout_s=300)
    finally:
        srv.stop()


def test_a_flood_of_long_requests_stays_within_the_kv_budget(ray_local, tmp_path):
    # per request: (1500 + 16 new + the planner's reserve) positions x 8 KiB
    budget = 25 * MiB  # two requests
    held = _flood(tmp_path, budget, max_concurrent=8, queue_size=6)
    assert held["checks"] == {"within_budget": True, "no_actor_restarted": True,
                              "every_request_completed_or_refused": True}, held
    # the budget, not the request count, limited what ran: some waited and ran, some were refused
    assert held["outcomes"]["completed"] >= 3 and held["outcomes"].get("refused", 0) >= 1, held["outcomes"]

    control = _flood(tmp_path, 1024 * MiB, max_concurrent=CLIENTS, queue_size=CLIENTS)
    assert control["outcomes"] == {"completed": CLIENTS}, control  # all admitted at once
    assert control["peak_mib"] > held["bound_mib"], (control["peak_mib"], held["bound_mib"])
