"""KV admission through a real server (services/admission.py): a target with a small KV
budget runs what fits, queues what does not (first in, first out, within its deadline),
refuses what never could, and the actors hold what admission reserved."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
import ray
from transformers import AutoConfig

from tests.service.conftest import EngineGate, ServerThread, service_config
from tandem.services.client import TandemClient, TandemError
from tandem.speculation.plan import context_reserve

PROMPT_IDS = [5, 6, 7, 8, 9, 10]
BUDGET = 64 * 1024  # bytes: a few hundred positions of the tiny float32 target
# method off plans the target alone as SpecConfig("ar", draft_len=1) (speculation/plan.py)
RESERVE = context_reserve(1)
DRAFT_BUDGET = 48 * 1024  # bytes of the tiny draft's KV per draft actor
SD_LEN = 4  # the draft length of the sd requests below


@pytest.fixture(scope="module")
def srv(ray_local, tiny_service_models):
    cfg = service_config(tiny_service_models, max_concurrent=4, queue_size=4, metrics_port=0)
    cfg["targets"][0]["kv_budget_bytes"] = BUDGET
    cfg["draft_pool"]["kv_budget_bytes"] = DRAFT_BUDGET
    # one thread per actor: the draft and the target then overlap (deploy/serve.py
    # overlap_pays), where an explicit sd request drafts its max_draft_len (SD_LEN), which the
    # reservations below count; in turn the policy would pick a learned length instead
    cfg["draft_pool"]["threads"] = 1
    for t in cfg["targets"]:
        t["threads"] = 1
    s = ServerThread(cfg)
    yield s
    s.stop()


def positions(srv) -> int:
    route = srv.app.router.routes["small"]
    return BUDGET // route.kv_bytes_per_token


def max_new_for(srv, share: float) -> int:
    """max_new_tokens (method off) whose reservation is `share` of the budget."""
    return int(positions(srv) * share) - len(PROMPT_IDS) - RESERVE


class Gate(EngineGate):
    """Holds requests at the engine until opened; counts engine.agenerate calls."""

    def __init__(self, srv, monkeypatch):
        super().__init__(srv.engine, monkeypatch)


def wait_for(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def call(address, max_new, out, key, timeout=120):
    with TandemClient(address) as c:
        try:
            out[key] = c.generate(target="small", prompt_token_ids=PROMPT_IDS, max_new_tokens=max_new,
                                  ignore_eos=True, method="off", timeout=timeout)
        except TandemError as exc:
            out[key] = exc


def scraped(srv, name: str, target: str = "small") -> float:
    port = srv.app.telemetry.metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    (line,) = [ln for ln in body.splitlines() if ln.startswith(name + "{") and f'target="{target}"' in ln]
    return float(line.rsplit(" ", 1)[1])


def test_the_target_reports_its_kv_size_per_position(srv, tiny_service_models):
    cfg = AutoConfig.from_pretrained(tiny_service_models["small"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    route = srv.app.router.routes["small"]
    assert route.kv_bytes_per_token == 2 * cfg.num_hidden_layers * kv_heads * head_dim * 4  # float32 keys + values
    assert route.kv_budget_bytes == BUDGET
    assert scraped(srv, "tandem_kv_budget_bytes") == BUDGET
    other = srv.app.router.routes["other"]  # no budget configured: half the host's free memory
    assert other.kv_budget_bytes > 100 * 2**20


def test_a_request_that_does_not_fit_waits_for_the_one_running_then_runs(srv, monkeypatch):
    gate = Gate(srv, monkeypatch)
    route, admission = srv.app.router.routes["small"], srv.app.router.admission["small"]
    big = max_new_for(srv, 0.6)
    out: dict = {}
    a = threading.Thread(target=call, args=(srv.address, big, out, "a"))
    a.start()
    wait_for(lambda: gate.calls == 1)
    need = (len(PROMPT_IDS) + big + RESERVE) * route.kv_bytes_per_token
    assert admission.kv_reserved == need and scraped(srv, "tandem_kv_reserved_bytes") == need
    b = threading.Thread(target=call, args=(srv.address, big, out, "b"))
    b.start()
    wait_for(lambda: route.waiting == 1)
    time.sleep(0.3)
    assert gate.calls == 1 and route.running == 1  # 2 x 0.6 of the budget: B waits for A
    gate.open.set()
    a.join(120)
    b.join(120)
    for k in "ab":
        assert not isinstance(out[k], Exception), out[k]
        assert len(out[k].token_ids) == big
    assert gate.calls == 2 and admission.kv_reserved == 0 and route.waiting == 0


def test_requests_that_fit_together_run_together(srv, monkeypatch):
    """The control: the same two requests at 0.4 of the budget each both run at once."""
    gate = Gate(srv, monkeypatch)
    route = srv.app.router.routes["small"]
    small = max_new_for(srv, 0.4)
    out: dict = {}
    threads = [threading.Thread(target=call, args=(srv.address, small, out, k)) for k in "ab"]
    for t in threads:
        t.start()
    wait_for(lambda: gate.calls == 2)
    assert route.running == 2 and route.waiting == 0
    gate.open.set()
    for t in threads:
        t.join(120)
    assert all(len(out[k].token_ids) == small for k in "ab"), out


def test_a_waiting_request_whose_deadline_passes_leaves_the_queue(srv, monkeypatch):
    gate = Gate(srv, monkeypatch)
    route = srv.app.router.routes["small"]
    big = max_new_for(srv, 0.6)
    out: dict = {}
    a = threading.Thread(target=call, args=(srv.address, big, out, "a"))
    a.start()
    wait_for(lambda: gate.calls == 1)
    call(srv.address, big, out, "late", timeout=0.5)  # queued behind A, never admitted
    assert isinstance(out["late"], TandemError) and out["late"].code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: route.waiting == 0)
    gate.open.set()
    a.join(120)
    assert gate.calls == 1 and len(out["a"].token_ids) == big


def test_a_request_larger_than_the_budget_is_refused_naming_the_field(srv):
    out: dict = {}
    call(srv.address, max_new_for(srv, 1.0) + 1, out, "x")
    err = out["x"]
    assert isinstance(err, TandemError) and err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details.startswith("sampling.max_new_tokens:") and "KV budget" in err.details, err.details
    call(srv.address, max_new_for(srv, 1.0), out, "fits")  # control: exactly the budget runs
    assert len(out["fits"].token_ids) == max_new_for(srv, 1.0)


def test_the_actor_holds_what_admission_reserved_and_frees_it(srv):
    """The verifier allocates a request's cache at its reservation once: the target actor's
    KV bytes in use equal the reservation while the stream runs, and 0 after."""
    handle = srv.engine.targets["small"].handles()[0]
    route = srv.app.router.routes["small"]
    big = max_new_for(srv, 0.9)
    with TandemClient(srv.address) as c:
        stream = c.generate_stream(target="small", prompt_token_ids=PROMPT_IDS, max_new_tokens=big,
                                   ignore_eos=True, method="off", timeout=120)
        next(stream)
        used = ray.get(handle.info.remote())["kv_bytes_used"]
        stream.cancel()
    assert used == (len(PROMPT_IDS) + big + RESERVE) * route.kv_bytes_per_token
    wait_for(lambda: ray.get(handle.info.remote())["kv_bytes_used"] == 0)


def test_a_spectr_request_reserves_a_cache_for_each_branch(srv, monkeypatch):
    """SpecTr forks the request's cache for each branch every round, on the target and the
    draft (tests/runtime/test_spectr_batch.py counts the copies): its reservation is k times
    that of the same request with sd, on both budgets (the sd request is the control)."""
    from tandem.speculation.plan import SPECTR_BRANCHES

    admission, draft = srv.app.router.admission["small"], srv.app.router.draft_budget
    reserved = {}
    for method in ("sd", "spectr"):
        gate = Gate(srv, monkeypatch)
        out: dict = {}

        def one(method=method):
            with TandemClient(srv.address) as c:
                out[method] = c.generate(target="small", prompt_token_ids=PROMPT_IDS, max_new_tokens=20, ignore_eos=True,
                                         method=method, max_draft_len=SD_LEN, timeout=120)

        t = threading.Thread(target=one)
        t.start()
        wait_for(lambda: gate.calls == 1)
        reserved[method] = (admission.kv_reserved, draft.kv_reserved)
        gate.open.set()
        t.join(120)
        assert out[method].stats["method"] == method
        monkeypatch.undo()
    target_sd, draft_sd = reserved["sd"]
    assert target_sd > 0 and draft_sd > 0
    assert reserved["spectr"] == (SPECTR_BRANCHES * target_sd, SPECTR_BRANCHES * draft_sd)
    assert admission.kv_reserved == 0 and draft.kv_reserved == 0


# ------------------------------------------------------------------ the draft pool's KV budget


def sd_call(address, max_new, out, key):
    with TandemClient(address) as c:
        out[key] = c.generate(target="small", prompt_token_ids=PROMPT_IDS, max_new_tokens=max_new, ignore_eos=True,
                              method="sd", max_draft_len=SD_LEN, timeout=120)


def draft_positions(srv) -> int:
    return DRAFT_BUDGET // srv.app.router.draft_budget.kv_bytes_per_token


def test_a_request_whose_draft_kv_does_not_fit_runs_without_a_draft(srv, monkeypatch):
    """The draft pool serves every target; a speculating request reserves its KV there too.
    Two sd requests at 0.6 of the draft budget each: the first drafts, the second runs with
    speculation off at once (it does not wait: drafting is optional), and both give the
    target's own greedy output."""
    budget = srv.app.router.draft_budget
    assert budget.kv_budget_bytes == DRAFT_BUDGET and scraped(srv, "tandem_kv_budget_bytes", "draft") == DRAFT_BUDGET
    n = int(draft_positions(srv) * 0.6) - len(PROMPT_IDS) - context_reserve(SD_LEN)
    assert (len(PROMPT_IDS) + n + context_reserve(SD_LEN)) * srv.app.router.routes["small"].kv_bytes_per_token < BUDGET / 2
    ref: dict = {}
    call(srv.address, n, ref, "off")
    gate = Gate(srv, monkeypatch)
    out: dict = {}
    a = threading.Thread(target=sd_call, args=(srv.address, n, out, "a"))
    a.start()
    wait_for(lambda: gate.calls == 1)
    need = (len(PROMPT_IDS) + n + context_reserve(SD_LEN)) * budget.kv_bytes_per_token
    assert budget.kv_reserved == need and scraped(srv, "tandem_kv_reserved_bytes", "draft") == need
    b = threading.Thread(target=sd_call, args=(srv.address, n, out, "b"))
    b.start()
    wait_for(lambda: gate.calls == 2)  # b was not held back
    gate.open.set()
    a.join(120)
    b.join(120)
    assert out["a"].stats["method"] == "sd" and out["b"].stats["method"] == "off"
    assert out["a"].token_ids == out["b"].token_ids == ref["off"].token_ids
    assert budget.kv_reserved == 0 and srv.app.router.draftless >= 1


def test_requests_whose_draft_kv_fits_together_both_draft(srv, monkeypatch):
    """The control: the same two sd requests at 0.4 of the draft budget each both draft."""
    n = int(draft_positions(srv) * 0.4) - len(PROMPT_IDS) - context_reserve(SD_LEN)
    gate = Gate(srv, monkeypatch)
    out: dict = {}
    threads = [threading.Thread(target=sd_call, args=(srv.address, n, out, k)) for k in "ab"]
    for t in threads:
        t.start()
    wait_for(lambda: gate.calls == 2)
    gate.open.set()
    for t in threads:
        t.join(120)
    assert [out[k].stats["method"] for k in "ab"] == ["sd", "sd"]


def test_the_draft_actor_holds_what_was_reserved_and_frees_it(srv):
    handle = srv.engine.draft_pool.handles()[0]
    n = int(draft_positions(srv) * 0.9) - len(PROMPT_IDS) - context_reserve(SD_LEN)
    with TandemClient(srv.address) as c:
        stream = c.generate_stream(target="small", prompt_token_ids=PROMPT_IDS, max_new_tokens=n, ignore_eos=True,
                                   method="sd", max_draft_len=SD_LEN, timeout=120)
        next(stream)
        info = ray.get(handle.info.remote())
        stream.cancel()
    assert info["kv_budget_bytes"] == DRAFT_BUDGET
    assert info["kv_bytes_used"] == (len(PROMPT_IDS) + n + context_reserve(SD_LEN)) * info["kv_bytes_per_token"]
    wait_for(lambda: ray.get(handle.info.remote())["kv_bytes_used"] == 0)
