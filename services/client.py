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
- Failed RPCs raise TandemError(code, details); `generate` attaches the tokens received before
  the failure as `error.partial`.
- The bearer token travels as per-call metadata ("authorization", "Bearer <token>"), so it also
  works over plaintext channels (gRPC call credentials would require TLS).

The pure helpers (build_generate_request, sampling_to_proto, chunk_from_proto, collect_chunks,
stats_to_dict, stats_from_dict, method_to_enum, enum_to_method, finish_reason_name,
finish_reason_to_enum, model_info_to_dict, error_from_rpc) have no I/O and are shared with the
server side.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.v1 import tandem_pb2, tandem_pb2_grpc

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

_METHOD_PREFIX = "SPECULATION_METHOD_"
_FINISH_PREFIX = "FINISH_REASON_"
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1
MAX_DRAFT_LEN = 64  # SpeculationOptions.max_draft_len is documented as 1..64
CHAT_ROLES = ("system", "user", "assistant")

# Derived from the enum descriptors, so a value added to the .proto shows up here by itself.
# UNSPECIFIED (0) is not a method: a request that leaves the method unset gets the server's
# default (auto).
_METHOD_BY_NAME: dict[str, int] = {
    name[len(_METHOD_PREFIX) :].lower(): number
    for name, number in tandem_pb2.SpeculationMethod.items()
    if number != tandem_pb2.SPECULATION_METHOD_UNSPECIFIED
}
_METHOD_BY_NUMBER: dict[int, str] = {number: name for name, number in _METHOD_BY_NAME.items()}
_FINISH_BY_NUMBER: dict[int, str] = {
    number: name[len(_FINISH_PREFIX) :].lower()
    for name, number in tandem_pb2.FinishReason.items()
    if number != tandem_pb2.FINISH_REASON_UNSPECIFIED
}
_FINISH_BY_NAME: dict[str, int] = {name: number for number, name in _FINISH_BY_NUMBER.items()}

METHODS: tuple[str, ...] = tuple(_METHOD_BY_NAME)  # ("auto", "off", "sd", "sorted", "pearl", "spectr")
FINISH_REASONS: tuple[str, ...] = tuple(_FINISH_BY_NAME)  # ("stop", "length", "eos", "cancelled", ...)


# ----------------------------------------------------------------------------------------
# Plain data
# ----------------------------------------------------------------------------------------


@dataclass
class GenerateChunk:
    """One streamed message: the tokens one commit added (and, on the last one, the outcome).

    finish_reason is one of FINISH_REASONS on the last chunk and None before it; usage is
    {"prompt_tokens", "completion_tokens"} and stats is stats_to_dict(...) on the last chunk;
    error is the failure text when finish_reason == "error".
    """

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    stats: dict[str, Any] | None = None
    error: str | None = None
    request_id: str = ""


@dataclass
class GenerateResult:
    """A whole request: every chunk's text and tokens joined, and the last chunk's outcome."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: dict[str, int] | None
    stats: dict[str, Any] | None
    request_id: str = ""
    error: str | None = None


class TandemError(Exception):
    """A failed RPC: its gRPC status code and details, e.g. "NOT_FOUND: target 'x' is not served".

    `partial` holds what generate() had received before the failure (None elsewhere).
    """

    def __init__(self, code: grpc.StatusCode, details: str, *, partial: GenerateResult | None = None) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details
        self.partial = partial

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"

    def __reduce__(self):  # picklable (e.g. across Ray or multiprocessing), partial included
        return (_rebuild_error, (self.code.name, self.details, self.partial))


def _rebuild_error(code_name: str, details: str, partial: GenerateResult | None) -> TandemError:
    return TandemError(grpc.StatusCode[code_name], details, partial=partial)


def error_from_rpc(error: grpc.RpcError) -> TandemError:
    """The TandemError for a grpc.RpcError (sync or aio); UNKNOWN when it carries no status."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = error.details() if callable(getattr(error, "details", None)) else None
    return TandemError(code or grpc.StatusCode.UNKNOWN, details or str(error) or "RPC failed")


# ----------------------------------------------------------------------------------------
# Pure conversions
# ----------------------------------------------------------------------------------------


def method_to_enum(method: str) -> int:
    """"pearl" -> SPECULATION_METHOD_PEARL; the names are METHODS (case-insensitive)."""
    if not isinstance(method, str) or method.lower() not in _METHOD_BY_NAME:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return _METHOD_BY_NAME[method.lower()]


def enum_to_method(value: int) -> str:
    """SPECULATION_METHOD_PEARL -> "pearl"; a number this client does not know -> "unknown_<n>"."""
    return _METHOD_BY_NUMBER.get(int(value), f"unknown_{int(value)}")


def finish_reason_name(value: int) -> str | None:
    """FINISH_REASON_EOS -> "eos"; UNSPECIFIED (not the last message) -> None;
    a number this client does not know -> "unknown_<n>"."""
    if value == tandem_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    return _FINISH_BY_NUMBER.get(int(value), f"unknown_{int(value)}")


def finish_reason_to_enum(name: str | None) -> int:
    """"eos" -> FINISH_REASON_EOS; None -> UNSPECIFIED (for the server side)."""
    if name is None:
        return tandem_pb2.FINISH_REASON_UNSPECIFIED
    if name not in _FINISH_BY_NAME:
        raise ValueError(f"finish_reason must be one of {', '.join(FINISH_REASONS)} or None; got {name!r}")
    return _FINISH_BY_NAME[name]


def _check_int(name: str, value: Any, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}]; got {value}")
    return value


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    return float(value)


def sampling_to_proto(
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    max_new_tokens: int | None = None,
    stop: str | Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
) -> tandem_pb2.SamplingParams:
    """SamplingParams with only the given fields set (None stays unset: server default).

    Bounds are the ones the .proto documents: temperature >= 0, top_p in (0, 1], top_k >= 0,
    seed a uint64, max_new_tokens >= 1, token ids uint32. A single string `stop` is one stop
    string.
    """
    params = tandem_pb2.SamplingParams(ignore_eos=bool(ignore_eos))
    if temperature is not None:
        if _check_float("temperature", temperature) < 0:
            raise ValueError(f"temperature must be >= 0; got {temperature}")
        params.temperature = temperature
    if top_p is not None:
        if not 0 < _check_float("top_p", top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
        params.top_p = top_p
    if top_k is not None:
        params.top_k = _check_int("top_k", top_k, low=0, high=2**31 - 1)
    if seed is not None:
        params.seed = _check_int("seed", seed, low=0, high=_UINT64_MAX)
    if max_new_tokens is not None:
        params.max_new_tokens = _check_int("max_new_tokens", max_new_tokens, low=1, high=_UINT32_MAX)
    stops = [stop] if isinstance(stop, str) else list(stop)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop must hold non-empty strings; got {s!r}")
    params.stop.extend(stops)
    params.stop_token_ids.extend(_check_int("stop_token_ids", t, low=0, high=_UINT32_MAX) for t in stop_token_ids)
    return params


def _messages_to_proto(messages: Iterable[Mapping[str, str]]) -> tandem_pb2.ChatMessages:
    chat = tandem_pb2.ChatMessages()
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or set(message) - {"role", "content"} or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{i}] must be a dict with exactly the keys 'role' and 'content'; got {message!r}")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string; got {type(content).__name__}")
        chat.messages.add(role=role, content=content)
    if not chat.messages:
        raise ValueError("messages must not be empty")
    return chat


def build_generate_request(
    *,
    target: str,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, str]] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    max_new_tokens: int | None = None,
    stop: str | Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    method: str | None = None,
    max_draft_len: int | None = None,
    request_id: str = "",
    raw_prompt: bool = False,
) -> tandem_pb2.GenerateRequest:
    """The GenerateRequest for these arguments; ValueError naming the field when one is bad."""
    if not isinstance(target, str) or not target:
        raise ValueError(f"target must be a non-empty model name (see list_models()); got {target!r}")
    if (prompt is None) == (messages is None):
        raise ValueError("exactly one of prompt and messages must be given")
    if not isinstance(request_id, str):
        raise ValueError(f"request_id must be a string; got {request_id!r}")
    request = tandem_pb2.GenerateRequest(
        request_id=request_id,
        target=target,
        raw_prompt=bool(raw_prompt),
        sampling=sampling_to_proto(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            max_new_tokens=max_new_tokens,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
        ),
        speculation=tandem_pb2.SpeculationOptions(
            method=tandem_pb2.SPECULATION_METHOD_UNSPECIFIED if method is None else method_to_enum(method)
        ),
    )
    if max_draft_len is not None:
        request.speculation.max_draft_len = _check_int("max_draft_len", max_draft_len, low=1, high=MAX_DRAFT_LEN)
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string; got {type(prompt).__name__}")
        request.prompt = prompt
    else:
        if raw_prompt:
            raise ValueError("raw_prompt applies to prompt only, not to messages")
        request.messages.CopyFrom(_messages_to_proto(messages))
    return request


def stats_to_dict(stats: tandem_pb2.SpeculationStats) -> dict[str, Any]:
    """SpeculationStats as plain values: method ("pearl", "off", ...), draft_len, rounds,
    drafted, accepted, mean_accepted_len, acceptance_by_position (list), exits_used ({exit: n})."""
    return {
        "method": enum_to_method(stats.method),
        "draft_len": stats.draft_len,
        "rounds": stats.rounds,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "mean_accepted_len": stats.mean_accepted_len,
        "acceptance_by_position": list(stats.acceptance_by_position),
        "exits_used": {int(k): int(v) for k, v in sorted(stats.exits_used.items())},
    }


def stats_from_dict(stats: Mapping[str, Any]) -> tandem_pb2.SpeculationStats:
    """The inverse of stats_to_dict (for the server side); missing keys stay zero/empty."""
    message = tandem_pb2.SpeculationStats(
        method=method_to_enum(stats.get("method", "auto")),
        draft_len=int(stats.get("draft_len", 0)),
        rounds=int(stats.get("rounds", 0)),
        drafted=int(stats.get("drafted", 0)),
        accepted=int(stats.get("accepted", 0)),
        mean_accepted_len=float(stats.get("mean_accepted_len", 0.0)),
        acceptance_by_position=[float(a) for a in stats.get("acceptance_by_position", ())],
    )
    for depth, count in dict(stats.get("exits_used", {})).items():
        message.exits_used[int(depth)] = int(count)
    return message


def chunk_from_proto(message: tandem_pb2.GenerateResponse) -> GenerateChunk:
    """A GenerateResponse as a GenerateChunk (usage/stats None when the message lacks them)."""
    return GenerateChunk(
        token_ids=list(message.token_ids),
        text=message.text,
        finish_reason=finish_reason_name(message.finish_reason),
        usage=(
            {"prompt_tokens": message.usage.prompt_tokens, "completion_tokens": message.usage.completion_tokens}
            if message.HasField("usage")
            else None
        ),
        stats=stats_to_dict(message.stats) if message.HasField("stats") else None,
        error=message.error or None,
        request_id=message.request_id,
    )


def collect_chunks(chunks: Iterable[GenerateChunk]) -> GenerateResult:
    """Fold chunks into one result: text and tokens joined, outcome from the last chunk."""
    result = GenerateResult(text="", token_ids=[], finish_reason=None, usage=None, stats=None)
    texts: list[str] = []
    for chunk in chunks:
        _fold(result, texts, chunk)
    result.text = "".join(texts)
    return result


def _fold(result: GenerateResult, texts: list[str], chunk: GenerateChunk) -> None:
    texts.append(chunk.text)
    result.token_ids.extend(chunk.token_ids)
    result.request_id = result.request_id or chunk.request_id
    if chunk.finish_reason is not None:
        result.finish_reason = chunk.finish_reason
    if chunk.usage is not None:
        result.usage = chunk.usage
    if chunk.stats is not None:
        result.stats = chunk.stats
    if chunk.error is not None:
        result.error = chunk.error


def _error_in_result(result: GenerateResult) -> TandemError | None:
    """A stream that ended OK but whose last message says FINISH_REASON_ERROR still failed."""
    if result.finish_reason == "error":
        return TandemError(grpc.StatusCode.INTERNAL, result.error or "generation failed", partial=result)
    return None


def model_info_to_dict(info: tandem_pb2.ModelInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "model": info.model,
        "replicas": info.replicas,
        "shards": info.shards,
        "dtype": info.dtype,
        "default_method": enum_to_method(info.default_method),
        "max_context": info.max_context,
        "exits": list(info.exits),
    }


def _list_models_to_dict(response: tandem_pb2.ListModelsResponse) -> dict[str, Any]:
    return {
        "targets": [model_info_to_dict(m) for m in response.targets],
        "draft": model_info_to_dict(response.draft) if response.HasField("draft") else None,
    }


def _health_status_name(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


# ----------------------------------------------------------------------------------------
# Channels
# ----------------------------------------------------------------------------------------


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    _check_int("max_message_bytes", max_message_bytes, low=1, high=2**31 - 1)
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


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
        self.options = _channel_options(max_message_bytes)
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()

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
    max_message_bytes bounds messages both ways. Use as a context manager or call close().
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
    ) -> None:
        self._config = _ClientConfig(
            address,
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
        )
        cfg = self._config
        if cfg.tls:
            self._channel = grpc.secure_channel(address, cfg.credentials(), options=cfg.options)
        else:
            self._channel = grpc.insecure_channel(address, options=cfg.options)
        self._stub = tandem_pb2_grpc.TandemStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate_stream(
        self,
        *,
        target: str,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        stop: str | Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        method: str | None = None,
        max_draft_len: int | None = None,
        request_id: str = "",
        raw_prompt: bool = False,
        timeout: float | None = None,
    ) -> GenerateStream:
        """Start Generate; returns the stream of chunks (see build_generate_request for the fields)."""
        request = build_generate_request(
            target=target,
            prompt=prompt,
            messages=messages,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            max_new_tokens=max_new_tokens,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            method=method,
            max_draft_len=max_draft_len,
            request_id=request_id,
            raw_prompt=raw_prompt,
        )
        call = self._stub.Generate(request, timeout=self._config.call_timeout(timeout), metadata=self._config.metadata)
        return GenerateStream(call)

    def generate(
        self,
        *,
        target: str,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        stop: str | Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        method: str | None = None,
        max_draft_len: int | None = None,
        request_id: str = "",
        raw_prompt: bool = False,
        timeout: float | None = None,
    ) -> GenerateResult:
        """The whole stream collected into one GenerateResult; raises TandemError
        (with .partial) when the call fails or the last message reports an error."""
        result = GenerateResult(text="", token_ids=[], finish_reason=None, usage=None, stats=None)
        texts: list[str] = []
        with self.generate_stream(
            target=target,
            prompt=prompt,
            messages=messages,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            max_new_tokens=max_new_tokens,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            method=method,
            max_draft_len=max_draft_len,
            request_id=request_id,
            raw_prompt=raw_prompt,
            timeout=timeout,
        ) as stream:
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
                tandem_pb2.ListModelsRequest(), timeout=self._config.call_timeout(timeout), metadata=self._config.metadata
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        return _list_models_to_dict(response)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 Check: "SERVING", "NOT_SERVING", ... ("" = the whole server)."""
        try:
            response = self._health.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self._config.call_timeout(timeout),
                metadata=self._config.metadata,
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
    """The TandemClient API on grpc.aio; create it inside the event loop that uses it.
    Use `async with` or `await close()`."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self._config = _ClientConfig(
            address,
            token=token,
            tls=tls,
            root_certificates=root_certificates,
            timeout=timeout,
            max_message_bytes=max_message_bytes,
        )
        cfg = self._config
        if cfg.tls:
            self._channel = grpc.aio.secure_channel(address, cfg.credentials(), options=cfg.options)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=cfg.options)
        self._stub = tandem_pb2_grpc.TandemStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate_stream(
        self,
        *,
        target: str,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        stop: str | Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        method: str | None = None,
        max_draft_len: int | None = None,
        request_id: str = "",
        raw_prompt: bool = False,
        timeout: float | None = None,
    ) -> AsyncGenerateStream:
        """Start Generate; returns an async iterator of chunks (not a coroutine: no await)."""
        request = build_generate_request(
            target=target,
            prompt=prompt,
            messages=messages,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            max_new_tokens=max_new_tokens,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            method=method,
            max_draft_len=max_draft_len,
            request_id=request_id,
            raw_prompt=raw_prompt,
        )
        call = self._stub.Generate(request, timeout=self._config.call_timeout(timeout), metadata=self._config.metadata)
        return AsyncGenerateStream(call)

    async def generate(
        self,
        *,
        target: str,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        max_new_tokens: int | None = None,
        stop: str | Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        method: str | None = None,
        max_draft_len: int | None = None,
        request_id: str = "",
        raw_prompt: bool = False,
        timeout: float | None = None,
    ) -> GenerateResult:
        """The whole stream collected; TandemError (with .partial) on failure."""
        result = GenerateResult(text="", token_ids=[], finish_reason=None, usage=None, stats=None)
        texts: list[str] = []
        async with self.generate_stream(
            target=target,
            prompt=prompt,
            messages=messages,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            max_new_tokens=max_new_tokens,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            method=method,
            max_draft_len=max_draft_len,
            request_id=request_id,
            raw_prompt=raw_prompt,
            timeout=timeout,
        ) as stream:
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
                tandem_pb2.ListModelsRequest(), timeout=self._config.call_timeout(timeout), metadata=self._config.metadata
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        return _list_models_to_dict(response)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self._config.call_timeout(timeout),
                metadata=self._config.metadata,
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
