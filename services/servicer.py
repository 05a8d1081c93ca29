"""gRPC servicer: proto messages <-> router dataclasses, field validation, status codes.

Every failure a client can cause or see maps to a status code with a message that names
the field; nothing else leaves the server (unexpected errors are logged with the request id
and answered INTERNAL without a stack trace).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from tandem.actors.pools import DRAFT_POOL
from tandem.actors.speculative import SideUnavailableError
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc
from tandem.services.router import Delta, QueueFullError, RouteRequest, Router, TargetRoute, UnknownTargetError
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
# A token of these tokenizers spans far fewer characters than this, so text longer than
# max_context * MAX_CHARS_PER_TOKEN cannot fit the context: it is refused before the
# tokenizer spends seconds on it.
MAX_CHARS_PER_TOKEN = 32


class FieldError(ValueError):
    """A request field that fails validation; the message starts with the field path."""


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
    }
    name = pb.DESCRIPTOR.services_by_name["Tandem"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


async def abort_if_undecodable(request, context) -> None:
    if isinstance(request, UndecodableRequest):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {request.message} message ({request.error})"
        )


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
    try:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except ValueError as exc:
        raise FieldError(f"sampling.{exc}") from None
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
    """The field holding the request's input ("prompt" or "messages")."""
    which = msg.WhichOneof("input")
    if which is None:
        raise FieldError("prompt: give either prompt or messages")
    return which


def check_input_size(msg: pb.GenerateRequest, route: TargetRoute) -> None:
    """Refuse input that cannot fit the target's context, before tokenizing it."""
    which = input_field(msg)
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
    return msg


class TandemServicer(pb_grpc.TandemServicer):
    def __init__(self, router: Router, *, max_new_tokens_limit: int, default_max_new_tokens: int, draft_info: dict | None = None):
        self.router = router
        self.limit = max_new_tokens_limit
        self.default_max_new = min(default_max_new_tokens, max_new_tokens_limit)
        self.draft_info = draft_info or {}
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
            if not 1 <= max_draft <= 64:
                raise FieldError(f"speculation.max_draft_len must be in [1, 64], got {max_draft}")
        check_input_size(msg, route)
        prompt_ids = encode_input(msg, route)
        if len(prompt_ids) >= route.max_context:
            raise FieldError(
                f"{input_field(msg)}: encodes to {len(prompt_ids)} tokens; the context of {route.name!r} is {route.max_context}"
            )
        if len(prompt_ids) + max_new + 65 > route.max_context:
            raise FieldError(
                f"sampling.max_new_tokens: prompt ({len(prompt_ids)}) + max_new_tokens ({max_new}) exceed the "
                f"context of {route.name!r} ({route.max_context})"
            )
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
        )

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        await abort_if_undecodable(request, context)
        try:
            loop = asyncio.get_running_loop()
            req = await loop.run_in_executor(self._parse_pool, self.parse, request, context.time_remaining())
        except UnknownTargetError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except (FieldError, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        code, details = None, None
        try:
            async for delta in self.router.generate(req, cancelled=context.cancelled):
                yield to_proto(delta, req.request_id)
        except QueueFullError as exc:
            code, details = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        except SideUnavailableError as exc:
            code, details = grpc.StatusCode.UNAVAILABLE, str(exc)
        except (FieldError, ValueError) as exc:
            code, details = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except Exception:  # noqa: BLE001 - never a stack trace to the client
            log.exception("request %s failed", req.request_id)
            code, details = grpc.StatusCode.INTERNAL, f"internal error in request {req.request_id}; see the server log"
        if code is not None:
            await context.abort(code, details)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        await abort_if_undecodable(request, context)
        out = pb.ListModelsResponse()
        live = self.router.serving_replicas()
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
