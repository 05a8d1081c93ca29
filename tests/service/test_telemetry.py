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
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
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
    with telemetry.request(request_id=request_id, target=target, method="pearl", prompt_tokens=11) as trace:
        for i in range(rounds):
            start, end = base + i * 1_000_000, base + i * 1_000_000 + 500_000
            times.append((start, end))
            trace.round(index=i, start_ns=start, end_ns=end, drafted=4, accepted=3, emitted=4, exits={2: 3, 4: 1}, accepted_exits={2: 3},
                        step_rows=5 * (i + 1))  # batched beside i others' blocks of 5 rows
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
        "tandem.method": "pearl",
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
    drafted = by_attrs(metrics["tandem_spec_decode_num_draft_tokens_total"])
    e2, e4 = (("exit", "2"), ("method", "pearl"), ("target", "big")), (("exit", "4"), ("method", "pearl"), ("target", "big"))
    assert drafted[e2].value == 15
    assert drafted[e4].value == 5
    accepted = by_attrs(metrics["tandem_spec_decode_num_accepted_tokens_total"])
    assert {k: p.value for k, p in accepted.items()} == {e2: 15, e4: 0}  # exit 4 drafted, never accepted: 0, not absent
    # a round's exit: two exits drafted in each round -> "mixed"
    mixed = (("exit", "mixed"), ("method", "pearl"), ("target", "big"))
    assert {k: p.value for k, p in by_attrs(metrics["tandem_spec_decode_num_drafts_total"]).items()} == {mixed: 5}
    assert {k: p.value for k, p in by_attrs(metrics["tandem_spec_decode_num_emitted_tokens_total"]).items()} == {mixed: 20}
    assert by_attrs(metrics["tandem_prompt_tokens_total"])[(("target", "big"),)].value == 11
    requests = by_attrs(metrics["tandem_requests_total"])
    assert requests[(("finish_reason", "eos"), ("method", "pearl"), ("target", "big"))].value == 1
    assert by_attrs(metrics["tandem_generation_tokens_total"])[(("target", "big"),)].value == 20


def test_accepted_tokens_attribution_without_accepted_exits(memory):
    make, _, reader = memory
    with make(0.0).request(request_id="r", target="t", method="sd", prompt_tokens=1) as trace:
        now = time.time_ns()
        trace.round(index=0, start_ns=now, end_ns=now, drafted=5, accepted=4, emitted=5, exits={3: 5})  # one exit
        trace.round(index=1, start_ns=now, end_ns=now, drafted=4, accepted=2, emitted=3, exits={2: 2, 4: 2})  # ambiguous
        trace.round(index=2, start_ns=now, end_ns=now, drafted=3, accepted=1, emitted=2, exits={})  # no exit info
        trace.finish(finish_reason="length", completion_tokens=10, method="sd", draft_len=5)
    metrics = points(reader)
    drafted = {dict(p.attributes)["exit"]: p.value for p in metrics["tandem_spec_decode_num_draft_tokens_total"]}
    accepted = {dict(p.attributes)["exit"]: p.value for p in metrics["tandem_spec_decode_num_accepted_tokens_total"]}
    assert drafted == {"3": 5, "2": 2, "4": 2, "unknown": 3}
    assert accepted == {"3": 4, "2": 0, "4": 0, "unknown": 3}


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
    (ttft,) = metrics["tandem_time_to_first_token_seconds"]
    assert ttft.count == 2 and ttft.sum >= 0.03 and dict(ttft.attributes) == {"target": "big"}
    assert list(ttft.explicit_bounds)[:3] == [0.005, 0.01, 0.025]
    (tpot,) = metrics["tandem_request_time_per_output_token_seconds"]
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


def test_running_and_waiting_gauges(memory, caplog):
    make, _, reader = memory
    telemetry = make(0.0)
    states = {"big": (3, 5), "small": (0, 0)}
    telemetry.observe_requests(lambda: states)
    telemetry.observe_requests(lambda: 1 / 0)  # a broken callback is logged and skipped

    def gauges() -> tuple[dict, dict]:
        got = points(reader)
        return tuple({dict(p.attributes)["target"]: p.value for p in got[name]} for name in ("tandem_num_requests_running", "tandem_num_requests_waiting"))

    assert gauges() == ({"big": 3, "small": 0}, {"big": 5, "small": 0})  # running and waiting apart, not summed
    assert "request states callback failed" in caplog.text
    states["big"] = (1, 0)
    assert gauges() == ({"big": 1, "small": 0}, {"big": 0, "small": 0})


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
        first.observe_requests(lambda: {"big": (2, 1)})
        first.observe_kv_tokens(lambda: {"big": 37})
        first.observe_kv_bytes(lambda: {"big": (4096, 65536)})
        run_request(first, rounds=2)
        text = scrape(first.metrics_port)

        types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE"))
        assert types["tandem_requests_total"] == "counter"
        assert types["tandem_generation_tokens_total"] == "counter"
        assert types["tandem_spec_decode_num_draft_tokens_total"] == "counter"
        assert types["tandem_spec_decode_num_accepted_tokens_total"] == "counter"
        assert types["tandem_time_to_first_token_seconds"] == "histogram"
        assert types["tandem_request_time_per_output_token_seconds"] == "histogram"
        assert types["tandem_num_requests_running"] == types["tandem_num_requests_waiting"] == "gauge"
        assert types["tandem_e2e_request_latency_seconds"] == types["tandem_request_queue_time_seconds"] == "histogram"
        assert set(METRIC_NAMES) <= set(types)
        assert types["tandem_kv_reserved_bytes"] == types["tandem_kv_budget_bytes"] == "gauge"
        assert types["tandem_target_step_rows"] == "histogram"

        samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")}
        assert samples['tandem_requests_total{finish_reason="eos",method="pearl",target="big"}'] == 1
        assert samples['tandem_generation_tokens_total{target="big"}'] == 8
        assert samples['tandem_spec_decode_num_draft_tokens_total{exit="2",method="pearl",target="big"}'] == 6
        assert samples['tandem_spec_decode_num_accepted_tokens_total{exit="2",method="pearl",target="big"}'] == 6
        assert samples['tandem_spec_decode_num_drafts_total{exit="mixed",method="pearl",target="big"}'] == 2
        assert samples['tandem_spec_decode_num_accepted_tokens_per_pos_total{method="pearl",position="2",target="big"}'] == 2
        assert samples['tandem_prompt_tokens_total{target="big"}'] == 11
        assert samples['tandem_e2e_request_latency_seconds_count{target="big"}'] == 1
        assert samples['tandem_time_to_first_token_seconds_count{target="big"}'] == 1
        assert samples['tandem_request_time_per_output_token_seconds_count{target="big"}'] == 1
        assert samples['tandem_num_requests_running{target="big"}'] == 2
        assert samples['tandem_num_requests_waiting{target="big"}'] == 1
        assert samples['tandem_kv_cache_tokens{target="big"}'] == 37 and types["tandem_kv_cache_tokens"] == "gauge"
        assert samples['tandem_kv_reserved_bytes{target="big"}'] == 4096
        assert samples['tandem_kv_budget_bytes{target="big"}'] == 65536
        # the two rounds ran in forwards of 5 and 10 rows
        assert samples['tandem_target_step_rows_count{target="big"}'] == 2
        assert samples['tandem_target_step_rows_sum{target="big"}'] == 15
        assert samples['tandem_target_step_rows_bucket{le="8",target="big"}'] == 1
        for doubled in ("_total_total", "_seconds_seconds", "_bytes_bytes", "otel_scope_name"):
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
        assert {"tandem_requests_total", "tandem_time_to_first_token_seconds", "tandem_spec_decode_num_draft_tokens_total"} <= collector.metric_names
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


# -- vLLM-shaped spec-decode counters against SpecStats ----------------------------------------


def counter_totals(reader: InMemoryMetricReader, name: str, label: str | None = None) -> dict:
    """{label value: summed value} (or {None: total}) of one counter's points."""
    out: dict = {}
    for p in points(reader).get(name, []):
        key = dict(p.attributes).get(label) if label else None
        out[key] = out.get(key, 0) + p.value
    return out


def test_counters_reproduce_spec_stats_exactly(memory):
    """Random rounds (fixed seed) through RequestTrace.round and the same rounds through
    SpecStats.record_round: the counters give the same mean accepted length (emitted /
    drafts) and the same per-position acceptance as the responses' stats."""
    from tandem.speculation.stats import SpecStats

    make, _, reader = memory
    telemetry = make(0.0)
    rng = random.Random(7)
    stats = SpecStats()
    idle_rounds = 0
    with telemetry.request(request_id="s", target="big", method="pearl", prompt_tokens=5) as trace:
        for i in range(200):
            drafted = rng.choice([0, 1, 3, 4, 6])
            accepted = rng.randint(0, drafted)
            # a full PEARL accept has no bonus; a request that ends inside a round commits less
            emitted = rng.choice([accepted, accepted + 1, max(accepted - 1, 1)]) if drafted else 1
            seq = [rng.choice([2, 4]) for _ in range(drafted)]
            idle_rounds += drafted == 0
            stats.record_round(drafted=drafted, accepted=accepted, emitted=emitted, exits=seq)
            exits: dict[int, int] = {}
            for e in seq:
                exits[e] = exits.get(e, 0) + 1
            now = time.time_ns()
            trace.round(index=i, start_ns=now, end_ns=now, drafted=drafted, accepted=accepted, emitted=emitted, exits=exits, exit_seq=seq)
        trace.finish(finish_reason="length", completion_tokens=stats.emitted, method="pearl", draft_len=6)

    drafts = counter_totals(reader, "tandem_spec_decode_num_drafts_total")[None]
    emitted = counter_totals(reader, "tandem_spec_decode_num_emitted_tokens_total")[None]
    accepted = counter_totals(reader, "tandem_spec_decode_num_accepted_tokens_total")[None]
    draft_tokens = counter_totals(reader, "tandem_spec_decode_num_draft_tokens_total")[None]
    assert (drafts, emitted, accepted, draft_tokens) == (stats.rounds, stats.emitted, stats.accepted, stats.drafted)
    assert emitted / drafts == stats.mean_accepted_len
    assert accepted / draft_tokens == stats.acceptance_rate
    # negative control: vLLM's 1 + accepted / drafts is not this number when rounds commit
    # other than accepted + 1 (the reason for the emitted counter)
    assert abs((1 + accepted / drafts) - stats.mean_accepted_len) > 0.01
    acc_pos = counter_totals(reader, "tandem_spec_decode_num_accepted_tokens_per_pos_total", "position")
    draft_pos = counter_totals(reader, "tandem_spec_decode_num_draft_tokens_per_pos_total", "position")
    by_position = [acc_pos.get(str(i), 0) / draft_pos[str(i)] for i in range(len(draft_pos))]
    assert by_position == stats.acceptance_by_position()
    # per exit, the token counters follow exit_seq (accepted tokens are its prefix)
    per_exit = counter_totals(reader, "tandem_spec_decode_num_draft_tokens_total", "exit")
    assert per_exit == {str(k): v for k, v in stats.exits_used.items()}
    # round exits: "none" for the rounds that drafted nothing
    round_exits = counter_totals(reader, "tandem_spec_decode_num_drafts_total", "exit")
    assert round_exits["none"] == idle_rounds > 0


def test_exit_seq_attributes_accepted_tokens_to_their_exits(memory):
    make, _, reader = memory
    with make(0.0).request(request_id="x", target="t", method="sorted", prompt_tokens=1) as trace:
        now = time.time_ns()
        # exits 2, 2, 4, 4: the first three accepted -> 2 from exit 2, 1 from exit 4
        trace.round(index=0, start_ns=now, end_ns=now, drafted=4, accepted=3, emitted=4, exits={2: 2, 4: 2}, exit_seq=[2, 2, 4, 4])
        trace.finish(finish_reason="length", completion_tokens=4, method="sorted", draft_len=4)
    assert counter_totals(reader, "tandem_spec_decode_num_accepted_tokens_total", "exit") == {"2": 2, "4": 1}
    assert counter_totals(reader, "tandem_spec_decode_num_accepted_tokens_per_pos_total", "position") == {"0": 1, "1": 1, "2": 1, "3": 0}
    assert counter_totals(reader, "tandem_spec_decode_num_drafts_total", "exit") == {"mixed": 1}


def test_queue_time_and_latency_count_from_arrival(memory):
    make, _, reader = memory
    arrived = time.monotonic() - 0.2  # waited 0.2 s for a slot before the trace opened
    with make(0.0).request(request_id="q", target="big", method="sd", prompt_tokens=3, arrived=arrived) as trace:
        trace.first_token()
        trace.finish(finish_reason="length", completion_tokens=1, method="sd", draft_len=2)
    metrics = points(reader)
    (queue,) = metrics["tandem_request_queue_time_seconds"]
    (ttft,) = metrics["tandem_time_to_first_token_seconds"]
    (e2e,) = metrics["tandem_e2e_request_latency_seconds"]
    assert 0.2 <= queue.sum < 5 and ttft.sum >= 0.2 and e2e.sum >= ttft.sum


# -- traces: GenAI attributes, the client's context, actor spans ----------------------------------


def test_request_span_has_gen_ai_attributes_and_continues_the_client_trace(memory):
    from tandem.services.telemetry import context_from_metadata

    make, spans, _ = memory
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    metadata = (("authorization", "Bearer x"), ("traceparent", f"00-{trace_id}-{parent_id}-01"), ("x-bin", b"\x00"))
    parent = context_from_metadata(metadata)
    assert parent is not None
    with make(0.0).request(
        request_id="g", target="big", method="sd", prompt_tokens=7, parent=parent, model="org/model-7b",
        operation="chat", max_tokens=32, temperature=0.7, top_p=0.9,
    ) as trace:
        trace.finish(finish_reason="length", completion_tokens=32, method="sd", draft_len=4)
    (span,) = spans.get_finished_spans()
    assert format(span.context.trace_id, "032x") == trace_id
    assert format(span.parent.span_id, "016x") == parent_id and span.parent.is_remote
    attrs = dict(span.attributes)
    assert attrs.items() >= {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "tandem",
        "gen_ai.request.model": "big",
        "gen_ai.response.model": "org/model-7b",
        "gen_ai.request.max_tokens": 32,
        "gen_ai.request.top_p": pytest.approx(0.9),
        "gen_ai.usage.input_tokens": 7,
        "gen_ai.usage.output_tokens": 32,
        "gen_ai.response.finish_reasons": ("length",),
        "gen_ai.response.id": "g",
    }.items()
    assert attrs["gen_ai.request.temperature"] == pytest.approx(0.7)
    assert "gen_ai.request.seed" not in attrs  # unset parameters stay off the span
    # negative controls: no trace context, or a malformed one, starts a new trace
    assert context_from_metadata((("authorization", "Bearer x"),)) is None
    assert context_from_metadata((("traceparent", "00-not-a-trace-01"),)) is None
    assert context_from_metadata(None) is None


def test_actor_span_records_nest_under_their_round(memory):
    from tandem.actors.tracing import SpanRecord

    make, spans, _ = memory
    telemetry = make(0.0)
    with telemetry.request(request_id="u", target="big", method="sd", prompt_tokens=1) as trace:
        assert trace.actor_tracing() is None  # unsampled: the actors do no span work
        trace.finish(finish_reason="length", completion_tokens=1, method="sd", draft_len=2)

    telemetry.trace_rounds_sample_rate = 1.0
    base = time.time_ns()
    with telemetry.request(request_id="a", target="big", method="sd", prompt_tokens=1) as trace:
        tracing = trace.actor_tracing()
        assert tracing.carrier["traceparent"].split("-")[2] == format(trace.span.get_span_context().span_id, "016x")
        prefill = SpanRecord("tandem.actor.prefill", base, base + 10)
        draft = SpanRecord(
            "tandem.actor.draft", base + 100, base + 200, {"tandem.actor.role": "draft"},
            children=[SpanRecord("tandem.actor.queue_wait", base + 100, base + 150), SpanRecord("tandem.actor.forward", base + 150, base + 200)],
        )
        tracing.record([prefill])
        tracing.record([draft])
        trace.round(index=0, start_ns=base + 50, end_ns=base + 300, drafted=2, accepted=1, emitted=2, exits={2: 2})
        trace.finish(finish_reason="length", completion_tokens=3, method="sd", draft_len=2)
        tracing.record([SpanRecord("tandem.actor.verify", base + 400, base + 500)])  # answered after finish

    by_name = {s.name: s for s in spans.get_finished_spans() if s.context.trace_id == trace.span.get_span_context().trace_id}
    request, rnd = by_name["tandem.generate"], by_name["tandem.round"]
    assert by_name["tandem.actor.prefill"].parent.span_id == request.context.span_id  # before the round started
    assert by_name["tandem.actor.draft"].parent.span_id == rnd.context.span_id
    assert by_name["tandem.actor.queue_wait"].parent.span_id == by_name["tandem.actor.draft"].context.span_id
    assert (by_name["tandem.actor.forward"].start_time, by_name["tandem.actor.forward"].end_time) == (base + 150, base + 200)
    assert by_name["tandem.actor.verify"].parent.span_id == request.context.span_id
    assert dict(by_name["tandem.actor.draft"].attributes) == {"tandem.actor.role": "draft"}
