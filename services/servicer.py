"""gRPC servicer: proto messages <-> router dataclasses, field validation, status codes.

Every failure a client can cause or see maps to a status code with a message that names
the field, and google.rpc details a program can act on (services/errors.py: ErrorInfo's
reason, BadRequest's field path, RetryInfo); nothing else leaves the server (unexpected
errors are logged with the request id and answered INTERNAL without a stack trace).

Past 400 lines because every request field's validation lives here, next to the
proto-to-router conversion it guards: one place to read what a request may hold.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import grpc

from tandem.actors.pools import DRAFT_POOL
from tandem.actors.speculative import SideUnavailableError
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc
from tandem.services import errors
from tandem.speculation.plan import MAX_DRAFT_LEN, METHODS, check_context
from tandem.services.admission import QueueFullError
from tandem.services.router import Delta, RouteRequest, Router, TargetRoute, UnknownTargetError
from tandem.services.telemetry import context_from_metadata
from tandem.speculation.sampling import SamplingParams

log = logging.getLogger("tandem.servicer")

METHOD_BY_ENUM = {
    pb.SPECULATION_METHOD_UNSPECIFIED: "auto",  # unset: the server's default
    pb.SPECULATION_METHOD_AUTO: "auto",
    pb.SPECULATION_METHOD_OFF: "off",
    pb.SPECULATION_METHOD_SD: "sd",
    pb.SPECULATION_METHOD_SORTED: "sorted",
    pb.SPECULATION_METHOD_PEARL: "pearl",
    pb.SPECULATION_METHOD_SPECTR: "spectr",
}
ENUM_BY_METHOD = {v: k for k, v in METHOD_BY_ENUM.items() if k != pb.SPECULATION_METHOD_UNSPECIFIED}
FINISH_BY_NAME = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "eos": pb.FINISH_REASON_EOS,
    "cancelled": pb.FINISH_REASON_CANCELLED,
    "deadline": pb.FINISH_REASON_DEADLINE,
    "error": pb.FINISH_REASON_ERROR,
}
ROLES = {"system", "user", "assistant"}
MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256
MAX_REQUEST_ID = 128
MAX_MESSAGES = 256
MAX_TOP_LOGPROBS = 20  # the largest sampling.logprobs (alternatives per token)
API_VERSION = pb.DESCRIPTOR.package  # "tandem.v1"
# A token of these tokenizers spans far fewer characters than this, so text longer than
# max_context * MAX_CHARS_PER_TOKEN cannot fit the context: it is refused before the
# tokenizer spends seconds on it.
MAX_CHARS_PER_TOKEN = 32


class FieldError(ValueError):
    """A request field that fails validation; the message starts with the field path.

    `field` is that path ("sampling.stop[2]", "messages[1].role"), sent to the client in
    google.rpc.BadRequest; left out, it is read from the start of the message.
    """

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field if field is not None else errors.field_path_of(message)


@dataclass(frozen=True)
class UndecodableRequest:
    """Stands in for a request message whose bytes do not parse (invalid UTF-8, truncated
    fields). The handler answers it INVALID_ARGUMENT, after the auth interceptor ran: a
    failing deserializer would answer UNKNOWN before any handler or interceptor."""

    message: str
    error: str


def tolerant_deserializer(message_cls):
    """`message_cls.FromString`, returning UndecodableRequest instead of raising."""

    def deserialize(data: bytes):
        try:
            return message_cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
            return UndecodableRequest(message=message_cls.DESCRIPTOR.full_name, error=str(exc) or type(exc).__name__)

    return deserialize


def add_tandem_servicer(servicer: "TandemServicer", server) -> None:
    """Register the Tandem service like the generated add_TandemServicer_to_server, with
    request deserializers that never raise (see UndecodableRequest)."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=tolerant_deserializer(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=tolerant_deserializer(pb.ListModelsRequest),
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetServerInfo,
            request_deserializer=tolerant_deserializer(pb.GetServerInfoRequest),
            response_serializer=pb.GetServerInfoResponse.SerializeToString,
        ),
    }
    name = pb.DESCRIPTOR.services_by_name["Tandem"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


async def abort_if_undecodable(request, context) -> None:
    if isinstance(request, UndecodableRequest):
        await errors.abort(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request: not a valid {request.message} message ({request.error})",
            reason=errors.UNDECODABLE_REQUEST,
        )


def field_of(exc: ValueError) -> str:
    """The request field a validation error names: FieldError's own, else the path its
    message starts with when that is a GenerateRequest field; "" when it names none."""
    if isinstance(exc, FieldError):
        return exc.field
    path = errors.field_path_of(str(exc))
    return path if path.split(".")[0].split("[")[0] in pb.GenerateRequest.DESCRIPTOR.fields_by_name else ""


async def abort_invalid(context, exc: ValueError) -> None:
    """INVALID_ARGUMENT for a field that fails validation, with google.rpc.BadRequest."""
    await errors.abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), reason=errors.INVALID_FIELD, field=field_of(exc))


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise FieldError(f"{name} must be a finite number, got {value}")
    return float(value)


def parse_sampling(msg: pb.GenerateRequest, *, limit: int, default_max_new: int) -> tuple[SamplingParams, int]:
    s = msg.sampling
    temperature = _finite("sampling.temperature", s.temperature) if s.HasField("temperature") else 0.0
    if temperature < 0:
        raise FieldError(f"sampling.temperature must be >= 0, got {temperature}")
    top_p = _finite("sampling.top_p", s.top_p) if s.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise FieldError(f"sampling.top_p must be in (0, 1], got {top_p}")
    top_k = s.top_k if s.HasField("top_k") else 0
    if top_k < 0:
        raise FieldError(f"sampling.top_k must be >= 0, got {top_k}")
    seed = s.seed if s.HasField("seed") else None
    # unset or 0: the server's default (proto3 clients often send 0 for "not set")
    max_new = s.max_new_tokens if s.HasField("max_new_tokens") and s.max_new_tokens > 0 else default_max_new
    if max_new > limit:
        raise FieldError(f"sampling.max_new_tokens must be <= {limit}, got {max_new}")
    # min_p and the penalties: finite here, their ranges are SamplingParams' (one definition)
    shaping = {
        name: _finite(f"sampling.{name}", getattr(s, name))
        for name in ("min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
        if s.HasField(name)
    }
    logprobs = s.logprobs if s.HasField("logprobs") else None
    if logprobs is not None and logprobs > MAX_TOP_LOGPROBS:
        raise FieldError(f"sampling.logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}")
    try:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, logprobs=logprobs, **shaping)
    except ValueError as exc:
        raise FieldError(f"sampling.{exc}") from None
    if not params.greedy and params.seed is None:
        # drawn here so the last message can echo it: resending it reproduces the output
        params = replace(params, seed=secrets.randbits(63))
    return params, int(max_new)


def parse_stops(msg: pb.GenerateRequest, vocab_size: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    stop = tuple(msg.sampling.stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise FieldError(f"sampling.stop holds at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    for i, s in enumerate(stop):
        if not s:
            raise FieldError(f"sampling.stop[{i}] must not be empty")
        if len(s) > MAX_STOP_LEN:
            raise FieldError(f"sampling.stop[{i}] is longer than {MAX_STOP_LEN} characters")
    ids = tuple(int(t) for t in msg.sampling.stop_token_ids)
    for i, t in enumerate(ids):
        if t >= vocab_size:
            raise FieldError(f"sampling.stop_token_ids[{i}] = {t} is outside the vocabulary ({vocab_size})")
    return stop, ids


def input_field(msg: pb.GenerateRequest) -> str:
    """The field holding the request's input ("prompt", "messages" or "prompt_token_ids")."""
    which = msg.WhichOneof("input")
    if which is None:
        raise FieldError("prompt: give one of prompt, messages or prompt_token_ids")
    return which


def check_input_size(msg: pb.GenerateRequest, route: TargetRoute) -> None:
    """Refuse input that cannot fit the target's context, before tokenizing it."""
    which = input_field(msg)
    if which == "prompt_token_ids":
        n = len(msg.prompt_token_ids.ids)
        if n >= route.max_context:
            raise FieldError(f"prompt_token_ids: {n} tokens; the context of {route.name!r} is {route.max_context}")
        return
    chars = len(msg.prompt) if which == "prompt" else sum(len(m.content) for m in msg.messages.messages)
    limit = route.max_context * MAX_CHARS_PER_TOKEN
    if chars > limit:
        raise FieldError(
            f"{which}: {chars} characters cannot fit the context of {route.name!r} "
            f"({route.max_context} tokens; at most {limit} characters)"
        )


def encode_input(msg: pb.GenerateRequest, route: TargetRoute) -> list[int]:
    tok = route.tokenizer
    which = input_field(msg)
    if which == "prompt_token_ids":  # sent to the model as they are: no template, no specials
        ids = list(msg.prompt_token_ids.ids)
        if not ids:
            raise FieldError("prompt_token_ids must hold at least one token id")
        for i, t in enumerate(ids):
            if t >= route.vocab_size:
                raise FieldError(f"prompt_token_ids[{i}] = {t} is outside the vocabulary of {route.name!r} ({route.vocab_size})")
        return [int(t) for t in ids]
    if which == "prompt":
        if not msg.prompt.strip():
            raise FieldError("prompt must not be empty")
        if msg.raw_prompt or not getattr(tok, "chat_template", None):
            ids = tok(msg.prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = _chat(tok, [{"role": "user", "content": msg.prompt}])
    else:
        msgs = list(msg.messages.messages)
        if not msgs:
            raise FieldError("messages must hold at least one message")
        if len(msgs) > MAX_MESSAGES:
            raise FieldError(f"messages holds at most {MAX_MESSAGES} messages, got {len(msgs)}")
        chat = []
        for i, m in enumerate(msgs):
            if m.role not in ROLES:
                raise FieldError(f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}, got {m.role!r}")
            chat.append({"role": m.role, "content": m.content})
        if not any(m["content"].strip() for m in chat):
            raise FieldError("messages: every message is empty")
        if not getattr(tok, "chat_template", None):
            raise FieldError(f"messages: target {route.name!r} has no chat template; send a prompt instead")
        ids = _chat(tok, chat)
    if not ids:
        raise FieldError("prompt encodes to no tokens")
    return [int(t) for t in ids]


def _chat(tok, messages: list[dict]) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def gen_ai_operation(msg: pb.GenerateRequest, route: TargetRoute) -> str:
    """The request's gen_ai.operation.name: "chat" when the target's chat template is
    applied (messages, or a prompt that is not raw), else "text_completion"."""
    which = msg.WhichOneof("input")
    templated = which == "messages" or (which == "prompt" and not msg.raw_prompt and getattr(route.tokenizer, "chat_template", None))
    return "chat" if templated else "text_completion"


def to_proto(delta: Delta, request_id: str) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=request_id, token_ids=delta.token_ids, text=delta.text)
    if delta.finish_reason:
        msg.finish_reason = FINISH_BY_NAME[delta.finish_reason]
    if delta.usage:
        msg.usage.prompt_tokens = delta.usage["prompt_tokens"]
        msg.usage.completion_tokens = delta.usage["completion_tokens"]
    if delta.stats:
        st = delta.stats
        msg.stats.method = ENUM_BY_METHOD.get(st["method"], pb.SPECULATION_METHOD_OFF)
        msg.stats.draft_len = st["draft_len"]
        msg.stats.rounds = st["rounds"]
        msg.stats.drafted = st["drafted"]
        msg.stats.accepted = st["accepted"]
        msg.stats.mean_accepted_len = st["mean_accepted_len"]
        msg.stats.acceptance_by_position.extend(st["acceptance_by_position"])
        for k, v in st["exits_used"].items():
            msg.stats.exits_used[int(k)] = int(v)
    if delta.error:
        msg.error = delta.error
    for lp in delta.logprobs or ():
        entry = msg.logprobs.add(logprob=lp.logprob)
        for token_id, value in lp.top:
            entry.top.add(token_id=token_id, logprob=value)
    if delta.seed is not None:
        msg.seed = delta.seed
    return msg


class TandemServicer(pb_grpc.TandemServicer):
    def __init__(
        self,
        router: Router,
        *,
        max_new_tokens_limit: int,
        default_max_new_tokens: int,
        draft_info: dict | None = None,
        max_request_bytes: int = 4 * 1024 * 1024,
    ):
        self.router = router
        self.limit = max_new_tokens_limit
        self.default_max_new = min(default_max_new_tokens, max_new_tokens_limit)
        self.draft_info = draft_info or {}
        self.max_request_bytes = max_request_bytes  # the server's grpc.max_receive_message_length
        # Tokenizing and chat templates run here, off the event loop: a large prompt must
        # not stall health checks and live streams (the tokenizer lets other threads run).
        self._parse_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="parse")

    def shutdown(self) -> None:
        self._parse_pool.shutdown(wait=False, cancel_futures=True)

    def parse(self, msg: pb.GenerateRequest, remaining_s: float | None) -> RouteRequest:
        """Validate and tokenize; raises FieldError or UnknownTargetError."""
        if len(msg.request_id) > MAX_REQUEST_ID or not msg.request_id.isprintable():
            raise FieldError(f"request_id must be at most {MAX_REQUEST_ID} printable characters")
        if not msg.target:
            raise FieldError(f"target is required; targets: {', '.join(sorted(self.router.routes))}")
        route = self.router.route(msg.target)
        sampling, max_new = parse_sampling(msg, limit=self.limit, default_max_new=self.default_max_new)
        stop, stop_ids = parse_stops(msg, route.vocab_size)
        method = METHOD_BY_ENUM.get(msg.speculation.method)
        if method is None:
            raise FieldError(f"speculation.method: unknown value {msg.speculation.method}")
        max_draft = None
        if msg.speculation.HasField("max_draft_len"):
            max_draft = msg.speculation.max_draft_len
            if not 1 <= max_draft <= MAX_DRAFT_LEN:
                raise FieldError(f"speculation.max_draft_len must be in [1, {MAX_DRAFT_LEN}], got {max_draft}")
        check_input_size(msg, route)
        prompt_ids = encode_input(msg, route)
        if len(prompt_ids) >= route.max_context:
            raise FieldError(
                f"{input_field(msg)}: encodes to {len(prompt_ids)} tokens; the context of {route.name!r} is {route.max_context}"
            )
        # the planner's context rule, with the longest draft block the request may get
        try:
            check_context(len(prompt_ids), max_new, route.max_context, target=route.name,
                          draft_len=0 if method == "off" else (max_draft or route.max_draft_len))
        except ValueError as exc:
            raise FieldError(str(exc)) from None
        return RouteRequest(
            request_id=msg.request_id or self.router.new_request_id(),
            target=route.name,
            prompt_ids=tuple(prompt_ids),
            sampling=sampling,
            max_new_tokens=max_new,
            stop=stop,
            stop_ids=stop_ids,
            ignore_eos=msg.sampling.ignore_eos,
            method=method,
            max_draft_len=max_draft,
            deadline=time.monotonic() + remaining_s if remaining_s is not None else None,
            operation=gen_ai_operation(msg, route),
        )

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        await abort_if_undecodable(request, context)
        try:
            loop = asyncio.get_running_loop()
            req = await loop.run_in_executor(self._parse_pool, self.parse, request, context.time_remaining())
            # the client's W3C trace context, when it sent one: the request span continues it
            req = replace(req, trace_parent=context_from_metadata(context.invocation_metadata()))
        except UnknownTargetError as exc:
            await errors.abort(
                context, grpc.StatusCode.NOT_FOUND, str(exc), reason=errors.UNKNOWN_TARGET, metadata={"target": request.target}
            )
        except (FieldError, ValueError) as exc:
            await abort_invalid(context, exc)
        failure: dict | None = None  # errors.abort's arguments
        target = {"target": req.target}
        try:
            async for delta in self.router.generate(req, cancelled=context.cancelled):
                yield to_proto(delta, req.request_id)
        except QueueFullError as exc:
            failure = dict(
                code=grpc.StatusCode.RESOURCE_EXHAUSTED, message=str(exc), reason=errors.QUEUE_FULL,
                metadata=target, retry_delay_s=exc.retry_after_s,
            )
        except SideUnavailableError as exc:
            failure = dict(
                code=grpc.StatusCode.UNAVAILABLE, message=str(exc),
                reason=errors.DRAFT_UNAVAILABLE if exc.role == "draft" else errors.TARGET_UNAVAILABLE,
                metadata=target, retry_delay_s=errors.UNAVAILABLE_RETRY_S,
            )
        except (FieldError, ValueError) as exc:
            await abort_invalid(context, exc)
        except Exception:  # noqa: BLE001 - never a stack trace to the client
            log.exception("request %s failed", req.request_id)
            failure = dict(
                code=grpc.StatusCode.INTERNAL, message=f"internal error in request {req.request_id}; see the server log",
                reason=errors.INTERNAL, metadata={**target, "request_id": req.request_id},
            )
        if failure is not None:
            await errors.abort(context, **failure)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        await abort_if_undecodable(request, context)
        out = pb.ListModelsResponse()
        live = self.router.serving_replicas()
        ready = self.router.target_health()
        for r in self.router.routes.values():
            out.targets.append(
                pb.ModelInfo(
                    name=r.name,
                    model=r.model,
                    replicas=live.get(r.name, r.replicas),
                    shards=r.shards,
                    dtype=r.dtype,
                    default_method=ENUM_BY_METHOD.get(r.default_method, pb.SPECULATION_METHOD_AUTO),
                    max_context=r.max_context,
                    vocab_size=r.vocab_size,
                    ready=ready.get(r.name, True),
                )
            )
        d = self.draft_info
        if d:
            out.draft.CopyFrom(
                pb.ModelInfo(
                    name="draft",
                    model=str(d.get("model", "")),
                    replicas=live.get(DRAFT_POOL, int(d.get("replicas", 1))),
                    dtype=str(d.get("dtype", "")),
                    exits=[int(e) for e in d.get("exits", [])],
                )
            )
        return out

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        await abort_if_undecodable(request, context)
        return pb.GetServerInfoResponse(
            version=tandem_version(),
            api_version=API_VERSION,
            max_new_tokens=self.limit,
            default_max_new_tokens=self.default_max_new,
            max_draft_len=MAX_DRAFT_LEN,
            max_top_logprobs=MAX_TOP_LOGPROBS,
            max_stop_strings=MAX_STOP_STRINGS,
            max_request_bytes=self.max_request_bytes,
            methods=[ENUM_BY_METHOD[m] for m in METHODS],
        )


def tandem_version() -> str:
    """The installed tandem distribution's version ("unknown" when run from a bare tree)."""
    try:
        return importlib.metadata.version("tandem")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
