"""OpenTelemetry traces and metrics for tandem's router: one span per request, child spans per
speculation round when sampled, and the service metrics, exportable over OTLP and scrapeable
by Prometheus.

Glossary: a *request* is one Generate call; a *round* is one draft-then-verify step of the
speculation loop (the draft proposes `drafted` tokens, the target accepts `accepted` of them
and the round commits `emitted` tokens, accepted plus the corrected or bonus one); an *exit*
is the draft sub-model depth that produced a draft token (S2D sorted drafting).

Use (router side):

    telemetry = Telemetry(metrics_port=9464, trace_rounds_sample_rate=0.01)
    telemetry.observe_queue_depth(lambda: {name: q.depth() for name, q in queues.items()})
    with telemetry.request(request_id=rid, target="big", method="auto", prompt_tokens=42) as trace:
        for each round:
            trace.round(index=i, start_ns=t0, end_ns=t1, drafted=4, accepted=3, emitted=4, exits={2: 4})
            if first commit: trace.first_token()
        trace.finish(finish_reason="eos", completion_tokens=96, method="pearl", draft_len=4)
    telemetry.shutdown()

Metrics (names as exposed, identical over OTLP and Prometheus; the instruments are named with
their Prometheus suffixes already, so the exporter adds none):

    tandem_requests_total{target,method,finish_reason}    counter, {request}
    tandem_output_tokens_total{target}                   counter, {token}
    tandem_drafted_tokens_total{target,exit}             counter, {token}
    tandem_accepted_tokens_total{target,exit}            counter, {token}
    tandem_ttft_seconds{target}                          histogram, s
    tandem_time_per_output_token_seconds{target}         histogram, s
    tandem_queue_depth{target}                           gauge, {request} (queued + running)

Queue depth is an observable gauge: the router registers a callback returning {target: depth}
with observe_queue_depth(); it is read at each collection (a Prometheus scrape, an OTLP export
tick) on the exporter's thread, so it must be cheap and must not touch asyncio objects in ways
that are unsafe across threads (reading ints from a dict is fine).

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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Status, StatusCode

__all__ = ["METRIC_NAMES", "TPOT_BUCKETS_S", "TTFT_BUCKETS_S", "RequestTrace", "Telemetry"]

logger = logging.getLogger(__name__)

INSTRUMENTATION_SCOPE = "tandem.services"
REQUEST_SPAN = "tandem.generate"
ROUND_SPAN = "tandem.round"
UNATTRIBUTED_EXIT = "unknown"  # exit label for draft tokens whose exit the caller did not say

# Bucket bounds in seconds: TTFT spans queueing + prefill (ms to tens of s); time per output
# token of a speculative decoder is a fraction of one target step (sub-ms to ~1 s on CPU).
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

METRIC_NAMES = (
    "tandem_requests_total",
    "tandem_output_tokens_total",
    "tandem_drafted_tokens_total",
    "tandem_accepted_tokens_total",
    "tandem_ttft_seconds",
    "tandem_time_per_output_token_seconds",
    "tandem_queue_depth",
)


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
        self._queue_callbacks: list[Callable[[], Mapping[str, int]]] = []
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
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
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
        self.requests = meter.create_counter(
            "tandem_requests_total", unit="{request}", description="Finished Generate requests by outcome."
        )
        self.output_tokens = meter.create_counter(
            "tandem_output_tokens_total", unit="{token}", description="Tokens streamed to clients."
        )
        self.drafted_tokens = meter.create_counter(
            "tandem_drafted_tokens_total", unit="{token}", description="Draft tokens proposed, by draft exit."
        )
        self.accepted_tokens = meter.create_counter(
            "tandem_accepted_tokens_total", unit="{token}", description="Draft tokens the target accepted, by draft exit."
        )
        self.ttft = meter.create_histogram(
            "tandem_ttft_seconds",
            unit="s",
            description="Time from request arrival to its first streamed token.",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS_S,
        )
        self.time_per_output_token = meter.create_histogram(
            "tandem_time_per_output_token_seconds",
            unit="s",
            description="(end - first token) / (completion tokens - 1), per request with 2+ tokens.",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS_S,
        )
        self.queue_depth = meter.create_observable_gauge(
            "tandem_queue_depth",
            callbacks=[self._observe_queues],
            unit="{request}",
            description="Requests queued or running, per target.",
        )
        self.scale_events = meter.create_counter(
            "tandem_pool_scale_events_total", unit="{event}",
            description="Pool scaling: up/down (a replica joined/left), drain (stopped taking requests), up_failed.",
        )
        self._replica_callbacks: list[Callable[[], Mapping[str, int]]] = []
        self.pool_replicas = meter.create_observable_gauge(
            "tandem_pool_replicas",
            callbacks=[self._observe_replicas],
            unit="{replica}",
            description="Serving replicas of each pool that scales with traffic.",
        )

    def _start_prometheus(self, host: str, port: int, token: str | None) -> MetricReader:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, make_wsgi_app
        from prometheus_client.exposition import ThreadingWSGIServer
        from wsgiref.simple_server import WSGIRequestHandler, make_server

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

    def request(self, *, request_id: str, target: str, method: str, prompt_tokens: int) -> RequestTrace:
        """Open the request span (call when the request arrives, so TTFT includes queueing) and
        decide once whether its rounds get spans. Use as a context manager."""
        rate = self.trace_rounds_sample_rate
        sampled = rate >= 1.0 or (rate > 0.0 and self._rng.random() < rate)
        return RequestTrace(
            self, request_id=request_id, target=target, method=method, prompt_tokens=prompt_tokens, sample_rounds=sampled
        )

    # -- queue depth --------------------------------------------------------------------------

    def observe_queue_depth(self, callback: Callable[[], Mapping[str, int]]) -> None:
        """Report `callback()` ({target: queued + running requests}) as tandem_queue_depth at each
        collection. Several callbacks may be registered (their targets should not overlap)."""
        with self._lock:
            self._queue_callbacks.append(callback)

    def _observe_queues(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe(self._queue_callbacks, "target", "queue depth")

    def _observe(self, registered: list, label: str, what: str) -> list[Observation]:
        """One observation per key of each callback's mapping, labelled `label`=key."""
        with self._lock:
            callbacks = list(registered)
        observations = []
        for callback in callbacks:
            try:
                values = dict(callback())
            except Exception:  # a broken callback must not take the other metrics down
                logger.exception("%s callback failed", what)
                continue
            observations.extend(Observation(int(v), {label: str(k)}) for k, v in values.items())
        return observations

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
    """One request's span and timings. Created by Telemetry.request(). round() may be called
    from the thread that runs the speculation loop while first_token() / finish() run on the
    event loop; the little state they share is locked.

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
    ) -> None:
        self._telemetry = telemetry
        self.request_id = request_id
        self.target = target
        self.method = method
        self.sample_rounds = sample_rounds
        self._started = time.monotonic()
        self._first_token: float | None = None
        self._emitted = 0
        self._finished = False
        self._state = threading.Lock()  # guards _emitted and _finished
        self.span = telemetry.tracer.start_span(
            REQUEST_SPAN,
            attributes={
                "tandem.request_id": request_id,
                "tandem.target": target,
                "tandem.method": method,
                "tandem.prompt_tokens": int(prompt_tokens),
                "tandem.rounds_sampled": bool(sample_rounds),
            },
        )
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
    ) -> None:
        """Record one speculation round. start_ns / end_ns are wall-clock epoch nanoseconds
        (time.time_ns()). exits = {draft exit depth: draft tokens it produced this round}.

        Counters always count: drafted tokens per exit from `exits` (any remainder up to
        `drafted` under exit="unknown"); accepted tokens per exit from `accepted_exits` when
        given, else all under the single exit when `exits` has one, else under "unknown".
        A child span "tandem.round" is recorded only when this request was sampled.
        """
        with self._state:
            self._emitted += int(emitted)
        telemetry, target = self._telemetry, self.target
        if self.sample_rounds:
            depths = sorted(exits)
            span = telemetry.tracer.start_span(
                ROUND_SPAN,
                context=self.context,
                start_time=int(start_ns),
                attributes={
                    "tandem.round.index": int(index),
                    "tandem.round.drafted": int(drafted),
                    "tandem.round.accepted": int(accepted),
                    "tandem.round.emitted": int(emitted),
                    "tandem.round.exit_depths": [int(d) for d in depths],
                    "tandem.round.exit_tokens": [int(exits[d]) for d in depths],
                },
            )
            span.end(end_time=int(end_ns))
        for exit_label, count in _per_exit(exits, drafted):
            telemetry.drafted_tokens.add(count, {"target": target, "exit": exit_label})
        if accepted_exits is None:
            accepted_exits = {next(iter(exits)): accepted} if len(exits) == 1 else {}
        for exit_label, count in _per_exit(accepted_exits, accepted):
            telemetry.accepted_tokens.add(count, {"target": target, "exit": exit_label})

    def first_token(self) -> None:
        """Mark the first streamed token: records tandem_ttft_seconds once per request."""
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
        "auto"). Records tandem_requests_total, tandem_output_tokens_total and, with 2+ tokens,
        tandem_time_per_output_token_seconds; error (or finish_reason "error") sets the span
        status to ERROR. Ends the span; later calls are ignored."""
        with self._state:
            if self._finished:
                return
            self._finished = True
        ended = time.monotonic()
        telemetry, target = self._telemetry, self.target
        telemetry.requests.add(1, {"target": target, "method": method, "finish_reason": finish_reason})
        telemetry.output_tokens.add(max(int(completion_tokens), 0), {"target": target})
        if self._first_token is not None and completion_tokens >= 2:
            # no inter-token time exists for a 1-token answer, so it is not recorded
            per_token = (ended - self._first_token) / max(completion_tokens - 1, 1)
            telemetry.time_per_output_token.record(per_token, {"target": target})
        self.span.set_attributes(
            {
                "tandem.finish_reason": finish_reason,
                "tandem.completion_tokens": int(completion_tokens),
                "tandem.method_used": method,
                "tandem.draft_len": int(draft_len),
            }
        )
        if error is not None or finish_reason == "error":
            self.span.set_attribute("tandem.error", error or "")
            self.span.set_status(Status(StatusCode.ERROR, error or "generation failed"))
        self.span.end()


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


def _per_exit(by_exit: Mapping[int, int], total: int) -> list[tuple[str, int]]:
    """[(exit label, count)] for the counters: the given exits, then the rest of `total`
    under "unknown"; zero counts are skipped."""
    pairs = [(str(int(depth)), int(n)) for depth, n in sorted(by_exit.items()) if n > 0]
    rest = int(total) - sum(n for _, n in pairs)
    if rest > 0:
        pairs.append((UNATTRIBUTED_EXIT, rest))
    return pairs
