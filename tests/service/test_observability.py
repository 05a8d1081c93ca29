"""Observability end to end, on one real grpc.aio server on loopback with tiny models on
actors of a real local Ray (tests/service/conftest.py):

- traces: a trace started in the client holds the server's request span, its rounds and the
  actors' spans (draft, verify, queue wait, forward). The client's spans and the server's go
  to two in-memory exporters in this process; they meet by trace id.
- the Grafana dashboard (k8s/overlays/monitoring/dashboards/tandem.json): every panel's
  PromQL parses, references only metrics and labels a real scrape has, and evaluates over
  two scrapes (promql_check.py); the headline panels equal what the responses said.
- `tandem bench --via grpc`: the mean accepted length it prints equals the one the
  server's counters give over the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from promql_check import Evaluator, Scrape, as_dict, dashboard_queries, reference_errors
from tandem.services.client import TandemClient
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

from tests.service.conftest import ServerThread, service_config

PROMPT = "the a of to and in is it"


@pytest.fixture(scope="module")
def server(ray_local, tiny_service_models):
    """The conftest server, but target "other" serves the draft model itself: at full depth
    the draft then always agrees with it, so its acceptance numbers are far from the trivial
    1.0 that "small" (a random model the draft rarely agrees with) gives."""
    models = {**tiny_service_models, "other": tiny_service_models["draft"]}
    srv = ServerThread(
        service_config(models, max_concurrent=4, queue_size=4, metrics_port=0, trace_rounds_sample_rate=1.0, default_max_new_tokens=8)
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server_spans(server):
    """The server's finished spans (an in-memory exporter added to its tracer provider)."""
    exporter = InMemorySpanExporter()
    server.app.telemetry.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def client_tracer():
    """A tracer of the test's own (the global provider is left alone) and its spans."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def spans_of(exporter: InMemorySpanExporter, trace_id: int, *, wait_for: str = "tandem.generate", timeout_s: float = 10.0) -> list:
    """The finished spans of one trace, once `wait_for` has ended (the server ends its
    request span just after the last message is sent)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
        if any(s.name == wait_for for s in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def children(spans: list, parent) -> list:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def test_client_trace_holds_the_server_span_rounds_and_actor_spans(server, server_spans, client_tracer):
    provider, _ = client_tracer
    tracer = provider.get_tracer("test")
    with TandemClient(server.address, trace_context=True) as client:
        with tracer.start_as_current_span("client-request") as root:
            result = client.generate(target="small", prompt=PROMPT, max_new_tokens=8, ignore_eos=True, method="sd")
    trace_id = root.get_span_context().trace_id
    spans = spans_of(server_spans, trace_id)
    (request,) = [s for s in spans if s.name == "tandem.generate"]
    assert request.parent.span_id == root.get_span_context().span_id and request.parent.is_remote
    assert request.attributes["gen_ai.request.model"] == "small"
    assert request.attributes["gen_ai.operation.name"] == "chat"  # a prompt through the chat template
    assert request.attributes["gen_ai.usage.output_tokens"] == result.usage["completion_tokens"] == 8
    assert request.attributes["gen_ai.request.max_tokens"] == 8

    rounds = sorted((s for s in children(spans, request) if s.name == "tandem.round"), key=lambda s: s.attributes["tandem.round.index"])
    assert len(rounds) == result.stats["rounds"] >= 2
    for rnd in rounds:
        inside = children(spans, rnd)
        verify = [s for s in inside if s.name == "tandem.actor.verify"]
        assert len(verify) == 1, [s.name for s in inside]  # sd: one verification per round
        assert all(s.start_time >= rnd.start_time for s in inside)
        for call in inside:
            parts = {s.name for s in children(spans, call)}
            assert parts == {"tandem.actor.queue_wait", "tandem.actor.forward"}, call.name
            assert call.attributes["tandem.actor.role"] in ("draft", "target")
    drafts = [s for r in rounds for s in children(spans, r) if s.name == "tandem.actor.draft"]
    assert drafts and sum(s.attributes["tandem.draft.tokens"] for s in drafts) == result.stats["drafted"]
    # the prefill and the first token's verification ran before round 0: under the request
    assert {s.name for s in children(spans, request)} >= {"tandem.actor.prefill", "tandem.actor.verify", "tandem.actor.draft_open"}


def test_without_client_context_or_sampling_nothing_extra(server, server_spans, client_tracer):
    """Negative controls: without trace_context the server starts its own trace; with the
    context but rounds unsampled, the request span joins the client's trace alone (no round
    or actor spans: the actors were not asked to time anything)."""
    provider, _ = client_tracer
    tracer = provider.get_tracer("test")
    with TandemClient(server.address) as client:  # trace_context off (the default)
        with tracer.start_as_current_span("client-request") as root:
            client.generate(target="small", prompt=PROMPT, max_new_tokens=4, request_id="untraced")
    assert spans_of(server_spans, root.get_span_context().trace_id, timeout_s=1.0) == []
    mine = [s for s in server_spans.get_finished_spans() if s.attributes.get("tandem.request_id") == "untraced"]
    assert len(mine) == 1 and mine[0].parent is None

    telemetry = server.app.telemetry
    rate, telemetry.trace_rounds_sample_rate = telemetry.trace_rounds_sample_rate, 0.0
    try:
        with TandemClient(server.address, trace_context=True) as client:
            with tracer.start_as_current_span("client-request") as root:
                client.generate(target="small", prompt=PROMPT, max_new_tokens=4, method="sd")
    finally:
        telemetry.trace_rounds_sample_rate = rate
    spans = spans_of(server_spans, root.get_span_context().trace_id)
    assert [s.name for s in spans] == ["tandem.generate"]
    assert spans[0].attributes["tandem.rounds_sampled"] is False


def test_opentelemetry_grpc_instrumentation_client_is_continued(server, server_spans, client_tracer):
    """Interop: a client instrumented with opentelemetry-instrumentation-grpc (its aio client
    interceptor makes a CLIENT span and sends its traceparent) is continued the same way."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    provider, client_spans = client_tracer

    async def call() -> None:
        async with grpc.aio.insecure_channel(server.address, interceptors=aio_client_interceptors(tracer_provider=provider)) as channel:
            request = pb.GenerateRequest(target="other", prompt=PROMPT, raw_prompt=True)
            request.sampling.max_new_tokens = 3
            async for _ in pb_grpc.TandemStub(channel).Generate(request):
                pass

    asyncio.run(call())
    (rpc,) = [s for s in client_spans.get_finished_spans() if s.name == "/tandem.v1.Tandem/Generate"]
    spans = spans_of(server_spans, rpc.context.trace_id)
    (request,) = [s for s in spans if s.name == "tandem.generate"]
    assert request.parent.span_id == rpc.context.span_id
    assert request.attributes["gen_ai.operation.name"] == "text_completion"  # a raw prompt: no chat template


def test_trace_context_must_be_a_bool():
    with pytest.raises(ValueError, match="trace_context"):
        TandemClient("127.0.0.1:1", trace_context="yes")


# -- the Grafana dashboard against real scrapes ------------------------------------------------

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s/overlays/monitoring/dashboards/tandem.json"
# Metrics a dashboard panel may reference that this server does not export, and why
OPTIONAL_METRICS = {"tandem_pool_replicas": "only while a pool scales with traffic (autoscaling)"}


def scrape(server) -> Scrape:
    url = f"http://127.0.0.1:{server.app.telemetry.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return Scrape.parse(response.read().decode())


def panel_errors(queries, later: Scrape) -> list[str]:
    """Every reference that does not resolve, but for the optional metrics."""
    errors = []
    for where, expr in queries:
        missing = [e for e in reference_errors(expr, later) if not any(f"metric {m} " in e for m in OPTIONAL_METRICS)]
        errors += [f"{where}: {e}" for e in missing]
    return errors


def test_dashboard_panels_against_a_real_scrape(server):
    queries = list(dashboard_queries(json.loads(DASHBOARD.read_text())))
    assert len(queries) >= 15
    earlier, t0 = scrape(server), time.monotonic()
    plan = [("small", "sd", 10), ("small", "pearl", 12), ("other", "sd", 9), ("small", "off", 5)]
    with TandemClient(server.address) as client:
        results = [
            (target, client.generate(target=target, prompt=PROMPT, max_new_tokens=n, ignore_eos=True, method=method))
            for target, method, n in plan
        ]
    later, dt = scrape(server), time.monotonic() - t0

    assert panel_errors(queries, later) == []
    evaluate = Evaluator(earlier, later, dt)
    values = {}
    for where, expr in queries:
        if any(m in expr for m in OPTIONAL_METRICS):
            continue
        values[where] = evaluate(expr)
        assert any(math.isfinite(v) for _, v in values[where]), f"{where} shows no data: {expr}"

    # the headline panels equal what the responses' SpeculationStats said
    def value(title: str, ref: str = "A") -> dict:
        return as_dict(values[f"panel {title!r} {ref}"], "target")

    mean_len, rate_panel = value("Mean accepted length"), value("Acceptance rate")
    for target in ("small", "other"):
        spec = [r.stats for t, r in results if t == target and r.stats["method"] != "off"]
        emitted = sum(round(s["mean_accepted_len"] * s["rounds"]) for s in spec)  # an integer sent as a float32 ratio
        assert mean_len[target] == pytest.approx(emitted / sum(s["rounds"] for s in spec), rel=1e-12)
        assert rate_panel[target] == pytest.approx(sum(s["accepted"] for s in spec) / sum(s["drafted"] for s in spec), rel=1e-12)
        tokens = sum(r.usage["completion_tokens"] for t, r in results if t == target)
        assert value("Generation tokens / s")[target] * dt == pytest.approx(tokens, rel=1e-9)
    # one request on "other" in the window: the per-position panel is its acceptance_by_position
    (other,) = [r.stats for t, r in results if t == "other"]
    by_position = as_dict(values["panel 'Acceptance by position' A"], "target", "position")
    got = [by_position[("other", str(i))] for i in range(len(other["acceptance_by_position"]))]
    assert got == pytest.approx(other["acceptance_by_position"], abs=1e-6)
    # TTFT percentiles lie within the window (up to the bucket bound above it: quantiles
    # interpolate within a bucket)
    from tandem.services.telemetry import TTFT_BUCKETS_S

    bound = min((b for b in TTFT_BUCKETS_S if b >= dt), default=math.inf)
    for ref in "ABC":
        assert 0 < value("Time to first token", ref)["small"] <= bound
    idle = as_dict(values["panel 'Requests running / waiting' A"], "target"), as_dict(values["panel 'Requests running / waiting' B"], "target")
    assert idle == ({"small": 0, "other": 0}, {"small": 0, "other": 0})


def test_dashboard_check_fires_on_bad_references(server):
    """Negative controls: a misspelled metric, a label the metric lacks, a syntax error; and
    an optional metric is excused only by name."""
    later = scrape(server)
    good = "sum by (target) (rate(tandem_spec_decode_num_drafts_total{target=~\"$target\"}[$__rate_interval]))"
    assert panel_errors([("good", good)], later) == []
    bad = {
        "metric": good.replace("num_drafts_total", "num_draft_total"),
        "label": good.replace("target=~", "targt=~"),
        "syntax": good.replace("[$__rate_interval]", "[$__rate_interval"),
        "optional-typo": "sum(tandem_pool_replica)",
    }
    for name, expr in bad.items():
        assert panel_errors([(name, expr)], later), name
    assert panel_errors([("optional", "sum by (pool) (tandem_pool_replicas)")], later) == []


# -- tandem bench --via grpc against the counters ------------------------------------------------


def counter_delta(earlier: Scrape, later: Scrape, name: str, **labels: str) -> float:
    total = 0.0
    for key, value in later.samples.get(name, {}).items():
        if all(dict(key).get(k) == v for k, v in labels.items()):
            total += value - earlier.samples.get(name, {}).get(key, 0.0)
    return total


def test_bench_mean_accepted_length_equals_the_counters(server, tmp_path):
    """`tandem bench --via grpc` (the CLI, in-process) prints a mean accepted length per
    series; over the benchmark, the server's counters give the same number: emitted tokens /
    rounds, per method (the bench's off series runs method off, its other series pearl).
    Target "other" is the draft model itself, so PEARL's blocks are accepted in full."""
    from tandem.deploy.cli import main as cli

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (PROMPT, "this is a test of the", "print x if y else n")))
    earlier = scrape(server)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(["bench", "--via", "grpc", "--server", server.address, "--prompts", str(prompts), "--limit", "3",
                    "--targets", "other", "--method", "pearl", "--warmup", "0", "--max-new-tokens", "12"])
    later = scrape(server)
    assert code == 0
    rows = {}
    for line in out.getvalue().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "other":
            rows[cells[1]] = cells[6]  # columns: target, speculation, tok/s, x off, TTFT, TPOT, mean acc. len
    assert set(rows) == {"off", "pearl"}, out.getvalue()
    for method, printed in rows.items():
        emitted = counter_delta(earlier, later, "tandem_spec_decode_num_emitted_tokens_total", target="other", method=method)
        drafts = counter_delta(earlier, later, "tandem_spec_decode_num_drafts_total", target="other", method=method)
        assert drafts > 0
        assert float(printed) == round(emitted / drafts, 3), (method, printed, emitted, drafts)
    # negative controls: the pearl number is far from the trivial 1.0, and vLLM's formula
    # (1 + accepted / drafts) gives another one (a fully accepted PEARL block has no bonus)
    accepted = counter_delta(earlier, later, "tandem_spec_decode_num_accepted_tokens_total", target="other", method="pearl")
    drafts = counter_delta(earlier, later, "tandem_spec_decode_num_drafts_total", target="other", method="pearl")
    assert float(rows["pearl"]) > 2.0
    assert round(1 + accepted / drafts, 3) != float(rows["pearl"])
