"""Hostile clients and sick actors, on a real grpc.aio server over a local Ray cluster
(issue: no leaks between requests, no work for the departed, no one actor taking the
service down). Each failure mode has a negative control that shows its check fires."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.actors.speculative import RequestAlreadyOpenError
from tandem.services.client import TandemClient, TandemError
from tandem.v1 import tandem_pb2 as pb
from tandem.services.router import Router
from tandem.speculation.sampling import SamplingParams, logits_to_probs
from tests.service.conftest import ServerThread, service_config

PROMPT = "def x return y"
A_PROMPT = "the a an of to and in is it for on"
B_PROMPT = "x y n print def return if else"


@pytest.fixture(scope="module")
def slow_models(tiny_service_models, tmp_path_factory):
    """A wider tiny target with a long context: a long prompt's prefill takes seconds."""
    from transformers import GenerationConfig

    from tests.conftest import TINY_WORDS, make_tiny_model, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("slow")
    path = make_tiny_model(root / "slow", seed=21, vocab=TINY_WORDS, layers=4, hidden=256, std=0.3, context=16384)
    make_tiny_tokenizer(root / "slow")
    GenerationConfig(eos_token_id=1).save_pretrained(str(root / "slow"))
    return {**tiny_service_models, "other": path}


@pytest.fixture(scope="module")
def hostile_server(ray_local, slow_models):
    cfg = service_config(slow_models, max_concurrent=4, queue_size=8, heartbeat_s=0.5, heartbeat_timeout_s=3.0)
    srv = ServerThread(cfg)
    yield srv
    srv.stop()


def _stream_text(address: str, prompt: str, *, request_id: str, started: threading.Event | None = None, n: int = 150) -> tuple[list[int], str]:
    with TandemClient(address) as c:
        ids: list[int] = []
        text = []
        for ch in c.generate_stream(target="small", prompt=prompt, max_new_tokens=n, ignore_eos=True, method="sd", request_id=request_id):
            ids.extend(ch.token_ids)
            text.append(ch.text)
            if started is not None:
                started.set()
        return ids, "".join(text)


def _two_clients_one_id(address: str) -> dict:
    """A streams; once its first tokens arrived, B starts with the same request_id."""
    out: dict = {}
    a_started = threading.Event()

    def run(name, prompt, started=None):
        try:
            out[name] = _stream_text(address, prompt, request_id="dup-0", started=started)
        except TandemError as exc:
            out[name] = exc

    ta = threading.Thread(target=run, args=("A", A_PROMPT, a_started))
    ta.start()
    assert a_started.wait(60)
    tb = threading.Thread(target=run, args=("B", B_PROMPT))
    tb.start()
    ta.join(120)
    tb.join(120)
    return out


def test_two_clients_with_one_request_id_each_get_their_own_text(server):
    with TandemClient(server.address) as c:
        ref_a = c.generate(target="small", prompt=A_PROMPT, max_new_tokens=150, ignore_eos=True, method="off").token_ids
        ref_b = c.generate(target="small", prompt=B_PROMPT, max_new_tokens=150, ignore_eos=True, method="off").token_ids
    assert ref_a != ref_b  # the two prompts are told apart by their output
    for _ in range(3):
        out = _two_clients_one_id(server.address)
        assert not isinstance(out["A"], Exception) and not isinstance(out["B"], Exception), out
        assert out["A"][0] == ref_a and out["B"][0] == ref_b


def test_negative_control_a_client_id_as_state_key_collides(server, monkeypatch):
    # the old behaviour, injected: actor state keyed by the client's request_id
    monkeypatch.setattr(Router, "new_state_key", staticmethod(lambda: "dup-0"))
    with TandemClient(server.address) as c:
        ref_a = c.generate(target="small", prompt=A_PROMPT, max_new_tokens=150, ignore_eos=True, method="off").token_ids
        ref_b = c.generate(target="small", prompt=B_PROMPT, max_new_tokens=150, ignore_eos=True, method="off").token_ids
    out = _two_clients_one_id(server.address)
    a_ok = not isinstance(out["A"], Exception) and out["A"][0] == ref_a
    b_ok = not isinstance(out["B"], Exception) and out["B"][0] == ref_b
    assert not (a_ok and b_ok), "the same state key for two live requests must be detected"
    # the actors refuse a second open of one key (no silent overwrite): B fails, A is intact
    assert a_ok and isinstance(out["B"], TandemError)


def test_an_actor_refuses_to_reopen_live_request_state(tiny_paths):
    from tandem.actors.verifier import Verifier
    from tandem.actors.workers import ModelLoad

    v = Verifier(ModelLoad(path=tiny_paths[0], dtype="float32").build())
    v.open("k", [0, 1, 2], sampling=SamplingParams())
    with pytest.raises(RequestAlreadyOpenError):
        v.open("k", [3, 4], sampling=SamplingParams())
    assert v.committed("k") == [0, 1, 2]  # untouched


# ------------------------------------------------------------------ work for the departed


def _latency(address: str, target: str = "other", n: int = 48) -> float:
    t0 = time.perf_counter()
    with TandemClient(address) as c:
        c.generate(target=target, prompt=PROMPT, max_new_tokens=n, ignore_eos=True, method="off", timeout=120)
    return time.perf_counter() - t0


LONG_PROMPT = " ".join(["the"] * 15000)


def _long_request(address: str, timeout: float) -> None:
    with TandemClient(address) as c:
        c.generate(target="other", prompt=LONG_PROMPT, raw_prompt=True, max_new_tokens=1, method="off", timeout=timeout)


def _long_prompt_then_next(address: str, *, deadline_s: float | None) -> float:
    if deadline_s is None:  # left to run: its client waits for it
        threading.Thread(target=_long_request, args=(address, 300), daemon=True).start()
        time.sleep(1.0)
    else:
        with pytest.raises(TandemError) as info:
            _long_request(address, deadline_s)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    return _latency(address)


def test_an_expired_long_prefill_stops_and_leaves_the_next_request_fast(hostile_server):
    idle = min(_latency(hostile_server.address) for _ in range(3))
    after = _long_prompt_then_next(hostile_server.address, deadline_s=1.0)
    assert after <= 3 * idle + 0.5, f"next request took {after:.2f}s, idle {idle:.2f}s"
    # negative control: the same prefill left to run (no deadline) does slow the next one,
    # so the probe above would see work that keeps running
    time.sleep(1.0)
    busy = _long_prompt_then_next(hostile_server.address, deadline_s=None)
    assert busy > 3 * idle + 0.5, f"control: next request took {busy:.2f}s with a prefill running, idle {idle:.2f}s"
    t0 = time.perf_counter()
    _long_request(hostile_server.address, 300)  # queued behind the control's: waits it out
    assert time.perf_counter() - t0 > 1.0


def test_a_burst_of_expiring_requests_leaves_no_work_behind(hostile_server):
    # the probe's second case: many ~300-token prompts with 0.25 s deadlines at once
    addr = hostile_server.address
    idle = min(_latency(addr) for _ in range(3))
    prompt = " ".join(["the a of to"] * 75)

    def expiring(_):
        # retries=0: a refusal as it is (a retry waiting out the server's pushback would
        # end DEADLINE_EXCEEDED at these 0.25 s deadlines)
        with TandemClient(addr, retries=0) as c:
            try:
                c.generate(target="other", prompt=prompt, raw_prompt=True, max_new_tokens=64, ignore_eos=True, timeout=0.25)
                return "OK"
            except TandemError as exc:
                return exc.code.name

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(expiring, range(48)))
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}, codes
    # admission counted the work still running on the actors: the burst was partly refused
    assert "RESOURCE_EXHAUSTED" in codes, codes
    time.sleep(0.5)
    after = _latency(addr)
    assert after <= 3 * idle + 0.5, f"next request took {after:.2f}s, idle {idle:.2f}s"


# ------------------------------------------------------------------ a hung actor of one target


def _health(address: str, service: str) -> str:
    with grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def _wait_for(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.2)
    return False


def test_a_paused_actor_of_one_target_leaves_the_other_serving(hostile_server):
    addr = hostile_server.address
    idle_other = min(_latency(addr, "other", 16) for _ in range(3))
    idle_small = min(_latency(addr, "small", 16) for _ in range(3))
    with TandemClient(addr) as c:
        ref = c.generate(target="small", prompt=PROMPT, max_new_tokens=24, ignore_eos=True, method="off").token_ids
    assert _health(addr, "small") == "SERVING" == _health(addr, "other")
    member = hostile_server.engine.targets["small"].members[0]
    pid = ray.get(member.handle.info.remote())["pid"]
    os.kill(pid, signal.SIGSTOP)
    results: list = []
    try:
        def ask_small():
            with TandemClient(addr) as c2:
                try:
                    results.append(c2.generate(target="small", prompt=PROMPT, max_new_tokens=24, ignore_eos=True, method="sd", timeout=90).token_ids)
                except TandemError as exc:
                    results.append(exc)

        waiting = [threading.Thread(target=ask_small) for _ in range(4)]
        for t in waiting:
            t.start()
        time.sleep(0.5)
        # negative control: the pause took effect, small's requests are not answered
        assert not results
        assert _latency(addr, "other", 16) <= 3 * idle_other + 0.5
        assert _wait_for(lambda: _health(addr, "small") == "NOT_SERVING", 15)
        assert _health(addr, "other") == "SERVING"
        assert _latency(addr, "other", 16) <= 3 * idle_other + 0.5
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass  # replaced (killed) by the heartbeat monitor already
    # the hung replica is replaced; waiting requests resume and finish with the same text
    for t in waiting:
        t.join(120)
    assert results == [ref] * 4, results
    assert _wait_for(lambda: _health(addr, "small") == "SERVING", 60)
    assert _latency(addr, "small", 16) <= 3 * idle_small + 2.0


# ------------------------------------------------------------------ codes


def test_a_tiny_temperature_is_greedy_not_internal(server):
    with TandemClient(server.address) as c:
        greedy = c.generate(target="small", prompt=PROMPT, max_new_tokens=16, ignore_eos=True, method="sd").token_ids
        for t in (1e-38, 3e-38, 1e-45, 1e-6):
            out = c.generate(target="small", prompt=PROMPT, max_new_tokens=16, ignore_eos=True, method="sd", temperature=t)
            assert out.token_ids == greedy, t
    # negative control: without the floor, such a temperature turns logits into inf/NaN
    import torch

    raw = SamplingParams(temperature=1.0)
    object.__setattr__(raw, "temperature", 1e-38)
    probs = logits_to_probs(torch.tensor([30.0, 10.0, -2.0]), raw)  # 30 / 1e-38 overflows float32
    assert not torch.isfinite(probs).all()


def _raw_generate(address: str, payload: bytes, metadata=()) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_stream("/tandem.v1.Tandem/Generate", request_serializer=None, response_deserializer=None)
        try:
            list(call(payload, timeout=10, metadata=metadata))
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


BAD = [
    b"\x12\x05small\x1a\x03\xff\xfe\xfd",  # prompt (field 3): invalid UTF-8
    b"\x12\x05small\x1a\x40abc",  # prompt: length past the end (truncated)
    b"\x12",  # target: tag without its length
]


@pytest.mark.parametrize("payload", BAD)
def test_undecodable_requests_get_invalid_argument(server, payload):
    with pytest.raises(Exception):  # negative control: these bytes really do not parse
        pb.GenerateRequest.FromString(payload)
    code, details = _raw_generate(server.address, payload)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "request:" in details and "Traceback" not in details


def test_undecodable_and_unknown_calls_without_a_token_are_unauthenticated(ray_local, tiny_service_models, monkeypatch):
    monkeypatch.setenv("TANDEM_TEST_TOKEN", "s3cret")
    cfg = service_config(tiny_service_models, auth_token_env="TANDEM_TEST_TOKEN")
    srv = ServerThread(cfg)
    try:
        code, _ = _raw_generate(srv.address, BAD[0])
        assert code == grpc.StatusCode.UNAUTHENTICATED  # auth before the request is looked at
        code, _ = _raw_generate(srv.address, BAD[0], metadata=(("authorization", "Bearer s3cret"),))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        with grpc.insecure_channel(srv.address) as ch:
            with pytest.raises(grpc.RpcError) as info:
                ch.unary_unary("/tandem.v1.Tandem/NoSuchMethod")(b"", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:
                ch.unary_unary("/tandem.v1.Tandem/NoSuchMethod")(b"", timeout=10, metadata=(("authorization", "Bearer s3cret"),))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # with the token: the truth
    finally:
        srv.stop(keep_engine=False)


def test_zero_max_new_tokens_takes_the_default_and_messages_errors_name_messages(server):
    with grpc.insecure_channel(server.address) as ch:
        from tandem.v1 import tandem_pb2_grpc as pb_grpc

        stub = pb_grpc.TandemStub(ch)
        req = pb.GenerateRequest(target="small", prompt=PROMPT, sampling=pb.SamplingParams(max_new_tokens=0, ignore_eos=True))
        msgs = list(stub.Generate(req, timeout=60))
        assert msgs[-1].usage.completion_tokens == server.app.config.server.default_max_new_tokens
        huge = pb.GenerateRequest(target="small", messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="the " * 9000)]))
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(huge, timeout=60))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("messages:"), info.value.details()


# ------------------------------------------------------------------ tokenizing off the event loop


def _health_gaps(address: str, work) -> tuple[list[float], object]:
    """Run `work` in a thread while health checks run back to back; every check's wait,
    longest first."""
    gaps: list[float] = []
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("r", work()))
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        t.start()
        while t.is_alive():
            t0 = time.perf_counter()
            stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
            gaps.append(time.perf_counter() - t0)
            time.sleep(0.01)
    t.join()
    return sorted(gaps, reverse=True), result.get("r")


def _stalled(gaps: list[float]) -> float:
    return sum(g for g in gaps if g > 0.2)


def _big_prompts(address: str, n: int = 4) -> list:
    # 1.08M characters, 360k tokens: over the context. Large enough that tokenizing them on
    # the event loop (the control below) stalls it past 0.5 s on a quiet machine too (720k
    # characters stalled it only 0.41 s on a quiet run; 1.44M stalled 1.05 s, but also
    # slowed health checks off the loop to 0.25 s: result lists and message parsing hold
    # the GIL).
    prompt = " ".join(["the a"] * 180_000)
    def one(_):
        with TandemClient(address) as c:
            try:
                c.generate(target="small", prompt=prompt, raw_prompt=True, max_new_tokens=1, timeout=60)
            except TandemError as exc:
                return exc
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_large_prompts_are_refused_without_stalling_health_checks(server, monkeypatch):
    # 3.8 MB of prompt (under the 4 MB message limit): refused by its size before
    # tokenizing, with the field named
    huge = "x " * 1_900_000
    with TandemClient(server.address) as c:
        t0 = time.perf_counter()
        with pytest.raises(TandemError) as info:
            c.generate(target="small", prompt=huge, raw_prompt=True, max_new_tokens=1, timeout=30)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith("prompt:"), info.value.details
    assert time.perf_counter() - t0 < 2.0
    # prompts under the size limit are tokenized off the event loop: health stays responsive
    monkeypatch.setattr("tandem.services.servicer.MAX_CHARS_PER_TOKEN", 1000)
    # The measure is the time health checks spent stalled (waits over 0.2 s, summed): a
    # blocked loop serializes every prompt's tokenizing in front of them (~0.6 s each here),
    # off the loop it is 0 unless the shared machine hiccups (a CI run once saw one 0.44 s
    # wait off the loop, so a single longest wait is no measure).
    gaps, errors = _health_gaps(server.address, lambda: _big_prompts(server.address, n=5))
    assert all(isinstance(e, TandemError) and e.code == grpc.StatusCode.INVALID_ARGUMENT for e in errors)
    off_loop = _stalled(gaps)
    assert off_loop < 1.0 and gaps[0] < 2.0, f"health checks waited {gaps[:5]} s"
    # negative control: tokenizing on the event loop (an executor that runs inline) stalls it
    servicer = server.app.server.servicer

    class Inline:
        def submit(self, fn, *args, **kwargs):
            from concurrent.futures import Future

            f = Future()
            try:
                f.set_result(fn(*args, **kwargs))
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting handler
                f.set_exception(exc)
            return f

    monkeypatch.setattr(servicer, "_parse_pool", Inline())
    stalled, _ = _health_gaps(server.address, lambda: _big_prompts(server.address, n=5))
    on_loop = _stalled(stalled)
    print(f"health checks stalled {off_loop:.3f} s off the loop, {on_loop:.3f} s on it")
    assert on_loop > 1.0 and on_loop > 3 * off_loop, (stalled[:5], gaps[:5])
