"""OpenTelemetry traces and metrics for tandem's router: one span per request (GenAI semantic
conventions, continuing the client's W3C trace context), and when its rounds are sampled a
child span per speculation round with the actors' spans inside (draft, verify, queue wait);
plus the service metrics, exportable over OTLP and scrapeable by Prometheus.

Why one module past 400 lines: a request's metrics and spans are recorded together by one
object (RequestTrace), from the router's thread and event loop at once; splitting the span
half from the metric half would split that object and its lock.

Glossary: a *request* is one Generate call; a *round* is one draft-then-verify step of the
speculation loop (the draft proposes `drafted` tokens, the target accepts `accepted` of them
and the round commits `emitted` tokens: the accepted ones plus the corrected or bonus one,
fewer when the request ends inside the round, and no bonus after a fully accepted PEARL
block); an *exit* is the draft sub-model depth that produced a draft token (S2D).

Use (router side):

    telemetry = Telemetry(metrics_port=9464, trace_rounds_sample_rate=0.01)
    telemetry.observe_requests(lambda: {name: (running, waiting) for each target})
    with telemetry.request(request_id=rid, target="big", method="pearl", prompt_tokens=42,
                           parent=context_from_client, model="Qwen/Qwen2.5-7B") as trace:
        engine.generate(..., tracing=trace.actor_tracing())  # None unless rounds are sampled
        for each round:
            trace.round(index=i, start_ns=t0, end_ns=t1, drafted=4, accepted=3, emitted=4,
                        exits={2: 4}, exit_seq=[2, 2, 2, 2])
            if first commit: trace.first_token()
        trace.finish(finish_reason="eos", completion_tokens=96, method="pearl", draft_len=4)
    telemetry.shutdown()

Metrics. Named after vLLM's (`vllm:spec_decode_num_drafts_total` and friends) with the
prefix `tandem_` instead of `vllm:`: OpenTelemetry instrument names cannot hold a colon, and
Prometheus keeps colons for recording rules. The instruments are named with their Prometheus
suffixes already, so exposition adds none; OTLP carries the same names.

    tandem_requests_total{target,method,finish_reason}                   counter    finished requests
    tandem_prompt_tokens_total{target}                                   counter    prompt tokens of finished requests
    tandem_generation_tokens_total{target}                               counter    tokens streamed to clients
    tandem_spec_decode_num_drafts_total{target,method,exit}              counter    rounds (verifications)
    tandem_spec_decode_num_draft_tokens_total{target,method,exit}        counter    draft tokens proposed
    tandem_spec_decode_num_accepted_tokens_total{target,method,exit}     counter    draft tokens accepted
    tandem_spec_decode_num_emitted_tokens_total{target,method,exit}      counter    tokens the rounds committed
    tandem_spec_decode_num_accepted_tokens_per_pos_total{target,method,position}  counter
    tandem_spec_decode_num_draft_tokens_per_pos_total{target,method,position}     counter
    tandem_time_to_first_token_seconds{target}                           histogram  arrival -> first token
    tandem_request_time_per_output_token_seconds{target}                 histogram  per request, 2+ tokens
    tandem_e2e_request_latency_seconds{target}                           histogram  arrival -> last message
    tandem_request_queue_time_seconds{target}                            histogram  arrival -> admission
    tandem_num_requests_running{target}                                  gauge      holding a slot
    tandem_num_requests_waiting{target}                                  gauge      queued for a slot
    tandem_kv_cache_tokens{target}                                       gauge      KV positions its running
                                        requests hold on the replicas (prompt + committed tokens;
                                        caches grow per sequence, so this is a count, not vLLM's
                                        fraction of a fixed pool)
    tandem_pool_scale_events_total{pool,kind}, tandem_pool_replicas{pool}  (pool scaling)

Definitions that make the README's numbers computable from a scrape, exactly as the
responses' SpeculationStats (speculation/stats.py) define them:

    mean accepted length = num_emitted_tokens / num_drafts       (tokens committed per round)
    acceptance rate      = num_accepted_tokens / num_draft_tokens
    acceptance at position i = num_accepted_tokens_per_pos{position="i"}
                               / num_draft_tokens_per_pos{position="i"}

vLLM's `1 + accepted / drafts` is the same number only when every round commits its bonus
token; tandem's rounds do not always (a request that ends inside a round, a fully accepted
PEARL block), so the emitted counter is tandem's addition. A *draft* here is every round,
including rounds that drafted nothing (method "off", the last token of a request): that is
what SpeculationStats.rounds counts; filter `method!="off"` for speculating rounds only.

Labels: `method` is the method that ran (auto resolved: off, sd, sorted, pearl, spectr).
`exit` on the token counters is the exit that drafted each token (accepted tokens are a
prefix of the drafted ones, so their exits are known); on num_drafts and num_emitted_tokens
it is the round's exit: its one exit, "mixed" when its tokens came from several, "none"
when it drafted nothing, "unknown" when the draft said no exit (SpecTr branches). `position`
is 0-based. KV use is tandem_kv_cache_tokens, a count the router keeps (prompt plus
committed tokens of each running request), not vLLM's used/total fraction: the actors keep a
KV cache per sequence, grown on demand (actors/runner.py), not a fixed block pool, so there
is no denominator; and reading actors' memory would cost a Ray round trip per actor per scrape.

The running/waiting gauges are observable: the router registers a callback returning
{target: (running, waiting)} with observe_requests(); it is read at each collection (a
Prometheus scrape, an OTLP export tick) on the exporter's thread, so it must be cheap and
must not touch asyncio objects in ways that are unsafe across threads (reading ints is fine).

Traces. The request span "tandem.generate" carries the GenAI semantic-convention attributes
(gen_ai.operation.name, gen_ai.provider.name "tandem", gen_ai.request.model = the target,
gen_ai.response.model = its model reference, gen_ai.request.max_tokens / temperature / top_p
/ top_k / seed, gen_ai.usage.input_tokens / output_tokens, gen_ai.response.finish_reasons,
gen_ai.response.id) besides tandem.*; its parent is the context the client sent (W3C
traceparent in the gRPC metadata, see context_from_metadata), else it starts a trace. Rounds
are sampled per request (trace_rounds_sample_rate, and only when the request span is
recording): a sampled request gets "tandem.round" spans and, through actor_tracing(), the
actors' spans re-created under the round they ran in (actors/tracing.py says why records).

Spans are not made "current" (no contextvars attach), so an async generator that is closed
from another task cannot trip OpenTelemetry's context detach; children are parented
explicitly through RequestTrace.context.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import propagate
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "E2E_BUCKETS_S",
    "METRIC_NAMES",
    "QUEUE_BUCKETS_S",
    "TPOT_BUCKETS_S",
    "TTFT_BUCKETS_S",
    "RequestTrace",
    "Telemetry",
    "context_from_metadata",
]

logger = logging.getLogger(__name__)

INSTRUMENTATION_SCOPE = "tandem.services"
REQUEST_SPAN = "tandem.generate"
ROUND_SPAN = "tandem.round"
GEN_AI_PROVIDER = "tandem"  # gen_ai.provider.name (semconv: the well-known value, or the product's name)
UNATTRIBUTED_EXIT = "unknown"  # exit label for draft tokens whose exit the caller did not say
ROUND_EXIT_NONE = "none"  # a round's exit label when it drafted nothing
ROUND_EXIT_MIXED = "mixed"  # ... when its draft tokens came from several exits

# Bucket bounds in seconds: TTFT spans queueing + prefill (ms to tens of s); time per output
# token of a speculative decoder is a fraction of one target step (sub-ms to ~1 s on CPU);
# a whole request runs up to minutes; queueing is zero when a slot is free.
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# rows of a target forward: 1 (one request, no draft) up to max_batch requests x long blocks
STEP_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

METRIC_NAMES = (
    "tandem_requests_total",
    "tandem_prompt_tokens_total",
    "tandem_generation_tokens_total",
    "tandem_spec_decode_num_drafts_total",
    "tandem_spec_decode_num_draft_tokens_total",
    "tandem_spec_decode_num_accepted_tokens_total",
    "tandem_spec_decode_num_emitted_tokens_total",
    "tandem_spec_decode_num_accepted_tokens_per_pos_total",
    "tandem_spec_decode_num_draft_tokens_per_pos_total",
    "tandem_time_to_first_token_seconds",
    "tandem_request_time_per_output_token_seconds",
    "tandem_e2e_request_latency_seconds",
    "tandem_request_queue_time_seconds",
    "tandem_num_requests_running",
    "tandem_num_requests_waiting",
    "tandem_kv_cache_tokens",
    "tandem_kv_reserved_bytes",
    "tandem_kv_budget_bytes",
    "tandem_target_step_rows",
)


def context_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> Context | None:
    """The trace context a client sent in its gRPC metadata (W3C `traceparent` and
    `tracestate`, read by the process's text-map propagator, W3C by default), or None when
    it sent none or a malformed one (the request then starts its own trace)."""
    carrier = {str(k).lower(): v for k, v in metadata or () if isinstance(v, str)}  # -bin values carry none
    if not carrier:
        return None
    context = propagate.extract(carrier)
    return context if trace_api.get_current_span(context).get_span_context().is_valid else None


class Telemetry:
    """Tracer and meter providers of their own (the global providers are left alone, so several
    instances can live in one process), plus the exporters asked for:

    - span_exporter / metric_reader: injected (tests pass InMemorySpanExporter /
      InMemoryMetricReader); the span exporter runs synchronously (SimpleSpanProcessor).
    - metrics_port: Prometheus text at http://metrics_host:port/metrics from a private
      CollectorRegistry; 0 picks a free port, readable as `self.metrics_port`. With
      metrics_token, scrapes must send `Authorization: Bearer <token>` (else 401).
    - otlp_endpoint ("host:port"): OTLP/gRPC span (batched) and metric (every
      otlp_export_interval_s) exporters, plaintext.

    With none of them it records into nothing, cheaply. shutdown() flushes and stops the HTTP
    server; call it once at exit.
    """

    def __init__(
        self,
        *,
        service_name: str = "tandem",
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        metrics_token: str | None = None,
        otlp_endpoint: str | None = None,
        trace_rounds_sample_rate: float = 0.0,
        span_exporter: SpanExporter | None = None,
        metric_reader: MetricReader | None = None,
        otlp_export_interval_s: float = 15.0,
    ) -> None:
        if not 0.0 <= trace_rounds_sample_rate <= 1.0:
            raise ValueError(f"trace_rounds_sample_rate must be in [0, 1]; got {trace_rounds_sample_rate}")
        self.trace_rounds_sample_rate = float(trace_rounds_sample_rate)
        self._rng = random.Random()
        self._request_callbacks: list[Callable[[], Mapping[str, tuple[int, int]]]] = []
        self._lock = threading.Lock()
        self._shut_down = False
        self._http_server = None
        self._http_thread: threading.Thread | None = None
        self.metrics_port: int | None = None

        resource = Resource.create({"service.name": service_name})

        self.tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        if span_exporter is not None:
            self.tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        readers: list[MetricReader] = [] if metric_reader is None else [metric_reader]
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter,
            )
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            self.tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
            readers.append(
                PeriodicExportingMetricReader(
                    OTLPMetricExporter(endpoint=otlp_endpoint, insecure=True),
                    export_interval_millis=otlp_export_interval_s * 1000.0,
                )
            )
        if metrics_port is not None:
            readers.append(self._start_prometheus(metrics_host, metrics_port, metrics_token))

        self.meter_provider = MeterProvider(metric_readers=readers, resource=resource, shutdown_on_exit=False)
        self.tracer = self.tracer_provider.get_tracer(INSTRUMENTATION_SCOPE)
        meter = self.meter_provider.get_meter(INSTRUMENTATION_SCOPE)

        def counter(name: str, unit: str, description: str):
            return meter.create_counter(name, unit=unit, description=description)

        def histogram(name: str, description: str, buckets: tuple[float, ...]):
            return meter.create_histogram(name, unit="s", description=description, explicit_bucket_boundaries_advisory=buckets)

        self.requests = counter("tandem_requests_total", "{request}", "Finished Generate requests by outcome.")
        self.prompt_tokens = counter("tandem_prompt_tokens_total", "{token}", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("tandem_generation_tokens_total", "{token}", "Tokens streamed to clients.")
        self.num_drafts = counter(
            "tandem_spec_decode_num_drafts_total", "{round}", "Speculation rounds (target verifications), by the round's exit."
        )
        self.num_draft_tokens = counter(
            "tandem_spec_decode_num_draft_tokens_total", "{token}", "Draft tokens proposed, by the exit that drafted them."
        )
        self.num_accepted_tokens = counter(
            "tandem_spec_decode_num_accepted_tokens_total", "{token}", "Draft tokens the target accepted, by the exit that drafted them."
        )
        self.num_emitted_tokens = counter(
            "tandem_spec_decode_num_emitted_tokens_total",
            "{token}",
            "Tokens the rounds committed (accepted + corrected or bonus), by the round's exit; / num_drafts = mean accepted length.",
        )
        self.accepted_per_pos = counter(
            "tandem_spec_decode_num_accepted_tokens_per_pos_total", "{token}", "Accepted draft tokens by position in the round (0-based)."
        )
        self.draft_per_pos = counter(
            "tandem_spec_decode_num_draft_tokens_per_pos_total", "{token}", "Draft tokens proposed by position in the round (0-based)."
        )
        self.ttft = histogram(
            "tandem_time_to_first_token_seconds", "Time from request arrival to its first streamed token.", TTFT_BUCKETS_S
        )
        self.time_per_output_token = histogram(
            "tandem_request_time_per_output_token_seconds",
            "(end - first token) / (completion tokens - 1), per request with 2+ tokens.",
            TPOT_BUCKETS_S,
        )
        self.e2e_latency = histogram(
            "tandem_e2e_request_latency_seconds", "Time from request arrival to its last message.", E2E_BUCKETS_S
        )
        self.queue_time = histogram(
            "tandem_request_queue_time_seconds", "Time a request waited for its target's admission slot.", QUEUE_BUCKETS_S
        )
        self.step_rows = meter.create_histogram(
            "tandem_target_step_rows", unit="{row}", explicit_bucket_boundaries_advisory=STEP_ROWS_BUCKETS,
            description="Rows of the target forward each speculation round ran in: every request batched into it, "
            "packed (continuous batching at work; one observation per round, so a forward "
            "shared by n requests counts n times).",
        )
        self.running = meter.create_observable_gauge(
            "tandem_num_requests_running",
            callbacks=[self._observe_running],
            unit="{request}",
            description="Requests holding an admission slot of their target (running on the actors).",
        )
        self.waiting = meter.create_observable_gauge(
            "tandem_num_requests_waiting",
            callbacks=[self._observe_waiting],
            unit="{request}",
            description="Requests queued for an admission slot of their target.",
        )
        self.scale_events = meter.create_counter(
            "tandem_pool_scale_events_total", unit="{event}",
            description="Pool scaling: up/down (a replica joined/left), drain (stopped taking requests), up_failed.",
        )
        self._kv_callbacks: list[Callable[[], Mapping[str, int]]] = []
        self.kv_tokens = meter.create_observable_gauge(
            "tandem_kv_cache_tokens",
            callbacks=[self._observe_kv],
            unit="{token}",
            description="KV cache positions the target's running requests hold (prompt plus committed tokens).",
        )
        self._kv_bytes_callbacks: list[Callable[[], Mapping[str, tuple[int, int]]]] = []
        self.kv_reserved = meter.create_observable_gauge(
            "tandem_kv_reserved_bytes",
            callbacks=[lambda options: self._observe(self._kv_bytes_callbacks, "target", "KV bytes", pick=0)],
            unit="By",
            description="KV cache bytes reserved by the target's running requests (services/admission.py).",
        )
        self.kv_budget = meter.create_observable_gauge(
            "tandem_kv_budget_bytes",
            callbacks=[lambda options: self._observe(self._kv_bytes_callbacks, "target", "KV bytes", pick=1)],
            unit="By",
            description="KV cache budget of the target's serving replicas together; admission waits past it.",
        )
        self._replica_callbacks: list[Callable[[], Mapping[str, int]]] = []
        self.pool_replicas = meter.create_observable_gauge(
            "tandem_pool_replicas",
            callbacks=[self._observe_replicas],
            unit="{replica}",
            description="Serving replicas of each pool that scales with traffic.",
        )

    def _start_prometheus(self, host: str, port: int, token: str | None) -> MetricReader:
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, make_wsgi_app
        from prometheus_client.exposition import ThreadingWSGIServer

        registry = CollectorRegistry()  # private: several Telemetry objects never clash
        reader = PrometheusMetricReader(registry=registry, scope_info_enabled=False)
        app = make_wsgi_app(registry)
        if token:
            app = _bearer_protected(app, token)

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
                pass

        # prometheus_client's start_http_server, plus the optional bearer check in front
        self._http_server = make_server(host, port, app, ThreadingWSGIServer, handler_class=Quiet)
        self._http_thread = threading.Thread(target=self._http_server.serve_forever, name="metrics-http", daemon=True)
        self._http_thread.start()
        self.metrics_port = self._http_server.server_port
        return reader

    # -- per request ------------------------------------------------------------------------

    def request(
        self,
        *,
        request_id: str,
        target: str,
        method: str,
        prompt_tokens: int,
        parent: Context | None = None,
        arrived: float | None = None,
        model: str | None = None,
        operation: str = "text_completion",
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> RequestTrace:
        """Open the request span and decide once whether its rounds get spans. Use as a
        context manager. parent: the client's trace context (context_from_metadata); arrived:
        the time.monotonic() of the request's arrival when that was before this call (the
        admission wait: TTFT and e2e latency count from it, and it is the queue time);
        model: the target's model reference; operation: gen_ai.operation.name ("chat" for
        chat-templated input, "text_completion" for raw text or token ids); the rest are the
        sampling parameters as the request set them (None: unset, left off the span)."""
        rate = self.trace_rounds_sample_rate
        sampled = rate >= 1.0 or (rate > 0.0 and self._rng.random() < rate)
        request_attrs = {
            "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.request.temperature": temperature,
            "gen_ai.request.top_p": top_p,
            "gen_ai.request.top_k": top_k,
            "gen_ai.request.seed": seed,
        }
        return RequestTrace(
            self,
            request_id=request_id,
            target=target,
            method=method,
            prompt_tokens=prompt_tokens,
            sample_rounds=sampled,
            parent=parent,
            arrived=arrived,
            model=model,
            operation=operation,
            request_attributes={k: v for k, v in request_attrs.items() if v is not None},
        )

    # -- running and waiting requests ------------------------------------------------------------

    def observe_requests(self, callback: Callable[[], Mapping[str, tuple[int, int]]]) -> None:
        """Report `callback()` ({target: (running, waiting)}) as tandem_num_requests_running and
        tandem_num_requests_waiting at each collection. Several callbacks may be registered
        (their targets should not overlap)."""
        with self._lock:
            self._request_callbacks.append(callback)

    def _observe_running(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe(self._request_callbacks, "target", "request states", pick=0)

    def _observe_waiting(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe(self._request_callbacks, "target", "request states", pick=1)

    def _observe(self, registered: list, label: str, what: str, pick: int | None = None) -> list[Observation]:
        """One observation per key of each callback's mapping, labelled `label`=key (with
        `pick`, the values are tuples and element `pick` is observed)."""
        with self._lock:
            callbacks = list(registered)
        observations = []
        for callback in callbacks:
            try:
                values = {k: (v if pick is None else v[pick]) for k, v in dict(callback()).items()}
            except Exception:  # a broken callback must not take the other metrics down
                logger.exception("%s callback failed", what)
                continue
            observations.extend(Observation(int(v), {label: str(k)}) for k, v in values.items())
        return observations

    def observe_kv_tokens(self, callback: Callable[[], Mapping[str, int]]) -> None:
        """Report `callback()` ({target: KV positions held}) as tandem_kv_cache_tokens."""
        with self._lock:
            self._kv_callbacks.append(callback)

    def _observe_kv(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe(self._kv_callbacks, "target", "KV tokens")

    def observe_kv_bytes(self, callback: Callable[[], Mapping[str, tuple[int, int]]]) -> None:
        """Report `callback()` ({target: (reserved, budget)} in bytes) as
        tandem_kv_reserved_bytes and tandem_kv_budget_bytes."""
        with self._lock:
            self._kv_bytes_callbacks.append(callback)

    # -- pool scaling ---------------------------------------------------------------------------

    def pool_scaled(self, *, pool: str, kind: str) -> None:
        self.scale_events.add(1, {"pool": pool, "kind": kind})

    def observe_pool_replicas(self, callback: Callable[[], Mapping[str, int]]) -> None:
        with self._lock:
            self._replica_callbacks.append(callback)

    def _observe_replicas(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe(self._replica_callbacks, "pool", "pool replicas")

    # -- lifecycle ----------------------------------------------------------------------------

    def force_flush(self, timeout_millis: int = 10_000) -> None:
        self.tracer_provider.force_flush(timeout_millis)
        self.meter_provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Flush and stop exporters, then the metrics HTTP server. Idempotent."""
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            if self._http_thread is not None:
                self._http_thread.join(timeout=5)


class RequestTrace:
    """One request's span, timings and counters. Created by Telemetry.request(). round() and
    the actor span records arrive on the thread that runs the speculation loop while
    first_token() / finish() run on the event loop; the little state they share is locked.

    Leaving the `with` block ends the span. If finish() was not called: an exception that
    means the client went away (asyncio.CancelledError, GeneratorExit) finishes it as
    "cancelled", any other exception as "error" (recorded on the span), and a clean exit
    without finish() as "error" too (a router bug worth seeing).
    """

    def __init__(
        self,
        telemetry: Telemetry,
        *,
        request_id: str,
        target: str,
        method: str,
        prompt_tokens: int,
        sample_rounds: bool,
        parent: Context | None = None,
        arrived: float | None = None,
        model: str | None = None,
        operation: str = "text_completion",
        request_attributes: Mapping[str, Any] | None = None,
    ) -> None:
        self._telemetry = telemetry
        self.request_id = request_id
        self.target = target
        self.method = method
        self.model = model
        self.prompt_tokens = int(prompt_tokens)
        now = time.monotonic()
        self._started = min(arrived, now) if arrived is not None else now
        self._first_token: float | None = None
        self._emitted = 0
        self._finished = False
        self._pending: list = []  # actor span records not yet placed under a round
        self._state = threading.Lock()  # guards _emitted, _finished and _pending
        telemetry.queue_time.record(now - self._started, {"target": target})
        attributes = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": GEN_AI_PROVIDER,
            "gen_ai.request.model": target,
            "gen_ai.usage.input_tokens": self.prompt_tokens,
            **(request_attributes or {}),
            "tandem.request_id": request_id,
            "tandem.target": target,
            "tandem.method": method,
            "tandem.prompt_tokens": self.prompt_tokens,
        }
        if model:
            attributes["gen_ai.response.model"] = model
        self.span = telemetry.tracer.start_span(
            REQUEST_SPAN,
            context=parent,
            kind=SpanKind.SERVER,
            start_time=time.time_ns() - int((now - self._started) * 1e9),
            attributes=attributes,
        )
        # rounds (and actor spans) only for a sampled request whose span is recorded at all
        self.sample_rounds = bool(sample_rounds) and self.span.is_recording()
        self.span.set_attribute("tandem.rounds_sampled", self.sample_rounds)
        self.context = trace_api.set_span_in_context(self.span)  # parent for child spans

    def __enter__(self) -> RequestTrace:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        with self._state:
            finished, emitted = self._finished, self._emitted
        if not finished:
            went_away = exc_type is not None and issubclass(exc_type, (GeneratorExit, asyncio.CancelledError))
            if went_away:
                reason, error = "cancelled", None
            else:
                if exc is not None:
                    self.span.record_exception(exc)
                reason = "error"
                error = f"{exc_type.__name__}: {exc}" if exc_type is not None else "request ended without finish()"
            self.finish(finish_reason=reason, completion_tokens=emitted, method=self.method, draft_len=0, error=error)
        if self.span.is_recording():  # finish() has not ended it
            self.span.end()

    # -- actor spans ---------------------------------------------------------------------------

    def actor_tracing(self) -> _ActorTracing | None:
        """What the engine hands the actor calls of a sampled request (the `tracing` of
        actors/remote.py's RaySide): the W3C carrier of this request's span and where the
        actors' span records go. None when the rounds are not sampled: the actors then do
        no span work at all."""
        if not self.sample_rounds:
            return None
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=self.context)
        return _ActorTracing(self, carrier)

    def _actor_spans(self, records: list) -> None:
        with self._state:
            if not self._finished:
                self._pending.extend(records)
                return
        self._emit(records, self.context)  # late (a call answered after finish): under the request

    def _emit(self, records: Iterable, parent: Context) -> None:
        """Re-create span records (actors/tracing.py SpanRecord) as spans under `parent`."""
        tracer = self._telemetry.tracer
        for record in records:
            span = tracer.start_span(record.name, context=parent, start_time=int(record.start_ns), attributes=dict(record.attributes))
            if record.children:
                self._emit(record.children, trace_api.set_span_in_context(span))
            span.end(end_time=int(record.end_ns))

    # -- rounds ----------------------------------------------------------------------------------

    def round(
        self,
        *,
        index: int,
        start_ns: int,
        end_ns: int,
        drafted: int,
        accepted: int,
        emitted: int,
        exits: Mapping[int, int],
        accepted_exits: Mapping[int, int] | None = None,
        exit_seq: Sequence[int] | None = None,
        step_rows: int = 0,
    ) -> None:
        """Record one speculation round. start_ns / end_ns are wall-clock epoch nanoseconds
        (time.time_ns()). exits = {draft exit depth: draft tokens it produced this round};
        exit_seq = the exit of each draft token in order, when known; step_rows = the rows of
        the target forward it ran in (0: unknown, not recorded).

        Counters always count (module docstring): one draft (round) and `emitted` tokens
        under the round's exit; draft tokens per exit from exit_seq, else `exits` (any
        remainder up to `drafted` under exit="unknown"); accepted tokens per exit from the
        first `accepted` of exit_seq, else `accepted_exits`, else all under the single exit
        when `exits` has one, else under "unknown"; draft and accepted tokens per position.
        A child span "tandem.round" is recorded only when this request's rounds are sampled,
        with the actor spans that started within it as its children.
        """
        drafted, accepted, emitted = int(drafted), int(accepted), int(emitted)
        with self._state:
            self._emitted += emitted
            pending, self._pending = self._pending, []
        telemetry = self._telemetry
        base = {"target": self.target, "method": self.method}
        if self.sample_rounds:
            depths = sorted(exits)
            span = telemetry.tracer.start_span(
                ROUND_SPAN,
                context=self.context,
                start_time=int(start_ns),
                attributes={
                    "tandem.round.index": int(index),
                    "tandem.round.drafted": drafted,
                    "tandem.round.accepted": accepted,
                    "tandem.round.emitted": emitted,
                    "tandem.round.exit_depths": [int(d) for d in depths],
                    "tandem.round.exit_tokens": [int(exits[d]) for d in depths],
                },
            )
            # actor calls of this round started inside it; earlier ones (the prefill, the
            # first token) belong to the request itself
            self._emit([r for r in pending if r.start_ns >= start_ns], trace_api.set_span_in_context(span))
            self._emit([r for r in pending if r.start_ns < start_ns], self.context)
            span.end(end_time=int(end_ns))
        round_exit = _round_exit(exits, drafted)
        if step_rows > 0:
            telemetry.step_rows.record(int(step_rows), {"target": self.target})
        telemetry.num_drafts.add(1, {**base, "exit": round_exit})
        telemetry.num_emitted_tokens.add(emitted, {**base, "exit": round_exit})
        if exit_seq is not None and len(exit_seq) == drafted:
            drafted_by_exit = _count(exit_seq)
            accepted_exits = _count(exit_seq[:accepted])
        else:
            drafted_by_exit = exits
            if accepted_exits is None:
                accepted_exits = {next(iter(exits)): accepted} if len(exits) == 1 else {}
        # accepted counts are added for every exit and position that drafted, zero included,
        # so a ratio panel has both series (a target that never accepted shows 0, not nothing)
        accepted_by_label = dict(_per_exit(accepted_exits, accepted))
        for exit_label, count in _per_exit(drafted_by_exit, drafted):
            telemetry.num_draft_tokens.add(count, {**base, "exit": exit_label})
            telemetry.num_accepted_tokens.add(accepted_by_label.pop(exit_label, 0), {**base, "exit": exit_label})
        for exit_label, count in accepted_by_label.items():  # attributed to an exit the draft counts missed
            telemetry.num_accepted_tokens.add(count, {**base, "exit": exit_label})
        for position in range(drafted):
            telemetry.draft_per_pos.add(1, {**base, "position": str(position)})
            telemetry.accepted_per_pos.add(int(position < accepted), {**base, "position": str(position)})

    def first_token(self) -> None:
        """Mark the first streamed token: records the time to first token once per request."""
        if self._first_token is not None:
            return
        self._first_token = time.monotonic()
        self._telemetry.ttft.record(self._first_token - self._started, {"target": self.target})
        self.span.add_event("first_token")

    def finish(
        self,
        *,
        finish_reason: str,
        completion_tokens: int,
        method: str,
        draft_len: int,
        error: str | None = None,
    ) -> None:
        """Close the request: method is what actually ran (e.g. "pearl" for a request sent as
        "auto"). Records tandem_requests_total, the prompt and generation token counters, the
        e2e latency and, with 2+ tokens, the time per output token; error (or finish_reason
        "error") sets the span status to ERROR. Ends the span; later calls are ignored."""
        with self._state:
            if self._finished:
                return
            self._finished = True
            pending, self._pending = self._pending, []
        ended = time.monotonic()
        telemetry, labels = self._telemetry, {"target": self.target}
        completion_tokens = max(int(completion_tokens), 0)
        telemetry.requests.add(1, {"target": self.target, "method": method, "finish_reason": finish_reason})
        telemetry.prompt_tokens.add(self.prompt_tokens, labels)
        telemetry.generation_tokens.add(completion_tokens, labels)
        telemetry.e2e_latency.record(ended - self._started, labels)
        if self._first_token is not None and completion_tokens >= 2:
            # no inter-token time exists for a 1-token answer, so it is not recorded
            per_token = (ended - self._first_token) / max(completion_tokens - 1, 1)
            telemetry.time_per_output_token.record(per_token, labels)
        if pending:
            self._emit(pending, self.context)
        self.span.set_attributes(
            {
                "gen_ai.response.id": self.request_id,
                "gen_ai.response.finish_reasons": [finish_reason],
                "gen_ai.usage.output_tokens": completion_tokens,
                "tandem.finish_reason": finish_reason,
                "tandem.completion_tokens": completion_tokens,
                "tandem.method_used": method,
                "tandem.draft_len": int(draft_len),
            }
        )
        if error is not None or finish_reason == "error":
            self.span.set_attribute("tandem.error", error or "")
            self.span.set_attribute("error.type", "generation_failed")
            self.span.set_status(Status(StatusCode.ERROR, error or "generation failed"))
        self.span.end()


class _ActorTracing:
    """RaySide's `tracing` for one sampled request (actors/remote.py): the carrier the actor
    calls take as `trace=`, and `record` for the span records they answer with."""

    def __init__(self, trace: RequestTrace, carrier: dict[str, str]) -> None:
        self.carrier = carrier
        self._trace = trace

    def record(self, spans: list) -> None:
        self._trace._actor_spans(spans)


def _bearer_protected(app: Callable, token: str) -> Callable:
    """A WSGI app that answers 401 unless the request carries `Authorization: Bearer token`."""
    expected = f"Bearer {token}".encode()

    def protected(environ: dict, start_response: Callable) -> Iterable[bytes]:
        got = environ.get("HTTP_AUTHORIZATION", "").encode()
        if hmac.compare_digest(got, expected):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
        return [b"missing or wrong bearer token\n"]

    return protected


def _count(values: Iterable[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        out[int(v)] = out.get(int(v), 0) + 1
    return out


def _round_exit(exits: Mapping[int, int], drafted: int) -> str:
    """A round's exit label: its one exit, "mixed", "none" (drafted nothing) or "unknown"."""
    used = [d for d, n in exits.items() if n > 0]
    if drafted <= 0:
        return ROUND_EXIT_NONE
    if len(used) == 1:
        return str(int(used[0]))
    return ROUND_EXIT_MIXED if used else UNATTRIBUTED_EXIT


def _per_exit(by_exit: Mapping[int, int], total: int) -> list[tuple[str, int]]:
    """[(exit label, count)] for the counters: the given exits, then the rest of `total`
    under "unknown"; zero counts are skipped."""
    pairs = [(str(int(depth)), int(n)) for depth, n in sorted(by_exit.items()) if n > 0]
    rest = int(total) - sum(n for _, n in pairs)
    if rest > 0:
        pairs.append((UNATTRIBUTED_EXIT, rest))
    return pairs
