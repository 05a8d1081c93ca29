"""services/telemetry.py: spans and metrics through in-memory exporters, the Prometheus
endpoint on a free port, and OTLP export into a fake in-process collector."""

from __future__ import annotations

import asyncio
import random
import time
import urllib.error
import urllib.request
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from tandem.services.telemetry import METRIC_NAMES, Telemetry


@pytest.fixture
def memory():
    """A Telemetry wired to in-memory exporters: (telemetry, spans, reader)."""
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()

    def make(rate: float) -> Telemetry:
        made.append(Telemetry(trace_rounds_sample_rate=rate, span_exporter=spans, metric_reader=reader))
        return made[-1]

    made: list[Telemetry] = []
    yield make, spans, reader
    for telemetry in made:
        telemetry.shutdown()


def points(reader: InMemoryMetricReader) -> dict[str, list]:
    """{metric name: its data points} from one collection."""
    data = reader.get_metrics_data()
    out: dict[str, list] = {}
    for resource_metrics in data.resource_metrics if data else []:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def by_attrs(metric_points: list) -> dict[tuple, object]:
    return {tuple(sorted(p.attributes.items())): p for p in metric_points}


def run_request(telemetry: Telemetry, *, request_id: str = "r-1", rounds: int = 3, target: str = "big"):
    """A request with `rounds` rounds at explicit times; returns the round (start, end) pairs."""
    base = time.time_ns()
    times = []
    with telemetry.request(request_id=request_id, target=target, method="auto", prompt_tokens=11) as trace:
        for i in range(rounds):
            start, end = base + i * 1_000_000, base + i * 1_000_000 + 500_000
            times.append((start, end))
            trace.round(index=i, start_ns=start, end_ns=end, drafted=4, accepted=3, emitted=4, exits={2: 3, 4: 1}, accepted_exits={2: 3})
            if i == 0:
                trace.first_token()
        trace.finish(finish_reason="eos", completion_tokens=4 * rounds, method="pearl", draft_len=4)
    return times


def test_sampled_request_has_one_parent_and_a_child_per_round(memory):
    make, spans, _ = memory
    times = run_request(make(1.0), rounds=3)

    finished = spans.get_finished_spans()
    parents = [s for s in finished if s.name == "tandem.generate"]
    rounds = sorted((s for s in finished if s.name == "tandem.round"), key=lambda s: s.attributes["tandem.round.index"])
    assert len(parents) == 1 and len(rounds) == 3
    parent = parents[0]
    assert dict(parent.attributes).items() >= {
        "tandem.request_id": "r-1",
        "tandem.target": "big",
        "tandem.method": "auto",
        "tandem.prompt_tokens": 11,
        "tandem.finish_reason": "eos",
        "tandem.completion_tokens": 12,
        "tandem.method_used": "pearl",
        "tandem.draft_len": 4,
    }.items()
    assert parent.status.status_code is not StatusCode.ERROR
    assert parent.parent is None
    for i, (span, (start, end)) in enumerate(zip(rounds, times)):
        assert span.parent.span_id == parent.context.span_id
        assert span.context.trace_id == parent.context.trace_id
        assert (span.start_time, span.end_time) == (start, end)
        assert dict(span.attributes) == {
            "tandem.round.index": i,
            "tandem.round.drafted": 4,
            "tandem.round.accepted": 3,
            "tandem.round.emitted": 4,
            "tandem.round.exit_depths": (2, 4),
            "tandem.round.exit_tokens": (3, 1),
        }


def test_unsampled_request_has_no_round_spans_but_counts(memory):
    make, spans, reader = memory
    run_request(make(0.0), rounds=5)

    names = [s.name for s in spans.get_finished_spans()]
    assert names == ["tandem.generate"]
    metrics = points(reader)
    drafted = by_attrs(metrics["tandem_drafted_tokens_total"])
    assert drafted[(("exit", "2"), ("target", "big"))].value == 15
    assert drafted[(("exit", "4"), ("target", "big"))].value == 5
    accepted = by_attrs(metrics["tandem_accepted_tokens_total"])
    assert accepted == {(("exit", "2"), ("target", "big")): accepted[(("exit", "2"), ("target", "big"))]}
    assert accepted[(("exit", "2"), ("target", "big"))].value == 15
    requests = by_attrs(metrics["tandem_requests_total"])
    assert requests[(("finish_reason", "eos"), ("method", "pearl"), ("target", "big"))].value == 1
    assert by_attrs(metrics["tandem_output_tokens_total"])[(("target", "big"),)].value == 20


def test_accepted_tokens_attribution_without_accepted_exits(memory):
    make, _, reader = memory
    with make(0.0).request(request_id="r", target="t", method="sd", prompt_tokens=1) as trace:
        now = time.time_ns()
        trace.round(index=0, start_ns=now, end_ns=now, drafted=5, accepted=4, emitted=5, exits={3: 5})  # one exit
        trace.round(index=1, start_ns=now, end_ns=now, drafted=4, accepted=2, emitted=3, exits={2: 2, 4: 2})  # ambiguous
        trace.round(index=2, start_ns=now, end_ns=now, drafted=3, accepted=1, emitted=2, exits={})  # no exit info
        trace.finish(finish_reason="length", completion_tokens=10, method="sd", draft_len=5)
    metrics = points(reader)
    drafted = {dict(p.attributes)["exit"]: p.value for p in metrics["tandem_drafted_tokens_total"]}
    accepted = {dict(p.attributes)["exit"]: p.value for p in metrics["tandem_accepted_tokens_total"]}
    assert drafted == {"3": 5, "2": 2, "4": 2, "unknown": 3}
    assert accepted == {"3": 4, "unknown": 3}


def test_round_sampling_is_decided_once_per_request(memory):
    make, spans, _ = memory
    telemetry = make(0.5)
    telemetry._rng = random.Random(1234)
    for i in range(60):
        run_request(telemetry, request_id=f"r{i}", rounds=2)
    finished = spans.get_finished_spans()
    parents = {s.context.span_id: s for s in finished if s.name == "tandem.generate"}
    children: dict[int, int] = {}
    for s in finished:
        if s.name == "tandem.round":
            children[s.parent.span_id] = children.get(s.parent.span_id, 0) + 1
    assert set(children.values()) == {2}  # all rounds of a sampled request, never some
    assert all(parents[pid].attributes["tandem.rounds_sampled"] for pid in children)
    assert 10 <= len(children) <= 50  # about half of 60


def test_histograms_record_ttft_and_time_per_output_token(memory):
    make, _, reader = memory
    telemetry = make(0.0)
    with telemetry.request(request_id="h", target="big", method="auto", prompt_tokens=3) as trace:
        time.sleep(0.03)
        trace.first_token()
        trace.first_token()  # only the first call counts
        time.sleep(0.04)
        trace.finish(finish_reason="length", completion_tokens=5, method="sd", draft_len=2)
    with telemetry.request(request_id="one", target="big", method="auto", prompt_tokens=3) as trace:
        trace.first_token()
        trace.finish(finish_reason="length", completion_tokens=1, method="sd", draft_len=2)

    metrics = points(reader)
    (ttft,) = metrics["tandem_ttft_seconds"]
    assert ttft.count == 2 and ttft.sum >= 0.03 and dict(ttft.attributes) == {"target": "big"}
    assert list(ttft.explicit_bounds)[:3] == [0.005, 0.01, 0.025]
    (tpot,) = metrics["tandem_time_per_output_token_seconds"]
    assert tpot.count == 1  # the 1-token request has no inter-token time
    assert 0.04 / 4 <= tpot.sum < 5.0


def test_error_finish_sets_span_status_error(memory):
    make, spans, reader = memory
    with make(0.0).request(request_id="e", target="big", method="auto", prompt_tokens=3) as trace:
        trace.finish(finish_reason="error", completion_tokens=2, method="pearl", draft_len=4, error="target actor died")
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "target actor died"
    assert span.attributes["tandem.error"] == "target actor died"
    requests = by_attrs(points(reader)["tandem_requests_total"])
    assert requests[(("finish_reason", "error"), ("method", "pearl"), ("target", "big"))].value == 1


def test_exceptions_and_cancellation_without_finish(memory):
    make, spans, reader = memory
    telemetry = make(0.0)
    with pytest.raises(RuntimeError):
        with telemetry.request(request_id="x", target="big", method="auto", prompt_tokens=3):
            raise RuntimeError("kv cache exhausted")
    with pytest.raises(asyncio.CancelledError):
        with telemetry.request(request_id="c", target="big", method="auto", prompt_tokens=3) as trace:
            now = time.time_ns()
            trace.round(index=0, start_ns=now, end_ns=now, drafted=2, accepted=2, emitted=3, exits={2: 2})
            raise asyncio.CancelledError()

    failed, cancelled = spans.get_finished_spans()
    assert failed.status.status_code is StatusCode.ERROR and failed.attributes["tandem.finish_reason"] == "error"
    assert any(event.name == "exception" for event in failed.events)
    assert cancelled.status.status_code is not StatusCode.ERROR
    assert cancelled.attributes["tandem.finish_reason"] == "cancelled"
    assert cancelled.attributes["tandem.completion_tokens"] == 3  # from the rounds' emitted counts
    reasons = {dict(p.attributes)["finish_reason"] for p in points(reader)["tandem_requests_total"]}
    assert reasons == {"error", "cancelled"}


def test_queue_depth_gauge(memory, caplog):
    make, _, reader = memory
    telemetry = make(0.0)
    depths = {"big": 3, "small": 0}
    telemetry.observe_queue_depth(lambda: depths)
    telemetry.observe_queue_depth(lambda: 1 / 0)  # a broken callback is logged and skipped
    gauge = {dict(p.attributes)["target"]: p.value for p in points(reader)["tandem_queue_depth"]}
    assert gauge == {"big": 3, "small": 0}
    assert "queue depth callback failed" in caplog.text
    depths["big"] = 1
    gauge = {dict(p.attributes)["target"]: p.value for p in points(reader)["tandem_queue_depth"]}
    assert gauge["big"] == 1


def test_sample_rate_must_be_a_probability():
    with pytest.raises(ValueError, match="trace_rounds_sample_rate"):
        Telemetry(trace_rounds_sample_rate=1.5)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_prometheus_endpoint_serves_the_metric_names():
    first = Telemetry(metrics_port=0)
    second = Telemetry(metrics_port=0)  # a private registry each: no clash
    try:
        assert first.metrics_port and second.metrics_port and first.metrics_port != second.metrics_port
        first.observe_queue_depth(lambda: {"big": 2})
        run_request(first, rounds=2)
        text = scrape(first.metrics_port)

        types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE"))
        assert types["tandem_requests_total"] == "counter"
        assert types["tandem_output_tokens_total"] == "counter"
        assert types["tandem_drafted_tokens_total"] == "counter"
        assert types["tandem_accepted_tokens_total"] == "counter"
        assert types["tandem_ttft_seconds"] == "histogram"
        assert types["tandem_time_per_output_token_seconds"] == "histogram"
        assert types["tandem_queue_depth"] == "gauge"
        assert set(METRIC_NAMES) <= set(types)

        samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")}
        assert samples['tandem_requests_total{finish_reason="eos",method="pearl",target="big"}'] == 1
        assert samples['tandem_output_tokens_total{target="big"}'] == 8
        assert samples['tandem_drafted_tokens_total{exit="2",target="big"}'] == 6
        assert samples['tandem_accepted_tokens_total{exit="2",target="big"}'] == 6
        assert samples['tandem_ttft_seconds_count{target="big"}'] == 1
        assert samples['tandem_time_per_output_token_seconds_count{target="big"}'] == 1
        assert samples['tandem_queue_depth{target="big"}'] == 2
        for doubled in ("_total_total", "_seconds_seconds", "otel_scope_name"):
            assert doubled not in text
        assert "tandem_requests_total" not in scrape(second.metrics_port)
    finally:
        first.shutdown()
        second.shutdown()
    with pytest.raises(urllib.error.URLError):
        scrape(first.metrics_port)
    first.shutdown()  # idempotent


class FakeCollector(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.span_names: list[str] = []
        self.metric_names: set[str] = set()

    def Export(self, request, context):
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    self.span_names.extend(span.name for span in scope_spans.spans)
            return trace_service_pb2.ExportTraceServiceResponse()
        for resource_metrics in request.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                self.metric_names.update(metric.name for metric in scope_metrics.metrics)
        return metrics_service_pb2.ExportMetricsServiceResponse()


def test_otlp_export_reaches_a_collector():
    collector = FakeCollector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        telemetry = Telemetry(otlp_endpoint=f"127.0.0.1:{port}", trace_rounds_sample_rate=1.0)
        run_request(telemetry, rounds=2)
        telemetry.shutdown()  # flushes the batch span processor and the periodic metric reader
        assert sorted(collector.span_names) == ["tandem.generate", "tandem.round", "tandem.round"]
        assert {"tandem_requests_total", "tandem_ttft_seconds", "tandem_drafted_tokens_total"} <= collector.metric_names
    finally:
        server.stop(None)


def test_metrics_endpoint_can_require_a_bearer_token():
    import urllib.error

    tel = Telemetry(metrics_port=0, metrics_host="127.0.0.1", metrics_token="scrape-me")
    open_tel = Telemetry(metrics_port=0)
    try:
        url = f"http://127.0.0.1:{tel.metrics_port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url, timeout=5)
        assert info.value.code == 401
        bad = urllib.request.Request(url, headers={"Authorization": "Bearer wrong"})
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(bad, timeout=5)
        good = urllib.request.Request(url, headers={"Authorization": "Bearer scrape-me"})
        with urllib.request.urlopen(good, timeout=5) as response:
            assert response.status == 200
        # negative control: without a token configured the same plain scrape is answered
        scrape(open_tel.metrics_port)  # raises HTTPError on a 401
    finally:
        tel.shutdown()
        open_tel.shutdown()
