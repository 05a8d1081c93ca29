"""The gRPC service end to end: a real grpc.aio server on a free loopback port, a local Ray
cluster, tiny models. Streaming, two targets at once, every status code, deadlines,
cancellation freeing every actor's KV, auth on and off, losslessness over the wire, health,
reflection, metrics, and a few hundred malformed requests answered with clean codes only."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.services.client import AsyncTandemClient, TandemClient, TandemError
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc
from tests.service.conftest import ServerThread, service_config

PROMPT = "def x return y"


def wait_no_live_requests(engine, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    live = {}
    while time.monotonic() < deadline:
        live = engine.live_requests()
        if all(v == [] for v in live.values()):
            return live
        time.sleep(0.1)
    raise AssertionError(f"requests still live on actors: {live}")


def test_streams_several_deltas_then_the_outcome(server):
    with TandemClient(server.address) as c:
        chunks = list(c.generate_stream(target="small", prompt=PROMPT, max_new_tokens=40, ignore_eos=True, method="sd"))
    assert len(chunks) >= 3
    assert all(ch.finish_reason is None for ch in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.usage["completion_tokens"] == 40 == sum(len(ch.token_ids) for ch in chunks)
    assert last.usage["prompt_tokens"] == 6
    s = last.stats
    assert s["method"] == "sd" and s["rounds"] >= 1 and s["drafted"] >= s["accepted"] >= 0
    assert s["mean_accepted_len"] >= 1.0 and len(s["acceptance_by_position"]) >= 1
    assert sum(s["exits_used"].values()) == s["drafted"]
    # several tokens per delta when drafts are accepted
    assert max(len(ch.token_ids) for ch in chunks) >= 1


@pytest.mark.parametrize("target", ["small", "other"])
def test_greedy_over_grpc_equals_target_only(server, target):
    with TandemClient(server.address) as c:
        ref = c.generate(target=target, prompt=PROMPT, max_new_tokens=48, ignore_eos=True, method="off")
        assert ref.stats["method"] == "off" and ref.stats["drafted"] == 0
        for method in ("auto", "sd", "sorted", "pearl", "spectr"):
            out = c.generate(target=target, prompt=PROMPT, max_new_tokens=48, ignore_eos=True, method=method)
            assert out.token_ids == ref.token_ids, method
            assert out.text == ref.text


def test_two_targets_at_once(server):
    with TandemClient(server.address) as c:
        ref = {t: c.generate(target=t, prompt=PROMPT, max_new_tokens=30, ignore_eos=True, method="off").token_ids for t in ("small", "other")}
        with ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(c.generate, target=t, prompt=PROMPT, max_new_tokens=30, ignore_eos=True, method="pearl") for t in ("small", "other") * 2]
            outs = [f.result() for f in futs]
    for f, t in zip(outs, ("small", "other") * 2):
        assert f.token_ids == ref[t]
    assert ref["small"] != ref["other"]  # really two different models


def test_auto_overlaps_only_where_draft_and_target_do_not_share_cores(server):
    """The router's `auto` loop follows overlap_pays on its actors' placement: this server's
    draft and target actors (threads left at the default: every core of the node) share one
    node, each with all its cores, so they draft and verify in turn (sd), not overlapped; the
    overlapped side of the rule: tests/unit/test_overlap_rule.py."""
    import ray

    from tandem.deploy.serve import overlap_pays

    engine = server.app.engine
    d = engine.draft_pool.info
    t = ray.get(engine.targets["small"].members[0].handle.info.remote())
    assert d["node_id"] == t["node_id"] and d["threads"] == t["threads"] == t["node_cpus"] >= 1
    policy = server.app.router.routes["small"].policy
    assert policy.overlapped is overlap_pays(d, t) is False


def test_goodput_policy_prices_forwards_by_their_rows(server):
    """Issue 12: the target measured its cost for batches of blocks at start (max_concurrent 4:
    2 and 4 blocks of max_draft_len + 1 = 7 rows), and target-only steps of requests running
    together are learned at the rows of the forward they shared, not as steps of one row."""
    policy = server.app.router.routes["small"].policy
    curve = policy.snapshot()["cost_curve"]
    assert {14, 28} <= set(curve) and all(c > 0 for c in curve.values())
    counts = lambda: {rows: ema.count for rows, ema in policy.verify_s.items()}  # noqa: E731
    before = counts()
    with TandemClient(server.address) as c, ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(c.generate, target="small", prompt=PROMPT, max_new_tokens=40, ignore_eos=True, method="off")
                for _ in range(4)]
        [f.result() for f in futs]
    grown = sorted(rows for rows, n in counts().items() if n > before.get(rows, 0))
    # target-only steps only, so a step priced as one row each would grow row 1 alone
    assert grown and max(grown) >= 2 and max(grown) <= 4, grown


def test_sampling_is_seeded_and_async_client_streams(server):
    import asyncio

    async def run():
        async with AsyncTandemClient(server.address) as c:
            # a seed reproduces a sample for a fixed method and draft length ("auto" may pick
            # another exit or length per request, and so another, equally valid, sample)
            kw = dict(target="small", prompt=PROMPT, max_new_tokens=20, temperature=1.0, seed=5, ignore_eos=True, method="sd", max_draft_len=4)
            a = await c.generate(**kw)
            b = await c.generate(**kw)
            n = 0
            async for _ in c.generate_stream(target="other", prompt=PROMPT, max_new_tokens=10, ignore_eos=True):
                n += 1
            return a, b, n

    a, b, n = asyncio.run(run())
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20 and n >= 2


def test_stop_string_and_stop_token(server):
    with TandemClient(server.address) as c:
        ref = c.generate(target="small", prompt=PROMPT, max_new_tokens=40, ignore_eos=True, method="off")
        words = ref.text.split()
        stop_word = words[3]
        cut = ref.text.index(stop_word)
        out = c.generate(target="small", prompt=PROMPT, max_new_tokens=40, ignore_eos=True, stop=[stop_word], method="sd")
        assert out.finish_reason == "stop"
        assert out.text == ref.text[:cut]
        tok = ref.token_ids[5]
        out2 = c.generate(target="small", prompt=PROMPT, max_new_tokens=40, ignore_eos=True, stop_token_ids=[tok], method="pearl")
        assert out2.finish_reason == "stop"
        assert out2.token_ids == ref.token_ids[: ref.token_ids.index(tok) + 1]


# (client arguments, the field path the error names); tests/service/test_errors.py checks
# the same cases' google.rpc.BadRequest
BAD_CLIENT_ARGS = [
    ({"temperature": -1.0}, "sampling.temperature"),
    ({"temperature": float("nan")}, "sampling.temperature"),
    ({"top_p": 0.0}, "sampling.top_p"),
    ({"top_p": 1.5}, "sampling.top_p"),
    ({"top_k": -2}, "sampling.top_k"),
    ({"max_new_tokens": 0}, "sampling.max_new_tokens"),
    ({"max_new_tokens": 100000}, "sampling.max_new_tokens"),
    ({"max_draft_len": 0}, "speculation.max_draft_len"),
    ({"stop": [""]}, "sampling.stop[0]"),
    ({"stop_token_ids": [999]}, "sampling.stop_token_ids[0]"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "w1 " * 8200}, "prompt"),
    ({"messages": [{"role": "robot", "content": "hi"}], "prompt": None}, "messages[0].role"),
]


@pytest.mark.parametrize("kwargs, field", BAD_CLIENT_ARGS)
def test_bad_parameters_are_invalid_argument_naming_the_field(server, kwargs, field):
    args = {"target": "small", "prompt": PROMPT, **kwargs}
    if args.get("prompt") is None:
        args.pop("prompt")
    with TandemClient(server.address) as c:
        with pytest.raises((TandemError, ValueError)) as info:
            c.generate(**args)
    err = info.value
    if isinstance(err, TandemError):  # the client may refuse some before sending
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err
        assert field in err.details, err.details
    else:
        assert field.split(".")[-1].split("[")[0] in str(err)


def test_raw_stub_errors_cover_what_the_client_cannot_send(server):
    """Bypass the client's own checks: the server validates everything itself."""
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.TandemStub(ch)
        cases = [
            (pb.GenerateRequest(target="small"), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
            (pb.GenerateRequest(target="", prompt="a"), grpc.StatusCode.INVALID_ARGUMENT, "target"),
            (pb.GenerateRequest(target="nope", prompt="a"), grpc.StatusCode.NOT_FOUND, "nope"),
            (pb.GenerateRequest(target="small", messages=pb.ChatMessages()), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
            (
                pb.GenerateRequest(target="small", prompt="a", sampling=pb.SamplingParams(temperature=-0.5)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "sampling.temperature",
            ),
            (
                pb.GenerateRequest(target="small", prompt="a", speculation=pb.SpeculationOptions(method=42)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "speculation.method",
            ),
            (pb.GenerateRequest(target="small", prompt="a", request_id="x" * 500), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        ]
        for req, code, field in cases:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(req, timeout=30))
            assert info.value.code() == code, (req, info.value.details())
            assert field in info.value.details()
            assert "Traceback" not in info.value.details()


def test_unknown_target_is_not_found(server):
    with TandemClient(server.address) as c:
        with pytest.raises(TandemError) as info:
            c.generate(target="gpt-17", prompt=PROMPT)
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert "small" in info.value.details  # names what is served


def test_full_queue_is_resource_exhausted(server):
    """max_concurrent 4 and queue_size 4: a burst of 16 long requests overflows."""
    codes = []

    def one(_):
        try:
            with TandemClient(server.address, retries=0) as c:  # the refusal itself, not gRPC's retries of it
                c.generate(target="small", prompt=PROMPT, max_new_tokens=300, ignore_eos=True, method="off")
            return "OK"
        except TandemError as exc:
            return exc.code.name

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(16)))
    assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes, codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    wait_no_live_requests(server.engine)


def test_deadline_stops_the_work_and_frees_kv(server):
    with TandemClient(server.address) as c:
        with pytest.raises(TandemError) as info:
            c.generate(target="small", prompt=PROMPT, max_new_tokens=4000, ignore_eos=True, method="pearl", timeout=0.5)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_no_live_requests(server.engine)


def test_cancel_frees_kv_on_every_actor(server):
    with TandemClient(server.address) as c:
        stream = c.generate_stream(target="other", prompt=PROMPT, max_new_tokens=3000, ignore_eos=True, method="pearl")
        first = next(stream)
        assert first.token_ids
        # the request is live on the target and the draft now
        live = server.engine.live_requests()
        assert any(v for k, v in live.items() if k.startswith("other/")), live
        stream.cancel()
    wait_no_live_requests(server.engine)


def test_target_failure_mid_stream_resumes_with_the_same_text(server):
    target = server.engine.targets["small"].members[0].handle
    pid = ray.get(target.info.remote())["pid"]
    chunks = []
    with TandemClient(server.address) as c:
        ref = c.generate(target="small", prompt=PROMPT, max_new_tokens=200, ignore_eos=True, method="off")
        for ch in c.generate_stream(target="small", prompt=PROMPT, max_new_tokens=200, ignore_eos=True, method="sd", timeout=120):
            chunks.append(ch)
            if len(chunks) == 1:
                os.kill(pid, signal.SIGKILL)
    # the only replica died after the stream sent tokens: the request waited for Ray's
    # restart and resumed there (prompt + sent tokens re-prefilled), nothing lost or repeated
    assert ray.get(target.info.remote(), timeout=30)["pid"] != pid
    assert [t for ch in chunks for t in ch.token_ids] == ref.token_ids
    assert "".join(ch.text for ch in chunks) == ref.text
    assert chunks[-1].finish_reason == "length" and not chunks[-1].error


def test_list_models_health_and_reflection(server):
    with TandemClient(server.address) as c:
        models = c.list_models()
        assert c.health() == "SERVING"
        assert c.health("tandem.v1.Tandem") == "SERVING"
    names = [t["name"] for t in models["targets"]]
    assert names == ["small", "other"]
    assert models["draft"]["exits"] == [2, 4]
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        services = {s.name for s in resp.list_services_response.service}
    assert {"tandem.v1.Tandem", "grpc.health.v1.Health"} <= services


def test_metrics_are_scraped(server):
    from tandem.services.telemetry import METRIC_NAMES

    with TandemClient(server.address) as c:
        c.generate(target="small", prompt=PROMPT, max_new_tokens=12, ignore_eos=True, method="sd")
    port = server.app.telemetry.metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for name in METRIC_NAMES:  # services/telemetry.py: every metric it documents is served
        assert name in body, name
    assert 'target="small"' in body


def kv_tokens_scraped(server, target: str) -> float:
    port = server.app.telemetry.metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    (line,) = [ln for ln in body.splitlines() if ln.startswith("tandem_kv_cache_tokens{") and f'target="{target}"' in ln]
    return float(line.rsplit(" ", 1)[1])


def test_kv_tokens_follow_a_running_request(server):
    """tandem_kv_cache_tokens: while a stream is open its prompt and committed tokens are held
    on the target; when it ends they are freed (the control: the gauge is not a total)."""
    with TandemClient(server.address) as c:
        stream = c.generate_stream(target="other", prompt=PROMPT, max_new_tokens=200, ignore_eos=True, method="sd")
        seen = len(next(stream).token_ids)
        held = kv_tokens_scraped(server, "other")
        stream.cancel()
        assert held >= 6 + seen  # the 6 prompt tokens and at least the tokens already streamed
        assert held <= 6 + 200
        deadline = time.monotonic() + 30
        while kv_tokens_scraped(server, "other") != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert kv_tokens_scraped(server, "other") == 0


FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "request_id": st.text(max_size=200),
        "target": st.sampled_from(["small", "other", "", "nope", "\x00"]) | st.text(max_size=20),
        "prompt": st.text(max_size=300),
        "raw_prompt": st.booleans(),
        "temperature": st.floats(allow_nan=True, allow_infinity=True, width=32),
        "top_p": st.floats(allow_nan=True, allow_infinity=True, width=32),
        "top_k": st.integers(min_value=-(2**31), max_value=2**31 - 1),
        "seed": st.integers(min_value=0, max_value=2**64 - 1),
        "max_new_tokens": st.integers(min_value=0, max_value=8),
        "stop": st.lists(st.text(max_size=5), max_size=3),
        "stop_token_ids": st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=3),
        "method": st.integers(min_value=0, max_value=9),
        "max_draft_len": st.integers(min_value=0, max_value=100),
        "roles": st.lists(st.sampled_from(["user", "system", "assistant", "", "robot"]), max_size=3),
    },
)


def _request(f: dict) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=f.get("request_id", ""), target=f.get("target", "small"), raw_prompt=f.get("raw_prompt", False))
    if "roles" in f and f["roles"]:
        req.messages.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=f.get("prompt", "a")) for r in f["roles"]]))
    elif "prompt" in f:
        req.prompt = f["prompt"]
    s = req.sampling
    for k in ("temperature", "top_p", "top_k", "seed", "max_new_tokens"):
        if k in f:
            setattr(s, k, f[k])
    s.stop.extend(f.get("stop", []))
    s.stop_token_ids.extend(f.get("stop_token_ids", []))
    s.ignore_eos = True
    req.speculation.method = f.get("method", 0)
    if "max_draft_len" in f:
        req.speculation.max_draft_len = f["max_draft_len"]
    return req


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(fields=FIELDS)
def test_malformed_requests_get_clean_status_codes(server, fields):
    allowed = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.TandemStub(ch)
        try:
            msgs = list(stub.Generate(_request(fields), timeout=60))
            assert msgs and msgs[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        except grpc.RpcError as exc:
            assert exc.code() in allowed, (exc.code(), exc.details(), fields)
            assert "Traceback" not in (exc.details() or "")


def test_server_is_healthy_after_the_fuzzing(server):
    with TandemClient(server.address) as c:
        assert c.health() == "SERVING"
        assert len(c.generate(target="small", prompt=PROMPT, max_new_tokens=5, ignore_eos=True).token_ids) == 5
    wait_no_live_requests(server.engine)


def test_auth_on(ray_local, tiny_service_models, monkeypatch, server):
    monkeypatch.setenv("TANDEM_TEST_TOKEN", "s3cret")
    cfg = service_config(tiny_service_models, auth_token_env="TANDEM_TEST_TOKEN")
    srv = ServerThread(cfg, engine=server.engine)  # a second server over the same pools
    try:
        with TandemClient(srv.address) as c:
            assert c.health() == "SERVING"  # probes need no token
            with pytest.raises(TandemError) as info:
                c.generate(target="small", prompt=PROMPT, max_new_tokens=3)
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(TandemError) as info:
                c.list_models()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        with TandemClient(srv.address, token="wrong") as c:
            with pytest.raises(TandemError) as info:
                c.generate(target="small", prompt=PROMPT, max_new_tokens=3)
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        with TandemClient(srv.address, token="s3cret") as c:
            assert len(c.generate(target="small", prompt=PROMPT, max_new_tokens=3, ignore_eos=True).token_ids) == 3
    finally:
        srv.stop(keep_engine=True)


def test_auth_env_missing_is_a_clear_config_error(ray_local, tiny_service_models, server):
    cfg = service_config(tiny_service_models, auth_token_env="TANDEM_NOT_SET_ANYWHERE")
    with pytest.raises(ValueError, match="auth_token_env"):
        ServerThread(cfg, engine=server.engine)
