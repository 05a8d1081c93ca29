"""Server bootstrap: the Tandem service, grpc.health.v1, reflection, bearer-token auth,
TLS, and message size limits, on a grpc.aio server."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tandem.v1 import tandem_pb2 as pb
from tandem.services import errors
from tandem.services.router import Router
from tandem.services.servicer import TandemServicer, add_tandem_servicer

log = logging.getLogger("tandem.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tandem"].full_name  # "tandem.v1.Tandem"
# Health checks carry no credentials (Kubernetes probes); everything else needs the token.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` metadata on every call but health checks."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("auth token must not be empty")
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(got, self._expected)
        return False

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(UNAUTHENTICATED_PREFIXES) or self._authorized(details):
            return await continuation(details)
        handler = await continuation(details)
        message = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"

        async def deny(request, context):
            await errors.abort(context, grpc.StatusCode.UNAUTHENTICATED, message, reason=errors.UNAUTHENTICATED)

        async def deny_stream(request, context):
            await deny(request, context)
            yield  # pragma: no cover - makes this an async generator

        if handler is None:
            # an unknown method: without a token a caller learns nothing, not even that it
            # does not exist (UNAUTHENTICATED, not UNIMPLEMENTED)
            return grpc.unary_unary_rpc_method_handler(deny)

        kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny, **kw)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
        return grpc.unary_unary_rpc_method_handler(deny, **kw)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    servicer: TandemServicer
    health_task: asyncio.Task | None = None

    async def stop(self, grace: float = 5.0) -> None:
        if self.health_task is not None:
            self.health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.health_task
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.servicer.shutdown()


HEALTH_INTERVAL_S = 1.0

# Keepalive (gRFC A8). The server pings a connection idle for KEEPALIVE_S and closes it when
# the ping goes unanswered for KEEPALIVE_TIMEOUT_S (a dead client, a dropped NAT entry). It
# accepts client pings as often as every MIN_CLIENT_PING_S, with or without calls in flight:
# tandem's client pings every 30 s (client.KEEPALIVE_S), so it never collects ping strikes and
# a GOAWAY "too_many_pings"; a client pinging faster is told to back off after 2 strikes.
KEEPALIVE_S = 60.0
KEEPALIVE_TIMEOUT_S = 20.0
MIN_CLIENT_PING_S = 10.0


def server_options(max_message_bytes: int, *, min_client_ping_s: float = MIN_CLIENT_PING_S) -> list[tuple[str, int]]:
    """The grpc.aio server's channel arguments: message limits and keepalive policy."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(KEEPALIVE_S * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", int(min_client_ping_s * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
    ]


async def watch_target_health(servicer: health.aio.HealthServicer, source: Callable[[], Mapping[str, bool]]) -> None:
    """Per-target health: the service name is the target's name; NOT_SERVING while none of
    its replicas can take a request (all hung, dead or restarting), SERVING otherwise."""
    last: dict[str, bool] = {}
    while True:
        try:
            states = dict(source())
        except Exception:  # noqa: BLE001 - health reporting never takes the server down
            log.exception("reading target health failed")
            states = {}
        for name, ok in states.items():
            if last.get(name) != ok:
                status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
                await servicer.set(name, status)
                if name in last:
                    log.warning("target %r is %s", name, "serving again" if ok else "NOT serving (no healthy replica)")
                last[name] = ok
        await asyncio.sleep(HEALTH_INTERVAL_S)


async def start_server(
    router: Router,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    auth_token: str | None = None,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
    max_message_bytes: int = 4 * 1024 * 1024,
    max_new_tokens_limit: int = 4096,
    default_max_new_tokens: int = 256,
    draft_info: dict | None = None,
    target_health: Callable[[], Mapping[str, bool]] | None = None,
) -> RunningServer:
    """Start serving; returns the bound port (port 0 picks a free one)."""
    interceptors = [BearerAuthInterceptor(auth_token)] if auth_token else []
    server = grpc.aio.server(interceptors=interceptors, options=server_options(max_message_bytes))
    servicer = TandemServicer(
        router,
        max_new_tokens_limit=max_new_tokens_limit,
        default_max_new_tokens=default_max_new_tokens,
        draft_info=draft_info,
        max_request_bytes=max_message_bytes,
    )
    add_tandem_servicer(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{host}:{port}"
    if tls_cert is not None:
        creds = grpc.ssl_server_credentials([(tls_key, tls_cert)])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"server: cannot bind {address}")
    await server.start()
    for name in ("", SERVICE_NAME, *router.routes):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    task = asyncio.create_task(watch_target_health(health_servicer, target_health)) if target_health is not None else None
    log.info("tandem serving on %s:%d", host, bound)
    return RunningServer(server=server, port=bound, health=health_servicer, servicer=servicer, health_task=task)
