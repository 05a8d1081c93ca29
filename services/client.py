"""Python client for tandem's gRPC API (proto/tandem/v1/tandem.proto), sync and asyncio.

    with TandemClient("127.0.0.1:50051", token="s3cret") as client:
        for chunk in client.generate_stream(target="qwen-7b", prompt="Hello"):
            print(chunk.text, end="", flush=True)
        result = client.generate(target="qwen-7b", messages=[{"role": "user", "content": "Hi"}])
        print(result.stats["mean_accepted_len"])

    async with AsyncTandemClient("127.0.0.1:50051") as client:
        async for chunk in client.generate_stream(target="qwen-7b", prompt="Hello"):
            ...

Glossary (as in the .proto): a *chunk* is one streamed GenerateResponse, the tokens of one
commit of the speculation loop; the last chunk carries finish_reason, usage and stats. A
*result* is all chunks of one request folded together.

Conventions
- Unset optional arguments (None) stay unset in the request, so the server's defaults apply.
- Bad arguments raise ValueError naming the field, before anything is sent.
- Failed RPCs raise TandemError(code, details), as the subclass for the code
  (InvalidArgumentError, NotFoundError, ResourceExhaustedError, UnavailableError, ...), with
  the server's google.rpc details: .reason (ErrorInfo), .field_violations (BadRequest),
  .retry_delay (RetryInfo); `generate` attaches the tokens received before the failure as
  `error.partial`.
- Calls refused before any response (UNAVAILABLE, RESOURCE_EXHAUSTED) are retried by gRPC
  itself (`retries=`, default 3), after the delay the server asks for; a stream that already
  sent tokens is never retried.
- Several routers (ray.shared_pools): give an address that resolves to all of them (a
  headless Service's DNS name, or "ipv4:host1:port,host2:port"): calls go round-robin, and a
  call refused by a router that is stopping or gone is retried on another.
- The bearer token travels as per-call metadata ("authorization", "Bearer <token>"), so it also
  works over plaintext channels (gRPC call credentials would require TLS).
- Tracing is opt-in: with trace_context=True (and `pip install "tandem[tracing]"`) each call
  carries the caller's current OpenTelemetry context as W3C `traceparent` metadata, and the
  server's request span (with its rounds and actor spans) joins that trace.

The message conversions (build_generate_request, sampling_to_proto, chunk_from_proto,
collect_chunks, stats_to_dict, method_to_enum, model_info_to_dict, ...) live in
services/wire.py and the exceptions in services/errors.py, both shared with the server side
and re-exported here; this module holds the channels and the two clients, sync and asyncio,
which mirror each other method for method (the reason this module runs past ~400 lines:
splitting the twins would scatter one API over two files).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.v1 import tandem_pb2, tandem_pb2_grpc

from tandem.services.errors import (  # noqa: F401 - re-exported: the client's API
    ERROR_CLASSES,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    TandemError,
    UnauthenticatedError,
    UnavailableError,
    error_from_rpc,
    error_from_status,
)
from tandem.services.wire import (  # noqa: F401 - re-exported: the client's API
    CHAT_ROLES,
    FINISH_REASONS,
    GenerateChunk,
    GenerateResult,
    MAX_DRAFT_LEN,
    METHODS,
    TokenLogprob,
    _check_float,
    _check_int,
    _fold,
    _list_models_to_dict,
    build_generate_request,
    chunk_from_proto,
    collect_chunks,
    enum_to_method,
    finish_reason_name,
    finish_reason_to_enum,
    method_to_enum,
    model_info_to_dict,
    sampling_to_proto,
    server_info_to_dict,
    stats_from_dict,
    stats_to_dict,
)

__all__ = [
    "METHODS",
    "FINISH_REASONS",
    "AsyncGenerateStream",
    "AsyncTandemClient",
    "GenerateChunk",
    "GenerateResult",
    "GenerateStream",
    "TandemClient",
    "TandemError",
    "TokenLogprob",
    "InvalidArgumentError",
    "NotFoundError",
    "ResourceExhaustedError",
    "UnavailableError",
    "UnauthenticatedError",
    "DeadlineExceededError",
    "InternalError",
    "error_from_status",
    "server_info_to_dict",
    "service_config",
    "build_generate_request",
    "chunk_from_proto",
    "collect_chunks",
    "enum_to_method",
    "error_from_rpc",
    "finish_reason_name",
    "finish_reason_to_enum",
    "method_to_enum",
    "model_info_to_dict",
    "sampling_to_proto",
    "stats_from_dict",
    "stats_to_dict",
]


def _error_in_result(result: GenerateResult) -> TandemError | None:
    """A stream that ended OK but whose last message says FINISH_REASON_ERROR still failed."""
    if result.finish_reason == "error":
        return InternalError(grpc.StatusCode.INTERNAL, result.error or "generation failed", partial=result)
    return None


def _health_status_name(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


# ----------------------------------------------------------------------------------------
# Channels
# ----------------------------------------------------------------------------------------


# gRPC's own retry (gRFC A6), set in the channel's service config. It retries a call only
# while no response has arrived: a refused Generate (full queue, no replica) yes, a stream
# that already sent tokens never. The server's RetryInfo delay comes as the
# grpc-retry-pushback-ms trailer, which replaces the backoff below when present. Per-call
# metadata (the bearer token) goes with every attempt; all attempts share the call's timeout.
RETRIED_METHODS = ("Generate", "ListModels", "GetServerInfo")
RETRY_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
DEFAULT_RETRIES = 3
MAX_RETRIES = 4  # gRPC caps maxAttempts at 5
# Keepalive: ping every KEEPALIVE_S, also while idle, so a dead connection is noticed within
# KEEPALIVE_S + KEEPALIVE_TIMEOUT_S rather than at the next call. tandem's server accepts
# pings every 10 s or slower, with or without calls (services/server.py); a server with gRPC's
# defaults answers idle pings with GOAWAY "too_many_pings": pass keepalive=None for those.
KEEPALIVE_S = 30.0
KEEPALIVE_TIMEOUT_S = 10.0
# How soon a channel tries a router again after losing it. gRPC's default backoff grows to
# 120 s, so a router that restarts (a rolling upgrade) would stay out of a client's rotation
# long after it serves again, and stopping the next router would leave none; measured in
# bench/ha_check.py: requests failed "connections to all backends failing" with the default.
RECONNECT_BACKOFF_S = (0.25, 2.0)  # first, most


def service_config(retries: int) -> dict[str, Any]:
    """The channel's service config: calls spread round-robin over every address the
    target resolves to (several routers behind one DNS name, or a list such as
    "ipv4:10.0.0.1:50051,10.0.0.2:50051"; a router that goes away leaves the rotation), and
    up to `retries` retries of the Tandem RPCs on UNAVAILABLE and RESOURCE_EXHAUSTED,
    exponential backoff from 0.25 s to 5 s (jittered) unless the server pushes back."""
    _check_int("retries", retries, low=0, high=MAX_RETRIES)
    balanced: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retries == 0:
        return balanced
    service = tandem_pb2.DESCRIPTOR.services_by_name["Tandem"].full_name
    return {
        **balanced,
        "methodConfig": [
            {
                "name": [{"service": service, "method": m} for m in RETRIED_METHODS],
                "retryPolicy": {
                    "maxAttempts": retries + 1,
                    "initialBackoff": "0.25s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": list(RETRY_CODES),
                },
            }
        ]
    }


def _channel_options(
    max_message_bytes: int, *, retries: int = DEFAULT_RETRIES, keepalive: float | None = KEEPALIVE_S
) -> list[tuple[str, Any]]:
    _check_int("max_message_bytes", max_message_bytes, low=1, high=2**31 - 1)
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    options.append(("grpc.service_config", json.dumps(service_config(retries))))
    options += [
        ("grpc.initial_reconnect_backoff_ms", int(RECONNECT_BACKOFF_S[0] * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(RECONNECT_BACKOFF_S[0] * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(RECONNECT_BACKOFF_S[1] * 1000)),
    ]
    if retries == 0:
        options.append(("grpc.enable_retries", 0))
    if keepalive is not None:
        if not _check_float("keepalive", keepalive) > 0:
            raise ValueError(f"keepalive must be > 0 seconds or None; got {keepalive}")
        options += [
            ("grpc.keepalive_time_ms", int(keepalive * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),  # no cap on pings between calls
        ]
    return options


def _trace_injector():
    """opentelemetry.propagate.inject: writes the current context with the process's
    text-map propagator (W3C trace context by default)."""
    try:
        from opentelemetry.propagate import inject
    except ImportError as exc:  # the client alone does not need OpenTelemetry
        raise ImportError("trace_context=True needs OpenTelemetry: pip install 'tandem[tracing]'") from exc
    return inject


class _ClientConfig:
    """What both clients share: the call metadata, default timeout and channel settings.
    TLS is on when tls=True or root_certificates is given (None: the system roots)."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None,
        tls: bool,
        root_certificates: bytes | None,
        timeout: float | None,
        max_message_bytes: int,
        retries: int = DEFAULT_RETRIES,
        keepalive: float | None = KEEPALIVE_S,
        trace_context: bool = False,
    ) -> None:
        if not isinstance(address, str) or not address:
            raise ValueError(f"address must be 'host:port'; got {address!r}")
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError("token must be a non-empty string or None")
        if timeout is not None and not _check_float("timeout", timeout) > 0:
            raise ValueError(f"timeout must be > 0 seconds or None; got {timeout}")
        self.address = address
        self.tls = bool(tls or root_certificates is not None)
        self.root_certificates = root_certificates
        self.timeout = timeout
        self.options = _channel_options(max_message_bytes, retries=retries, keepalive=keepalive)
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        if not isinstance(trace_context, bool):
            raise ValueError(f"trace_context must be True or False; got {trace_context!r}")
        self._inject = _trace_injector() if trace_context else None

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """One call's metadata: the token, plus with trace_context the caller's current
        OpenTelemetry context (W3C `traceparent`/`tracestate`), which the server's request
        span continues."""
        if self._inject is None:
            return self.metadata
        carrier: dict[str, str] = {}
        self._inject(carrier)
        return self.metadata + tuple(carrier.items())

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)

    def call_timeout(self, timeout: float | None) -> float | None:
        if timeout is None:
            return self.timeout
        if not _check_float("timeout", timeout) > 0:
            raise ValueError(f"timeout must be > 0 seconds or None; got {timeout}")
        return timeout


# ----------------------------------------------------------------------------------------
# Sync client
# ----------------------------------------------------------------------------------------


class GenerateStream(Iterator[GenerateChunk]):
    """The chunks of one Generate call. Iterate it; cancel() (or close(), leaving a `with`
    block, or dropping the stream after `break`) ends the RPC early; iteration then stops."""

    def __init__(self, call: Any) -> None:
        self._call = call  # grpc's rendezvous: an iterator of GenerateResponse and a grpc.Call
        self._closed = False

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> GenerateChunk:
        if self._closed:
            raise StopIteration
        try:
            return chunk_from_proto(next(self._call))
        except StopIteration:
            self._closed = True
            raise
        except grpc.RpcError as error:
            if self._closed:  # we cancelled it ourselves
                raise StopIteration from None
            raise error_from_rpc(error) from None

    def cancel(self) -> None:
        self._closed = True
        self._call.cancel()

    close = cancel

    def __del__(self) -> None:  # dropped mid-stream (e.g. `break`): end the RPC now
        if not getattr(self, "_closed", True):
            try:
                self.cancel()
            except Exception:  # interpreter or event loop already shutting down
                pass

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class TandemClient:
    """Blocking client over grpc.secure_channel / insecure_channel. Thread-safe like the channel.

    timeout is the default deadline of each call in seconds (a whole stream for generate);
    max_message_bytes bounds messages both ways. retries (0..4, 0 = off) is how often gRPC
    retries a call refused with UNAVAILABLE or RESOURCE_EXHAUSTED before any response came,
    waiting what the server's RetryInfo says (see service_config); a stream that sent tokens
    is never retried. keepalive is the ping interval in seconds (None: no pings).
    trace_context=True sends the caller's current OpenTelemetry context with each call (needs
    `tandem[tracing]`), so the server's spans join the caller's trace. Use as a context
    manager or call close().
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
        retries: int = DEFAULT_RETRIES,
        keepalive: float | None = KEEPALIVE_S,
        trace_context: bool = False,
    ) -> None:
        self._config = _ClientConfig(
            address,
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
            retries=retries,
            keepalive=keepalive,
            trace_context=trace_context,
        )
        cfg = self._config
        if cfg.tls:
            self._channel = grpc.secure_channel(address, cfg.credentials(), options=cfg.options)
        else:
            self._channel = grpc.insecure_channel(address, options=cfg.options)
        self._stub = tandem_pb2_grpc.TandemStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate_stream(self, *, timeout: float | None = None, **request: Any) -> GenerateStream:
        """Start Generate; returns the stream of chunks. `request`: the keyword arguments of
        build_generate_request (target, prompt / messages / prompt_token_ids, sampling and
        speculation fields); a bad one raises ValueError naming it, before anything is sent."""
        message = build_generate_request(**request)
        call = self._stub.Generate(message, timeout=self._config.call_timeout(timeout), metadata=self._config.call_metadata())
        return GenerateStream(call)

    def generate(self, *, timeout: float | None = None, **request: Any) -> GenerateResult:
        """The whole stream collected into one GenerateResult (request: as generate_stream's);
        raises TandemError (with .partial) when the call fails or the last message reports
        an error."""
        result = GenerateResult(text="", token_ids=[], finish_reason=None, usage=None, stats=None)
        texts: list[str] = []
        with self.generate_stream(timeout=timeout, **request) as stream:
            try:
                for chunk in stream:
                    _fold(result, texts, chunk)
            except TandemError as error:
                result.text = "".join(texts)
                error.partial = result
                raise
        result.text = "".join(texts)
        if (error := _error_in_result(result)) is not None:
            raise error
        return result

    def list_models(self, *, timeout: float | None = None) -> dict[str, Any]:
        """{"targets": [model dict, ...], "draft": model dict or None}; see model_info_to_dict."""
        try:
            response = self._stub.ListModels(
                tandem_pb2.ListModelsRequest(), timeout=self._config.call_timeout(timeout), metadata=self._config.call_metadata()
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        return _list_models_to_dict(response)

    def get_server_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The server's version and limits; see server_info_to_dict."""
        try:
            response = self._stub.GetServerInfo(
                tandem_pb2.GetServerInfoRequest(), timeout=self._config.call_timeout(timeout), metadata=self._config.call_metadata()
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        return server_info_to_dict(response)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 Check: "SERVING", "NOT_SERVING", ... ("" = the whole server)."""
        try:
            response = self._health.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self._config.call_timeout(timeout),
                metadata=self._config.call_metadata(),
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        return _health_status_name(response)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TandemClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------------------
# asyncio client
# ----------------------------------------------------------------------------------------


class AsyncGenerateStream(AsyncIterator[GenerateChunk]):
    """The chunks of one Generate call on grpc.aio. `async for` it; breaking out of the loop
    (which drops the stream), aclose(), cancel() or leaving an `async with` block cancels the
    RPC; cancelling the consuming task cancels it too and propagates CancelledError."""

    def __init__(self, call: Any) -> None:
        self._call = call  # grpc.aio.UnaryStreamCall
        self._closed = False

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> GenerateChunk:
        if self._closed:
            raise StopAsyncIteration
        try:
            message = await self._call.read()
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        except asyncio.CancelledError:
            # cancel() from another task ends the stream; our own task being cancelled propagates
            task = asyncio.current_task()
            if self._closed and not (task is not None and getattr(task, "cancelling", lambda: 0)()):
                raise StopAsyncIteration from None
            raise
        if message is grpc.aio.EOF:
            self._closed = True
            raise StopAsyncIteration
        return chunk_from_proto(message)

    def cancel(self) -> None:
        self._closed = True
        self._call.cancel()

    async def aclose(self) -> None:
        self.cancel()

    def __del__(self) -> None:
        # Dropped mid-stream (e.g. `break` out of `async for`): end the RPC now. grpc.aio's own
        # cancel-on-GC does not fire promptly, as the call stays referenced by its tasks.
        if not getattr(self, "_closed", True):
            try:
                self.cancel()
            except Exception:  # interpreter or event loop already shutting down
                pass

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncTandemClient:
    """The TandemClient API on grpc.aio (trace_context included); create it inside the event
    loop that uses it. Use `async with` or `await close()`."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
        retries: int = DEFAULT_RETRIES,
        keepalive: float | None = KEEPALIVE_S,
        trace_context: bool = False,
    ) -> None:
        self._config = _ClientConfig(
            address,
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
            retries=retries,
            keepalive=keepalive,
            trace_context=trace_context,
        )
        cfg = self._config
        if cfg.tls:
            self._channel = grpc.aio.secure_channel(address, cfg.credentials(), options=cfg.options)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=cfg.options)
        self._stub = tandem_pb2_grpc.TandemStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate_stream(self, *, timeout: float | None = None, **request: Any) -> AsyncGenerateStream:
        """Start Generate; returns an async iterator of chunks (not a coroutine: no await).
        `request`: the keyword arguments of build_generate_request."""
        message = build_generate_request(**request)
        call = self._stub.Generate(message, timeout=self._config.call_timeout(timeout), metadata=self._config.call_metadata())
        return AsyncGenerateStream(call)

    async def generate(self, *, timeout: float | None = None, **request: Any) -> GenerateResult:
        """The whole stream collected (request: build_generate_request's keyword arguments);
        TandemError (with .partial) on failure."""
        result = GenerateResult(text="", token_ids=[], finish_reason=None, usage=None, stats=None)
        texts: list[str] = []
        async with self.generate_stream(timeout=timeout, **request) as stream:
            try:
                async for chunk in stream:
                    _fold(result, texts, chunk)
            except TandemError as error:
                result.text = "".join(texts)
                error.partial = result
                raise
        result.text = "".join(texts)
        if (error := _error_in_result(result)) is not None:
            raise error
        return result

    async def list_models(self, *, timeout: float | None = None) -> dict[str, Any]:
        try:
            response = await self._stub.ListModels(
                tandem_pb2.ListModelsRequest(), timeout=self._config.call_timeout(timeout), metadata=self._config.call_metadata()
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        return _list_models_to_dict(response)

    async def get_server_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        try:
            response = await self._stub.GetServerInfo(
                tandem_pb2.GetServerInfoRequest(), timeout=self._config.call_timeout(timeout), metadata=self._config.call_metadata()
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        return server_info_to_dict(response)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self._config.call_timeout(timeout),
                metadata=self._config.call_metadata(),
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        return _health_status_name(response)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    async def __aenter__(self) -> AsyncTandemClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
