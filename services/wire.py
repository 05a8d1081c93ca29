"""tandem.v1 messages <-> plain Python values, shared by the client and the server: method and
finish-reason names, the request builder with its client-side validation (errors name the
field), sampling, stats, chunks and results, model and server info.

Only grpc's generated stubs, protobuf and the planner's pure names (speculation/plan.py,
no torch) are imported, so the client alone (`pip install tandem`) carries it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tandem.speculation.plan import MAX_DRAFT_LEN
from tandem.v1 import tandem_pb2

_METHOD_PREFIX = "SPECULATION_METHOD_"
_FINISH_PREFIX = "FINISH_REASON_"
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1
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


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token (`token_id`) and its log-probability under the target model's raw
    logits, with the `top` most likely tokens as (token id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerateChunk:
    """One streamed message: the tokens one commit added (and, on the last one, the outcome).

    finish_reason is one of FINISH_REASONS on the last chunk and None before it; usage is
    {"prompt_tokens", "completion_tokens"} and stats is stats_to_dict(...) on the last chunk;
    error is the failure text when finish_reason == "error". logprobs: a TokenLogprob per
    token_ids entry when the request asked for logprobs (else empty); seed: on the last
    chunk of a sampled request, the seed it used (resend it to reproduce the output).
    """

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    stats: dict[str, Any] | None = None
    error: str | None = None
    request_id: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerateResult:
    """A whole request: every chunk's text, tokens and logprobs joined, and the last
    chunk's outcome (and seed)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: dict[str, int] | None
    stats: dict[str, Any] | None
    request_id: str = ""
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    seed: int | None = None


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
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    logprobs: int | None = None,
) -> tandem_pb2.SamplingParams:
    """SamplingParams with only the given fields set (None stays unset: server default).

    Bounds are the ones the .proto documents: temperature >= 0, top_p in (0, 1], top_k >= 0,
    seed a uint64, max_new_tokens >= 1, token ids uint32, min_p in [0, 1],
    repetition_penalty > 0, frequency_penalty and presence_penalty in [-2, 2], logprobs >= 0
    (the server's limit is get_server_info()["max_top_logprobs"]). A single string `stop` is
    one stop string.
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
    if min_p is not None:
        if not 0 <= _check_float("min_p", min_p) <= 1:
            raise ValueError(f"min_p must be in [0, 1]; got {min_p}")
        params.min_p = min_p
    if repetition_penalty is not None:
        if not _check_float("repetition_penalty", repetition_penalty) > 0:
            raise ValueError(f"repetition_penalty must be > 0; got {repetition_penalty}")
        params.repetition_penalty = repetition_penalty
    for name, value in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if value is not None:
            if not -2 <= _check_float(name, value) <= 2:
                raise ValueError(f"{name} must be in [-2, 2]; got {value}")
            setattr(params, name, value)
    if logprobs is not None:
        params.logprobs = _check_int("logprobs", logprobs, low=0, high=_UINT32_MAX)
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
    prompt_token_ids: Sequence[int] | None = None,
    method: str | None = None,
    max_draft_len: int | None = None,
    request_id: str = "",
    raw_prompt: bool = False,
    **sampling: Any,
) -> tandem_pb2.GenerateRequest:
    """The GenerateRequest for these arguments; ValueError naming the field when one is bad.

    This is the one signature of a Generate request: TandemClient and AsyncTandemClient's
    generate and generate_stream take the same keyword arguments (plus `timeout`).

    Input, exactly one of: prompt (text; the target's chat template is applied unless
    raw_prompt), messages ([{"role", "content"}, ...], chat), prompt_token_ids (token ids of
    the target's tokenizer, sent to the model as they are).
    Sampling, the keywords of sampling_to_proto (None: the server's default; an unknown
    keyword is a TypeError naming it): temperature, top_p, top_k, min_p, seed,
    max_new_tokens, stop, stop_token_ids, ignore_eos; repetition_penalty,
    frequency_penalty, presence_penalty (they change the target distribution itself, so
    every method follows the penalized target); logprobs (N: each token's log-probability
    under the target's raw logits plus its N most likely alternatives, in result.logprobs).
    Speculation: method (one of METHODS), max_draft_len. request_id: an optional label.
    """
    if not isinstance(target, str) or not target:
        raise ValueError(f"target must be a non-empty model name (see list_models()); got {target!r}")
    if sum(x is not None for x in (prompt, messages, prompt_token_ids)) != 1:
        raise ValueError("exactly one of prompt, messages and prompt_token_ids must be given")
    if not isinstance(request_id, str):
        raise ValueError(f"request_id must be a string; got {request_id!r}")
    request = tandem_pb2.GenerateRequest(
        request_id=request_id,
        target=target,
        raw_prompt=bool(raw_prompt),
        sampling=sampling_to_proto(**sampling),
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
    elif prompt_token_ids is not None:
        if raw_prompt:
            raise ValueError("raw_prompt applies to prompt only: prompt_token_ids are always sent as they are")
        if isinstance(prompt_token_ids, (str, bytes)) or not isinstance(prompt_token_ids, Iterable):
            raise ValueError(f"prompt_token_ids must be a sequence of token ids; got {type(prompt_token_ids).__name__}")
        ids = [_check_int(f"prompt_token_ids[{i}]", t, low=0, high=_UINT32_MAX) for i, t in enumerate(prompt_token_ids)]
        if not ids:
            raise ValueError("prompt_token_ids must hold at least one token id")
        request.prompt_token_ids.ids.extend(ids)
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
        logprobs=[
            TokenLogprob(token_id=int(t), logprob=lp.logprob, top=[(int(x.token_id), x.logprob) for x in lp.top])
            for t, lp in zip(message.token_ids, message.logprobs)
        ],
        seed=message.seed if message.HasField("seed") else None,
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
    result.logprobs.extend(chunk.logprobs)
    if chunk.seed is not None:
        result.seed = chunk.seed
    result.request_id = result.request_id or chunk.request_id
    if chunk.finish_reason is not None:
        result.finish_reason = chunk.finish_reason
    if chunk.usage is not None:
        result.usage = chunk.usage
    if chunk.stats is not None:
        result.stats = chunk.stats
    if chunk.error is not None:
        result.error = chunk.error


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
        "vocab_size": info.vocab_size,
        "ready": info.ready,
    }


def server_info_to_dict(info: tandem_pb2.GetServerInfoResponse) -> dict[str, Any]:
    """GetServerInfoResponse as plain values; methods as names ("auto", "sd", ...)."""
    return {
        "version": info.version,
        "api_version": info.api_version,
        "max_new_tokens": info.max_new_tokens,
        "default_max_new_tokens": info.default_max_new_tokens,
        "max_draft_len": info.max_draft_len,
        "max_top_logprobs": info.max_top_logprobs,
        "max_stop_strings": info.max_stop_strings,
        "max_request_bytes": info.max_request_bytes,
        "methods": [enum_to_method(m) for m in info.methods],
    }


def _list_models_to_dict(response: tandem_pb2.ListModelsResponse) -> dict[str, Any]:
    return {
        "targets": [model_info_to_dict(m) for m in response.targets],
        "draft": model_info_to_dict(response.draft) if response.HasField("draft") else None,
    }
