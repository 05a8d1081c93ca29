"""Two routers over one set of shared pools (bench/ha_check.py with short phases): real
`tandem serve` processes joined to the test's Ray cluster, clients on one round-robin
channel to both. A router killed mid-load fails only the streams it carried; every request
after completes on the other, with the target-only reference text; the pools' actors are the
same processes throughout; the dead router's requests are closed on the actors; a restarted
router attaches faster than a first start; a graceful stop and restart (a rolling upgrade)
fails no request."""

from __future__ import annotations

from tandem.actors.directory import pools_down
from tandem.bench.ha_check import run_ha_check


def test_a_killed_router_fails_only_its_streams_and_the_pools_live_on(ray_local, tmp_path):
    context = ray_local.get_runtime_context()
    address, namespace = context.gcs_address, context.namespace  # pools_down frees placement groups of its own namespace
    try:
        summary = run_ha_check(address, tmp_path, namespace=namespace, clients=3, phase_s=4.0, max_new_tokens=32,
                               say=print)
    finally:
        pools_down()
    failed = [k for k, ok in summary["checks"].items() if not ok]
    # the failed checks and the load's own errors first: a long dict is cut short in pytest's report
    assert summary["passed"], (f"failed checks {failed}; outcomes {summary.get('outcomes')}; "
                               f"problems {summary.get('problems')}; "
                               f"{ {k: v for k, v in summary.items() if k not in ('checks', 'pools_before', 'pools_end', 'problems')} }")
    assert summary["started_after_kill"] > 0 and summary["during_rolling_restart"] > 0
    print({k: summary[k] for k in ("a_first_start_s", "b_start_s", "a_restart_s", "b_restart_s", "requests", "outcomes",
                                   "in_flight_at_kill", "failed_in_flight_at_kill")})
