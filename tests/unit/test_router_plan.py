"""Router.plan for `sorted`: with a draft that has exits below its full depth it runs S2D
sorted drafting; without any (no trained exits on a fresh machine) it falls back to sd,
reports sd as the method that ran, and logs the reason once per target."""

from __future__ import annotations

import logging

from tandem.services.router import RouteRequest, Router, TargetRoute
from tandem.speculation.sampling import SamplingParams
from tandem.speculation.sorted_policy import ExitPolicy


def route(sorted_policy):
    return TargetRoute(name="t", model="m", tokenizer=None, eos_ids=(0,), max_context=512, vocab_size=8,
                       default_method="auto", max_draft_len=8, policy=None, sorted_policy=sorted_policy)


def request():
    return RouteRequest(request_id="r", target="t", prompt_ids=(1, 2), sampling=SamplingParams(), max_new_tokens=4,
                        method="sorted")


def test_sorted_with_exits_runs_sorted():
    policy = ExitPolicy(exits=(2, 4), thresholds=(0.8,))
    r = Router(engine=None, routes={"t": route(policy)})
    spec, choice = r.plan(r.routes["t"], request())
    assert spec.method == "sorted" and spec.policy == policy and choice is None


def test_sorted_without_exits_falls_back_to_sd_and_says_so_once(caplog):
    r = Router(engine=None, routes={"t": route(None)})
    with caplog.at_level(logging.WARNING, logger="tandem.router"):
        for _ in range(3):
            spec, choice = r.plan(r.routes["t"], request())
            assert spec.method == "sd" and spec.policy is None and spec.gamma == 6 and choice is None
    warnings = [rec for rec in caplog.records if "no exit below its full depth" in rec.getMessage()]
    assert len(warnings) == 1 and "train-exits" in warnings[0].getMessage()
