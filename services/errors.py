"""Errors a machine can act on: every status the server returns carries google.rpc details,
and the client turns them back into typed exceptions (below, TandemError and its subclasses).

In the `grpc-status-details-bin` trailer (a google.rpc.Status, grpcio-status's encoding):
- google.rpc.ErrorInfo on every error: domain "tandem", a stable UPPER_SNAKE `reason` (the
  constants below are the contract; a client switches on them, never on the message text),
  and metadata where it helps (the target's name).
- google.rpc.BadRequest on INVALID_ARGUMENT from validation: one FieldViolation whose `field`
  is the request field's path ("sampling.top_p", "sampling.stop[2]", "messages[1].role";
  a wrapper of one repeated field is indexed directly: messages[1] is messages.messages[1],
  prompt_token_ids[3] is prompt_token_ids.ids[3]). INVALID_ARGUMENT for request bytes that
  do not decode (reason UNDECODABLE_REQUEST) names no field and carries no BadRequest.
- google.rpc.RetryInfo on RESOURCE_EXHAUSTED and UNAVAILABLE: when to try again. The same
  delay also goes out as the `grpc-retry-pushback-ms` trailer, which gRPC's built-in retry
  (a channel's retryPolicy) waits for instead of its own backoff.

The status message stays the human-readable text (it equals google.rpc.Status.message, as
grpcio-status requires). Only grpc, grpcio-status and googleapis-common-protos are imported
here, so the client can share the reason strings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

if TYPE_CHECKING:  # the client's result type; wire imports nothing from here at run time
    from tandem.services.wire import GenerateResult

DOMAIN = "tandem"
PUSHBACK_KEY = "grpc-retry-pushback-ms"  # read by gRPC's retry (gRFC A6)

# ErrorInfo.reason values (stable: part of the API)
INVALID_FIELD = "INVALID_FIELD"  # INVALID_ARGUMENT: a field fails validation (BadRequest names it)
UNDECODABLE_REQUEST = "UNDECODABLE_REQUEST"  # INVALID_ARGUMENT: the request bytes do not parse
UNKNOWN_TARGET = "UNKNOWN_TARGET"  # NOT_FOUND: metadata target = the name asked for
QUEUE_FULL = "QUEUE_FULL"  # RESOURCE_EXHAUSTED: the target's queue is full (RetryInfo)
TARGET_UNAVAILABLE = "TARGET_UNAVAILABLE"  # UNAVAILABLE: no replica of the target could serve (RetryInfo)
DRAFT_UNAVAILABLE = "DRAFT_UNAVAILABLE"  # UNAVAILABLE: the draft side failed (RetryInfo)
UNAUTHENTICATED = "UNAUTHENTICATED"  # UNAUTHENTICATED: missing or wrong bearer token
INTERNAL = "INTERNAL"  # INTERNAL: a server bug; the server log has the request id
REASONS = (
    INVALID_FIELD, UNDECODABLE_REQUEST, UNKNOWN_TARGET, QUEUE_FULL, TARGET_UNAVAILABLE,
    DRAFT_UNAVAILABLE, UNAUTHENTICATED, INTERNAL,
)

# When an actor failed: Ray restarts it, and the health service (per target) re-reads replica
# state once a second (server.HEALTH_INTERVAL_S); sooner than that nothing has changed.
UNAVAILABLE_RETRY_S = 1.0

# A field path at the start of a message: name, name[3], a.b[2].c
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])?(?:\.[A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])?)*")


def field_path_of(message: str) -> str:
    """The field path a validation message starts with ("sampling.stop[2] must ..." ->
    "sampling.stop[2]"); "" when it starts with none."""
    m = _PATH.match(message)
    return m.group(0) if m else ""


def status_proto(
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str,
    metadata: Mapping[str, str] | None = None,
    field: str | None = None,
    retry_delay_s: float | None = None,
) -> status_pb2.Status:
    """google.rpc.Status with ErrorInfo, and BadRequest (field given) and RetryInfo (delay
    given)."""
    if reason not in REASONS:
        raise ValueError(f"reason {reason!r} is not one of {', '.join(REASONS)}")
    status = status_pb2.Status(code=code.value[0], message=message)
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=dict(metadata or {}))
    status.details.add().Pack(info)
    if field is not None:
        bad = error_details_pb2.BadRequest()
        bad.field_violations.add(field=field, description=message, reason=reason)
        status.details.add().Pack(bad)
    if retry_delay_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(retry_delay_s * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def trailing_metadata(status: status_pb2.Status, retry_delay_s: float | None = None) -> tuple[tuple[str, str | bytes], ...]:
    """The trailers that carry `status`: grpc-status-details-bin, plus the pushback."""
    out = tuple(rpc_status.to_status(status).trailing_metadata)
    if retry_delay_s is not None:
        out += ((PUSHBACK_KEY, str(max(0, round(retry_delay_s * 1000)))),)
    return out


async def abort(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str,
    metadata: Mapping[str, str] | None = None,
    field: str | None = None,
    retry_delay_s: float | None = None,
) -> None:
    """End the call with `code`, `message` and their google.rpc details (raises, like
    context.abort)."""
    status = status_proto(code, message, reason=reason, metadata=metadata, field=field, retry_delay_s=retry_delay_s)
    await context.abort(code, message, trailing_metadata(status, retry_delay_s))


# ----------------------------------------------------------------------------------------
# The client's side: typed exceptions from a status and its details
# ----------------------------------------------------------------------------------------


class TandemError(Exception):
    """A failed RPC: its gRPC status code and details, e.g. "NOT_FOUND: target 'x' is not served".

    From the server's google.rpc details (None or empty when the status carried none, e.g.
    a deadline the client's own gRPC enforced):
    - reason: ErrorInfo.reason, a stable name to switch on ("QUEUE_FULL", "UNKNOWN_TARGET",
      "INVALID_FIELD", ...; see services/errors.py); metadata: ErrorInfo.metadata ({"target": ...})
    - field_violations: BadRequest's [(field path, description), ...] (INVALID_ARGUMENT)
    - retry_delay: RetryInfo in seconds, when to try again (RESOURCE_EXHAUSTED, UNAVAILABLE)
    `partial` holds what generate() had received before the failure (None elsewhere).
    Failed RPCs raise the subclass for their code (InvalidArgumentError, NotFoundError, ...).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        partial: GenerateResult | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details
        self.partial = partial
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.field_violations = [(str(f), str(d)) for f, d in field_violations]
        self.retry_delay = retry_delay

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"

    def __reduce__(self):  # picklable (e.g. across Ray or multiprocessing), partial and details included
        extra = {
            "reason": self.reason,
            "metadata": self.metadata,
            "field_violations": self.field_violations,
            "retry_delay": self.retry_delay,
        }
        return (_rebuild_error, (self.code.name, self.details, self.partial, extra, type(self)))


class InvalidArgumentError(TandemError):
    """INVALID_ARGUMENT: a request field the server refused; field_violations names it."""


class NotFoundError(TandemError):
    """NOT_FOUND: e.g. a target the server does not serve (reason UNKNOWN_TARGET)."""


class ResourceExhaustedError(TandemError):
    """RESOURCE_EXHAUSTED: the target's queue is full (reason QUEUE_FULL); retry_delay says
    when to try again."""


class UnavailableError(TandemError):
    """UNAVAILABLE: the server, or a target's replicas, could not serve; retry_delay says
    when to try again (None when the server was not reached)."""


class UnauthenticatedError(TandemError):
    """UNAUTHENTICATED: missing or wrong bearer token."""


class DeadlineExceededError(TandemError):
    """DEADLINE_EXCEEDED: the call's timeout passed."""


class InternalError(TandemError):
    """INTERNAL: a server-side failure (the server log has the request id)."""


ERROR_CLASSES: dict[grpc.StatusCode, type[TandemError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.INTERNAL: InternalError,
}


def _rebuild_error(
    code_name: str, details: str, partial: GenerateResult | None, extra: dict | None = None, cls: type | None = None
) -> TandemError:
    return (cls or TandemError)(grpc.StatusCode[code_name], details, partial=partial, **(extra or {}))


def error_from_status(code: grpc.StatusCode, details: str, status: status_pb2.Status | None = None) -> TandemError:
    """The TandemError subclass for `code`, with what `status`'s google.rpc details say
    (ErrorInfo, BadRequest, RetryInfo; other details are skipped)."""
    kw: dict[str, Any] = {}
    violations: list[tuple[str, str]] = []
    for detail in status.details if status is not None else ():
        info, bad, retry = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest(), error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            kw["reason"] = info.reason or None
            kw["metadata"] = dict(info.metadata)
        elif detail.Unpack(bad):
            violations.extend((v.field, v.description) for v in bad.field_violations)
        elif detail.Unpack(retry):
            kw["retry_delay"] = retry.retry_delay.ToNanoseconds() / 1e9
    return ERROR_CLASSES.get(code, TandemError)(code, details, field_violations=violations, **kw)


def error_from_rpc(error: grpc.RpcError) -> TandemError:
    """The TandemError for a grpc.RpcError (sync or aio; both are grpc.Call with their
    trailers at hand), with the server's google.rpc details; UNKNOWN when it carries no status."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = error.details() if callable(getattr(error, "details", None)) else None
    status = None
    if code is not None and callable(getattr(error, "trailing_metadata", None)):
        try:
            status = rpc_status.from_call(error)
        except ValueError:  # details that contradict the status: ignore them, keep the status
            status = None
    return error_from_status(code or grpc.StatusCode.UNKNOWN, details or str(error) or "RPC failed", status)
