"""Unit tests of services/client.py: the pure proto conversions, and both clients against a
FAKE in-process grpc.aio server (a minimal TandemServicer on 127.0.0.1:0, run on its own
event loop in a background thread). The real servicer and router are tested elsewhere; this
file pins only the client layer: request building, streaming deltas, metadata, error codes,
deadlines, cancellation and health.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
from collections import defaultdict

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tandem.services.client import (
    FINISH_REASONS,
    METHODS,
    AsyncTandemClient,
    GenerateChunk,
    TandemClient,
    TandemError,
    build_generate_request,
    chunk_from_proto,
    collect_chunks,
    enum_to_method,
    finish_reason_name,
    finish_reason_to_enum,
    method_to_enum,
    sampling_to_proto,
    stats_from_dict,
    stats_to_dict,
)
from tandem.v1 import tandem_pb2, tandem_pb2_grpc

TOKEN = "t0k-123"
STATS_KEYS = {
    "method",
    "draft_len",
    "rounds",
    "drafted",
    "accepted",
    "mean_accepted_len",
    "acceptance_by_position",
    "exits_used",
}


def final_stats() -> tandem_pb2.SpeculationStats:
    stats = tandem_pb2.SpeculationStats(
        method=tandem_pb2.SPECULATION_METHOD_PEARL,
        draft_len=4,
        rounds=2,
        drafted=8,
        accepted=5,
        mean_accepted_len=2.5,
        acceptance_by_position=[1.0, 0.5, 0.5, 0.25],
    )
    stats.exits_used[2] = 6
    stats.exits_used[4] = 2
    return stats


# ----------------------------------------------------------------------------------------
# Pure conversions
# ----------------------------------------------------------------------------------------


def test_method_names_round_trip_through_the_enum():
    assert METHODS == ("auto", "off", "sd", "sorted", "pearl", "spectr")
    for name in METHODS:
        assert enum_to_method(method_to_enum(name)) == name
    assert method_to_enum("PEARL") == tandem_pb2.SPECULATION_METHOD_PEARL
    assert method_to_enum("off") == tandem_pb2.SPECULATION_METHOD_OFF
    assert enum_to_method(99) == "unknown_99"  # a newer server's method does not crash the client
    with pytest.raises(ValueError, match="method"):
        method_to_enum("medusa")


def test_finish_reason_names():
    assert FINISH_REASONS == ("stop", "length", "eos", "cancelled", "deadline", "error")
    assert finish_reason_name(tandem_pb2.FINISH_REASON_UNSPECIFIED) is None
    assert finish_reason_name(tandem_pb2.FINISH_REASON_EOS) == "eos"
    assert finish_reason_name(tandem_pb2.FINISH_REASON_DEADLINE) == "deadline"
    for name in FINISH_REASONS:
        assert finish_reason_name(finish_reason_to_enum(name)) == name
    assert finish_reason_to_enum(None) == tandem_pb2.FINISH_REASON_UNSPECIFIED
    with pytest.raises(ValueError, match="finish_reason"):
        finish_reason_to_enum("done")


def test_sampling_leaves_unset_fields_unset():
    params = sampling_to_proto()
    for name in ("temperature", "top_p", "top_k", "seed", "max_new_tokens"):
        assert not params.HasField(name), name
    assert list(params.stop) == [] and list(params.stop_token_ids) == [] and not params.ignore_eos

    # zero is a value, not "unset": greedy must reach the server as an explicit 0
    params = sampling_to_proto(temperature=0.0, top_k=0, seed=0)
    assert params.HasField("temperature") and params.temperature == 0.0
    assert params.HasField("top_k") and params.HasField("seed")

    params = sampling_to_proto(
        temperature=0.7, top_p=0.9, top_k=40, seed=2**64 - 1, max_new_tokens=16,
        stop=["\n\n", "END"], stop_token_ids=[2, 7], ignore_eos=True,
    )
    assert params.temperature == pytest.approx(0.7) and params.top_p == pytest.approx(0.9)
    assert (params.top_k, params.seed, params.max_new_tokens) == (40, 2**64 - 1, 16)
    assert list(params.stop) == ["\n\n", "END"] and list(params.stop_token_ids) == [2, 7]
    assert params.ignore_eos
    assert list(sampling_to_proto(stop="###").stop) == ["###"]  # one string is one stop string


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [3, -1]}, "stop_token_ids"),
    ],
)
def test_sampling_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sampling_to_proto(**kwargs)


def test_build_request_prompt_and_defaults():
    request = build_generate_request(target="small", prompt="Hi")
    assert request.target == "small" and request.WhichOneof("input") == "prompt" and request.prompt == "Hi"
    assert request.speculation.method == tandem_pb2.SPECULATION_METHOD_UNSPECIFIED  # the server's default
    assert build_generate_request(target="small", prompt="Hi", method="auto").speculation.method == tandem_pb2.SPECULATION_METHOD_AUTO
    assert not request.speculation.HasField("max_draft_len")
    assert not request.sampling.HasField("max_new_tokens") and not request.raw_prompt and request.request_id == ""

    request = build_generate_request(
        target="big", prompt="raw text", raw_prompt=True, method="sorted", max_draft_len=64, request_id="r-9"
    )
    assert request.raw_prompt and request.request_id == "r-9"
    assert request.speculation.method == tandem_pb2.SPECULATION_METHOD_SORTED
    assert request.speculation.max_draft_len == 64


def test_build_request_messages():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    request = build_generate_request(target="small", messages=messages)
    assert request.WhichOneof("input") == "messages"
    assert [(m.role, m.content) for m in request.messages.messages] == [("system", "Be brief."), ("user", "Hi")]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt, messages and prompt_token_ids"),
        ({}, "prompt, messages and prompt_token_ids"),
        ({"prompt": "a", "target": ""}, "target"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "b"}]}, r"messages\[0\]\.role"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\]"),
        ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\]\.content"),
        ({"messages": [{"role": "user", "content": "b"}], "raw_prompt": True}, "raw_prompt"),
        ({"prompt": "a", "max_draft_len": 0}, "max_draft_len"),
        ({"prompt": "a", "max_draft_len": 65}, "max_draft_len"),
        ({"prompt": "a", "method": "fast"}, "method"),
        ({"prompt": "a", "temperature": -1}, "temperature"),
    ],
)
def test_build_request_validation_names_the_field(kwargs, field):
    kwargs = {"target": "small", **kwargs}
    with pytest.raises(ValueError, match=field):
        build_generate_request(**kwargs)


def test_chunk_from_intermediate_and_final_messages():
    middle = chunk_from_proto(tandem_pb2.GenerateResponse(request_id="r1", token_ids=[5, 6], text="ab"))
    assert middle == GenerateChunk(token_ids=[5, 6], text="ab", request_id="r1")
    assert middle.finish_reason is None and middle.usage is None and middle.stats is None and middle.error is None

    last = chunk_from_proto(
        tandem_pb2.GenerateResponse(
            request_id="r1",
            token_ids=[7],
            text="c",
            finish_reason=tandem_pb2.FINISH_REASON_LENGTH,
            usage=tandem_pb2.Usage(prompt_tokens=3, completion_tokens=3),
            stats=final_stats(),
        )
    )
    assert last.finish_reason == "length"
    assert last.usage == {"prompt_tokens": 3, "completion_tokens": 3}
    assert set(last.stats) == STATS_KEYS
    assert last.stats["method"] == "pearl"
    assert last.stats["exits_used"] == {2: 6, 4: 2}
    assert all(type(k) is int and type(v) is int for k, v in last.stats["exits_used"].items())
    assert last.stats["acceptance_by_position"] == [1.0, 0.5, 0.5, 0.25]
    assert (last.stats["drafted"], last.stats["accepted"], last.stats["mean_accepted_len"]) == (8, 5, 2.5)

    failed = chunk_from_proto(tandem_pb2.GenerateResponse(finish_reason=tandem_pb2.FINISH_REASON_ERROR, error="boom"))
    assert failed.finish_reason == "error" and failed.error == "boom"


def test_stats_method_off_and_empty_stats():
    stats = stats_to_dict(tandem_pb2.SpeculationStats(method=tandem_pb2.SPECULATION_METHOD_OFF))
    assert stats["method"] == "off" and stats["exits_used"] == {} and stats["acceptance_by_position"] == []


uint32 = st.integers(min_value=0, max_value=2**32 - 1)
float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=100, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "method": st.sampled_from(METHODS),
            "draft_len": uint32,
            "rounds": uint32,
            "drafted": uint32,
            "accepted": uint32,
            "mean_accepted_len": float32,
            "acceptance_by_position": st.lists(float32, max_size=8),
            "exits_used": st.dictionaries(uint32, uint32, max_size=4),
        }
    )
)
def test_stats_dict_round_trips_through_the_proto(stats):
    message = stats_from_dict(stats)
    assert stats_to_dict(tandem_pb2.SpeculationStats.FromString(message.SerializeToString())) == stats


def test_collect_chunks_joins_deltas():
    result = collect_chunks(
        [
            GenerateChunk([1], "he", request_id="r"),
            GenerateChunk([2, 3], "llo", request_id="r"),
            GenerateChunk([], "", finish_reason="stop", usage={"prompt_tokens": 1, "completion_tokens": 3}),
        ]
    )
    assert (result.text, result.token_ids, result.finish_reason, result.request_id) == ("hello", [1, 2, 3], "stop", "r")
    assert result.usage == {"prompt_tokens": 1, "completion_tokens": 3} and result.stats is None


def test_tandem_error_reads_and_pickles():
    error = TandemError(grpc.StatusCode.NOT_FOUND, "target 'x' is not served")
    assert str(error) == "NOT_FOUND: target 'x' is not served"
    assert isinstance(error, Exception) and error.code is grpc.StatusCode.NOT_FOUND
    copy = pickle.loads(pickle.dumps(error))
    assert copy.code is grpc.StatusCode.NOT_FOUND and copy.details == error.details


def _status(code, message, **kw):
    from tandem.services import errors

    return errors.status_proto(code, message, **kw)


def test_errors_from_status_are_typed_with_their_details():
    from tandem.services import errors
    from tandem.services.client import (
        InvalidArgumentError,
        NotFoundError,
        ResourceExhaustedError,
        UnauthenticatedError,
        UnavailableError,
        error_from_status,
    )

    c = grpc.StatusCode
    bad = error_from_status(
        c.INVALID_ARGUMENT, "sampling.stop[2] must not be empty",
        _status(c.INVALID_ARGUMENT, "sampling.stop[2] must not be empty", reason=errors.INVALID_FIELD, field="sampling.stop[2]"),
    )
    assert type(bad) is InvalidArgumentError and isinstance(bad, TandemError)
    assert bad.reason == "INVALID_FIELD" and bad.field_violations == [("sampling.stop[2]", "sampling.stop[2] must not be empty")]
    assert bad.retry_delay is None and bad.metadata == {}
    full = error_from_status(
        c.RESOURCE_EXHAUSTED, "queue full",
        _status(c.RESOURCE_EXHAUSTED, "queue full", reason=errors.QUEUE_FULL, metadata={"target": "t"}, retry_delay_s=0.75),
    )
    assert type(full) is ResourceExhaustedError and full.retry_delay == 0.75 and full.metadata == {"target": "t"}
    assert full.field_violations == [] and str(full) == "RESOURCE_EXHAUSTED: queue full"
    down = error_from_status(c.UNAVAILABLE, "x", _status(c.UNAVAILABLE, "x", reason=errors.TARGET_UNAVAILABLE, retry_delay_s=1))
    assert type(down) is UnavailableError and down.retry_delay == 1.0 and down.reason == "TARGET_UNAVAILABLE"
    assert type(error_from_status(c.NOT_FOUND, "x")) is NotFoundError
    assert type(error_from_status(c.UNAUTHENTICATED, "x")) is UnauthenticatedError
    # no details (e.g. a deadline the client's gRPC enforced, or another server): empty fields
    plain = error_from_status(c.UNAVAILABLE, "connection refused")
    assert plain.reason is None and plain.retry_delay is None and plain.field_violations == []
    # a code without a class of its own stays a TandemError
    assert type(error_from_status(c.ABORTED, "x")) is TandemError


def test_typed_errors_pickle_with_their_details():
    from tandem.services import errors
    from tandem.services.client import ResourceExhaustedError, error_from_status

    c = grpc.StatusCode
    error = error_from_status(
        c.RESOURCE_EXHAUSTED, "queue full",
        _status(c.RESOURCE_EXHAUSTED, "queue full", reason=errors.QUEUE_FULL, metadata={"target": "t"}, retry_delay_s=0.5),
    )
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ResourceExhaustedError
    assert (copy.code, copy.details, copy.reason, copy.metadata, copy.retry_delay) == (
        c.RESOURCE_EXHAUSTED, "queue full", "QUEUE_FULL", {"target": "t"}, 0.5
    )


def test_status_details_name_only_known_reasons():
    from tandem.services import errors

    with pytest.raises(ValueError, match="reason"):
        errors.status_proto(grpc.StatusCode.INTERNAL, "x", reason="SOMETHING_NEW")
    assert errors.field_path_of("sampling.stop[2] must not be empty") == "sampling.stop[2]"
    assert errors.field_path_of("messages[1].role must be one of") == "messages[1].role"
    assert errors.field_path_of("prompt: 9 characters") == "prompt"
    assert errors.field_path_of("sampling.min_p must be in [0, 1]") == "sampling.min_p"
    assert errors.field_path_of("prompt_token_ids[3] = 70000 is outside") == "prompt_token_ids[3]"
    assert errors.field_path_of("[oops") == "" and errors.field_path_of("") == ""


def test_service_config_retries_tandem_rpcs_on_transient_codes():
    import json

    from tandem.services.client import MAX_RETRIES, _channel_options, service_config

    balanced = {"loadBalancingConfig": [{"round_robin": {}}]}  # several routers: every call picks the next
    assert service_config(0) == balanced
    assert service_config(3)["loadBalancingConfig"] == balanced["loadBalancingConfig"]
    (method,) = service_config(3)["methodConfig"]
    assert method["retryPolicy"]["maxAttempts"] == 4
    assert set(method["retryPolicy"]["retryableStatusCodes"]) == {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    assert {(n["service"], n["method"]) for n in method["name"]} == {
        ("tandem.v1.Tandem", m) for m in ("Generate", "ListModels", "GetServerInfo")
    }
    # every method named exists in the service (a typo would silently disable retries)
    assert {n["method"] for n in method["name"]} <= set(tandem_pb2.DESCRIPTOR.services_by_name["Tandem"].methods_by_name)
    with pytest.raises(ValueError, match="retries"):
        service_config(MAX_RETRIES + 1)  # gRPC caps attempts at 5
    options = dict(_channel_options(1024, retries=2))
    assert json.loads(options["grpc.service_config"]) == service_config(2)
    assert dict(_channel_options(1024, retries=0))["grpc.enable_retries"] == 0
    assert options["grpc.keepalive_time_ms"] == 30_000 and options["grpc.keepalive_permit_without_calls"] == 1
    assert "grpc.keepalive_time_ms" not in dict(_channel_options(1024, keepalive=None))
    with pytest.raises(ValueError, match="keepalive"):
        _channel_options(1024, keepalive=0)


def test_client_constructor_validation():
    with pytest.raises(ValueError, match="timeout"):
        TandemClient("127.0.0.1:1", timeout=0)
    with pytest.raises(ValueError, match="address"):
        TandemClient("")
    with pytest.raises(ValueError, match="max_message_bytes"):
        TandemClient("127.0.0.1:1", max_message_bytes=0)


# ----------------------------------------------------------------------------------------
# A fake server: minimal TandemServicer on grpc.aio, in a background thread
# ----------------------------------------------------------------------------------------


class FakeTandem(tandem_pb2_grpc.TandemServicer):
    """Behaviour by target: "echo" streams three chunks; "missing" is NOT_FOUND; "slow"
    streams a chunk every 20 ms until cancelled; "fail_midway" sends a chunk, then an ERROR
    message, then UNAVAILABLE. Every call must carry the bearer token."""

    def __init__(self) -> None:
        self.requests: list[tandem_pb2.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.cancelled: dict[str, threading.Event] = defaultdict(threading.Event)

    async def _authorize(self, context) -> None:
        metadata = {k: v for k, v in context.invocation_metadata()}
        self.metadata.append(metadata)
        if metadata.get("authorization") != f"Bearer {TOKEN}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    async def Generate(self, request, context):
        await self._authorize(context)
        self.requests.append(request)
        rid = request.request_id or "fake-id"
        if request.target == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"target '{request.target}' is not served")
        if request.target == "echo":
            yield tandem_pb2.GenerateResponse(request_id=rid, token_ids=[1, 2], text="he")
            yield tandem_pb2.GenerateResponse(request_id=rid, token_ids=[3], text="llo")
            yield tandem_pb2.GenerateResponse(
                request_id=rid,
                token_ids=[4],
                text=" world",
                finish_reason=tandem_pb2.FINISH_REASON_EOS,
                usage=tandem_pb2.Usage(prompt_tokens=2, completion_tokens=4),
                stats=final_stats(),
            )
        elif request.target == "slow":
            # A cancel shows up as CancelledError at the sleep, or, when it lands while grpc is
            # writing a message, as GeneratorExit once grpc drops this generator: either way
            # the generator ends before its last chunk.
            finished = False
            try:
                for i in range(500):
                    yield tandem_pb2.GenerateResponse(request_id=rid, token_ids=[i], text=".")
                    await asyncio.sleep(0.02)
                finished = True
            finally:
                if not finished:
                    self.cancelled[rid].set()
        elif request.target == "fail_midway":
            yield tandem_pb2.GenerateResponse(request_id=rid, token_ids=[9], text="par")
            yield tandem_pb2.GenerateResponse(
                request_id=rid, finish_reason=tandem_pb2.FINISH_REASON_ERROR, error="target actor died"
            )
            await context.abort(grpc.StatusCode.UNAVAILABLE, "target actor died")

    async def ListModels(self, request, context):
        await self._authorize(context)
        return tandem_pb2.ListModelsResponse(
            targets=[
                tandem_pb2.ModelInfo(
                    name="echo", model="fake/echo", replicas=2, shards=1, dtype="float32",
                    default_method=tandem_pb2.SPECULATION_METHOD_PEARL, max_context=2048,
                    vocab_size=151936, ready=True,
                )
            ],
            draft=tandem_pb2.ModelInfo(name="draft", model="fake/draft", replicas=1, shards=1, exits=[2, 4]),
        )


class FakeServer:
    """grpc.aio server with FakeTandem and grpc.health.v1 on its own loop in a thread."""

    def __init__(self) -> None:
        self.servicer = FakeTandem()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-tandem", daemon=True)
        self._thread.start()
        self.port = self._call(self._start())
        self.address = f"127.0.0.1:{self.port}"

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        tandem_pb2_grpc.add_TandemServicer_to_server(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("tandem.v1.Tandem", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("draining", health_pb2.HealthCheckResponse.NOT_SERVING)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def stop(self) -> None:
        self._call(self.server.stop(grace=None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def fake():
    server = FakeServer()
    yield server
    server.stop()


@pytest.fixture
def client(fake):
    with TandemClient(fake.address, token=TOKEN, timeout=10) as c:
        yield c


# ----------------------------------------------------------------------------------------
# Sync client
# ----------------------------------------------------------------------------------------


def test_stream_yields_deltas_and_final_outcome(fake, client):
    chunks = list(client.generate_stream(target="echo", prompt="hi", request_id="r-stream"))
    assert [c.text for c in chunks] == ["he", "llo", " world"]
    assert [c.token_ids for c in chunks] == [[1, 2], [3], [4]]
    assert [c.finish_reason for c in chunks] == [None, None, "eos"]
    assert chunks[0].stats is None and chunks[-1].stats["method"] == "pearl"


def test_generate_collects_the_stream(fake, client):
    result = client.generate(target="echo", prompt="hi", request_id="r-1")
    assert result.text == "hello world" and result.token_ids == [1, 2, 3, 4]
    assert result.finish_reason == "eos" and result.request_id == "r-1"
    assert result.usage == {"prompt_tokens": 2, "completion_tokens": 4}
    assert set(result.stats) == STATS_KEYS and result.stats["exits_used"] == {2: 6, 4: 2}


def test_request_reaches_the_server_with_only_the_given_fields(fake, client):
    client.generate(
        target="echo",
        messages=[{"role": "user", "content": "Hi"}],
        temperature=0.0,
        max_new_tokens=8,
        stop=["\n"],
        method="spectr",
        max_draft_len=3,
        request_id="r-fields",
    )
    request = next(r for r in fake.servicer.requests if r.request_id == "r-fields")
    assert request.messages.messages[0].content == "Hi"
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0.0
    assert request.sampling.max_new_tokens == 8 and list(request.sampling.stop) == ["\n"]
    for unset in ("top_p", "top_k", "seed"):
        assert not request.sampling.HasField(unset), unset
    assert request.speculation.method == tandem_pb2.SPECULATION_METHOD_SPECTR
    assert request.speculation.max_draft_len == 3


def test_bearer_token_is_sent_as_metadata(fake, client):
    before = len(fake.servicer.metadata)
    client.list_models()
    assert fake.servicer.metadata[before]["authorization"] == f"Bearer {TOKEN}"


def test_missing_token_is_unauthenticated(fake):
    with TandemClient(fake.address, timeout=10) as anonymous:
        with pytest.raises(TandemError) as info:
            anonymous.generate(target="echo", prompt="hi")
    assert info.value.code is grpc.StatusCode.UNAUTHENTICATED


def test_unknown_target_is_not_found(client):
    with pytest.raises(TandemError) as info:
        client.generate(target="missing", prompt="hi")
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    assert str(info.value) == "NOT_FOUND: target 'missing' is not served"


def test_failure_after_tokens_keeps_the_partial_result(fake, client):
    before = len(fake.servicer.requests)
    with pytest.raises(TandemError) as info:
        client.generate(target="fail_midway", prompt="hi")
    # UNAVAILABLE is retried, but not once a response arrived: one call reached the server
    assert len(fake.servicer.requests) == before + 1
    error = info.value
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert error.partial is not None
    assert (error.partial.text, error.partial.token_ids) == ("par", [9])
    assert error.partial.finish_reason == "error" and error.partial.error == "target actor died"


def test_deadline_becomes_deadline_exceeded(client):
    with pytest.raises(TandemError) as info:
        client.generate(target="slow", prompt="hi", timeout=0.3)
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_sync_cancel_reaches_the_server(fake, client):
    stream = client.generate_stream(target="slow", prompt="hi", request_id="sync-cancel")
    first = next(stream)
    assert first.text == "."
    stream.cancel()
    assert list(stream) == []  # a cancelled stream just ends
    assert fake.servicer.cancelled["sync-cancel"].wait(5), "the server never saw the cancellation"


def test_sync_break_out_cancels_the_call(fake, client):
    for i, _ in enumerate(client.generate_stream(target="slow", prompt="hi", request_id="sync-break")):
        if i == 1:
            break
    assert fake.servicer.cancelled["sync-break"].wait(5), "the server never saw the cancellation"


def test_validation_errors_are_raised_before_sending(fake, client):
    before = len(fake.servicer.requests)
    with pytest.raises(ValueError, match="top_p"):
        client.generate_stream(target="echo", prompt="hi", top_p=0)
    assert len(fake.servicer.requests) == before


def test_list_models(client):
    models = client.list_models()
    assert models["targets"] == [
        {
            "name": "echo", "model": "fake/echo", "replicas": 2, "shards": 1, "dtype": "float32",
            "default_method": "pearl", "max_context": 2048, "exits": [], "vocab_size": 151936, "ready": True,
        }
    ]
    assert models["draft"]["exits"] == [2, 4]


def test_health(client):
    assert client.health() == "SERVING"
    assert client.health("tandem.v1.Tandem") == "SERVING"
    assert client.health("draining") == "NOT_SERVING"
    with pytest.raises(TandemError) as info:
        client.health("no.such.Service")
    assert info.value.code is grpc.StatusCode.NOT_FOUND


# ----------------------------------------------------------------------------------------
# asyncio client
# ----------------------------------------------------------------------------------------


def test_async_client_streams_and_collects(fake):
    async def scenario():
        async with AsyncTandemClient(fake.address, token=TOKEN, timeout=10) as client:
            chunks = [c async for c in client.generate_stream(target="echo", prompt="hi")]
            result = await client.generate(target="echo", prompt="hi", request_id="a-1")
            return chunks, result

    chunks, result = asyncio.run(scenario())
    assert [c.text for c in chunks] == ["he", "llo", " world"] and chunks[-1].finish_reason == "eos"
    assert (result.text, result.token_ids, result.request_id) == ("hello world", [1, 2, 3, 4], "a-1")
    assert result.stats["method"] == "pearl"


def test_async_errors_and_health(fake):
    async def scenario():
        async with AsyncTandemClient(fake.address, token=TOKEN, timeout=10) as client:
            with pytest.raises(TandemError) as not_found:
                await client.generate(target="missing", prompt="hi")
            with pytest.raises(TandemError) as midway:
                await client.generate(target="fail_midway", prompt="hi")
            with pytest.raises(TandemError) as deadline:
                await client.generate(target="slow", prompt="hi", timeout=0.3)
            return not_found.value, midway.value, deadline.value, await client.health(), await client.list_models()

    not_found, midway, deadline, status, models = asyncio.run(scenario())
    assert not_found.code is grpc.StatusCode.NOT_FOUND
    assert midway.code is grpc.StatusCode.UNAVAILABLE and midway.partial.text == "par"
    assert deadline.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert status == "SERVING" and models["targets"][0]["name"] == "echo"


def test_async_break_out_cancels_the_call(fake):
    async def scenario():
        async with AsyncTandemClient(fake.address, token=TOKEN, timeout=10) as client:
            received = 0
            async for _ in client.generate_stream(target="slow", prompt="hi", request_id="async-break"):
                received += 1
                if received == 2:
                    break
            # the dropped stream is garbage: grpc.aio cancels the call; the channel stays open
            return received, await asyncio.to_thread(fake.servicer.cancelled["async-break"].wait, 5)

    received, seen = asyncio.run(scenario())
    assert received == 2 and seen, "the server never saw the cancellation"


def test_async_aclose_cancels_the_call(fake):
    async def scenario():
        async with AsyncTandemClient(fake.address, token=TOKEN, timeout=10) as client:
            stream = client.generate_stream(target="slow", prompt="hi", request_id="async-aclose")
            first = await stream.__anext__()
            await stream.aclose()
            rest = [c async for c in stream]
            return first, rest, await asyncio.to_thread(fake.servicer.cancelled["async-aclose"].wait, 5)

    first, rest, seen = asyncio.run(scenario())
    assert first.text == "." and rest == [] and seen


def test_async_cancel_from_another_task_ends_the_stream(fake):
    async def scenario():
        async with AsyncTandemClient(fake.address, token=TOKEN, timeout=10) as client:
            stream = client.generate_stream(target="slow", prompt="hi", request_id="async-other-task")
            await stream.__anext__()
            asyncio.get_running_loop().call_later(0.1, stream.cancel)
            rest = [c async for c in stream]  # ends quietly when cancel() lands mid-read
            return rest, await asyncio.to_thread(fake.servicer.cancelled["async-other-task"].wait, 5)

    rest, seen = asyncio.run(scenario())
    assert len(rest) < 100 and seen


def test_async_task_cancellation_propagates_and_cancels_the_call(fake):
    async def scenario():
        async with AsyncTandemClient(fake.address, token=TOKEN, timeout=10) as client:

            async def consume():
                async for _ in client.generate_stream(target="slow", prompt="hi", request_id="async-task"):
                    pass

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await asyncio.to_thread(fake.servicer.cancelled["async-task"].wait, 5)

    assert asyncio.run(scenario())


def test_one_client_spreads_calls_over_several_routers_and_skips_one_that_is_gone():
    """Two real gRPC servers on loopback (the health service, counting calls) behind one
    address list, as several routers behind a headless Service: calls alternate between
    them; with one stopped, every call still succeeds on the other. Control: a client of the
    stopped one alone fails."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from tandem.services.errors import TandemError

    counts = [0, 0]
    servers, ports = [], []
    for i in range(2):
        class Counting(health.HealthServicer):
            def Check(self, request, context, i=i):
                counts[i] += 1
                return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(Counting(), server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
    try:
        with TandemClient(f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}", timeout=10) as client:
            for _ in range(20):
                assert client.health() == "SERVING"
            assert counts[0] >= 5 and counts[1] >= 5, counts  # round-robin, not pick-first
            servers[0].stop(None).wait()
            before = counts[1]
            for _ in range(10):
                assert client.health() == "SERVING"
            assert counts[1] == before + 10
        with TandemClient(f"127.0.0.1:{ports[0]}", timeout=5, retries=0) as alone:
            with pytest.raises(TandemError):
                alone.health()
    finally:
        for server in servers:
            server.stop(None)
