"""`tandem batch` on a local Ray cluster with tiny models: one output record per input
record (malformed ones become error records), and a real process kill midway followed by a
re-run leaves every record in the output exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tandem.deploy.batch import iter_output, run_batch
from tandem.deploy.config import parse_config

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, models: dict) -> dict:
    cfg = {
        "draft_pool": {"model": models["draft"], "dtype": "float32", "quantize": "none", "exits": [2]},
        "targets": [
            {"name": "small", "model": models["small"], "dtype": "float32"},
            {"name": "other", "model": models["other"], "dtype": "float32"},
        ],
        "batch": {"min_actors": 1, "max_actors": 2, "method": "sd"},
    }
    path.write_text(yaml.safe_dump(cfg))
    return cfg


def write_input(path: Path, n_good: int, *, max_new: int = 24) -> tuple[list[str], list[int]]:
    """Good records of every format plus malformed lines; returns (expected keys, bad lines)."""
    lines, keys, bad = [], [], []
    for i in range(n_good):
        kind = i % 4
        if kind == 0:
            rec = {"prompt": f"def x return w{i % 50}", "sampling": {"max_new_tokens": max_new, "ignore_eos": True, "logprobs": 2}}
        elif kind == 1:
            rec = {"id": f"chat-{i}", "messages": [{"role": "user", "content": "print x"}], "target": "other",
                   "sampling": {"max_new_tokens": max_new, "temperature": 1.0, "seed": i, "repetition_penalty": 1.3,
                                "frequency_penalty": 0.5, "min_p": 0.05}}
        elif kind == 2:
            rec = {"question_id": f"q{i}", "category": "coding", "turns": ["def x", "return y"],
                   "sampling": {"max_new_tokens": max_new // 2}}
        else:
            rec = {"prompt": "the a of", "method": "pearl", "sampling": {"max_new_tokens": max_new, "ignore_eos": True}}
        lines.append(json.dumps(rec))
    for bad_line in [
        "{not json",
        json.dumps({"prompt": ""}),
        json.dumps({"prompt": "x", "target": "gpt-17"}),
        json.dumps({"prompt": "x", "sampling": {"temperature": -1}}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps([1, 2, 3]),
        json.dumps({"text": "no prompt field"}),
    ]:
        lines.insert(len(lines) // 2, bad_line)
    path.write_text("\n".join(lines) + "\n\n")
    for line_no, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        rid = rec.get("id", rec.get("question_id")) if isinstance(rec, dict) else None
        keys.append(f"id:{rid}" if rid is not None else f"line:{line_no}")
        if line.startswith("{not") or not isinstance(rec, dict) or rec in (
            {"prompt": ""}, {"prompt": "x", "target": "gpt-17"}, {"prompt": "x", "sampling": {"temperature": -1}},
            {"messages": [{"role": "robot", "content": "x"}]}, {"text": "no prompt field"},
        ):
            bad.append(line_no)
    return keys, bad


def test_every_input_gets_exactly_one_output(ray_local, tiny_service_models, tmp_path):
    cfg_dict = write_config(tmp_path / "cfg.yaml", tiny_service_models)
    keys, bad = write_input(tmp_path / "in.jsonl", 16)
    out = tmp_path / "out.jsonl"
    summary = run_batch(parse_config(cfg_dict), input_path=str(tmp_path / "in.jsonl"), output_path=str(out),
                        min_actors=1, max_actors=2, progress=False)
    records = list(iter_output(out))
    assert Counter(r["key"] for r in records) == Counter(keys)
    errors = {r["line"]: r["error"] for r in records if "error" in r}
    assert sorted(errors) == bad
    assert "JSON" in errors[bad[0]] or any("JSON" in e for e in errors.values())
    assert any("target" in e for e in errors.values()) and any("temperature" in e for e in errors.values())
    good = [r for r in records if "error" not in r]
    assert len(good) == 16 and summary["generated"] == 16 and summary["errors_in_input"] == len(bad)
    for r in good:
        assert r["usage"]["completion_tokens"] >= 1 and "stats" in r and r["finish_reason"] in ("length", "eos", "stop")
        assert ("turns" in r and len(r["turns"]) == 2) or isinstance(r["text"], str)
    with_logprobs = [r for r in good if "logprobs" in r]
    assert len(with_logprobs) == 4  # the records that asked (every 4th), and only those
    for r in with_logprobs:
        assert len(r["logprobs"]) == r["usage"]["completion_tokens"]
        assert all(lp["logprob"] <= 0 and len(lp["top"]) == 2 and lp["top"][0][1] >= lp["logprob"] for lp in r["logprobs"])
    # a second run finds everything done and writes nothing
    again = run_batch(parse_config(cfg_dict), input_path=str(tmp_path / "in.jsonl"), output_path=str(out),
                      min_actors=1, max_actors=1, progress=False)
    assert again["skipped_done"] == len(keys) and again["generated"] == 0
    assert len(list(iter_output(out))) == len(keys)


def test_killed_job_resumes_without_loss_or_repeats(tiny_service_models, tmp_path):
    write_config(tmp_path / "cfg.yaml", tiny_service_models)
    keys, bad = write_input(tmp_path / "in.jsonl", 24, max_new=120)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "tandem.deploy.cli", "batch", "--config", str(tmp_path / "cfg.yaml"),
           "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--min-actors", "1", "--max-actors", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            n = sum(1 for _ in open(out)) if out.exists() else 0
            if n >= len(bad) + 5:
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("the batch job wrote nothing in time")
        os.killpg(proc.pid, signal.SIGKILL)  # a real kill: the driver and its Ray processes
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    partial = [json.loads(l) for l in open(out) if l.strip()]
    assert 0 < len(partial) < len(keys), "the kill should land midway"
    # re-run to completion
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["skipped_done"] >= len(partial) - 1
    records = list(iter_output(out))
    assert Counter(r["key"] for r in records) == Counter(keys)  # every record exactly once


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _submit(dashboard: str, entrypoint: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`ray job submit` (waits for the job and prints its logs), as an operator would run it;
    retried while the head's job agent is still starting."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run([ray_cli, "job", "submit", "--address", dashboard, "--", *entrypoint],
                              env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2.0)


def test_ray_job_submit_runs_a_batch_job_with_ray_address(tiny_service_models, tmp_path):
    """A batch job submitted to a running Ray cluster: its driver gets RAY_ADDRESS and joins
    that cluster (Ray refuses num_cpus/resources from a driver that connects). Control: a
    driver that passes num_cpus on the same cluster fails, so the job would have failed before."""
    write_config(tmp_path / "cfg.yaml", tiny_service_models)
    keys, _ = write_input(tmp_path / "in.jsonl", 4, max_new=8)
    out = tmp_path / "out.jsonl"
    gcs, dash, *agent = (_free_port() for _ in range(6))
    existed_before = Path("/tmp/ray/ray_current_cluster").exists()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray >= 2.5x turns token auth on for clusters it starts; the CLI sends the token
    # (~/.ray/auth_token, made if missing) only when told to
    env.update(HF_HUB_OFFLINE="1", RAY_DEDUP_LOGS="0", PYTHONPATH=str(ROOT), RAY_AUTH_MODE="token")
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # its own temp dir (short: Ray's socket paths live under it), so the address file `ray
    # start` writes (ray_current_cluster) never steers another ray.init on this machine
    temp_dir = tempfile.mkdtemp(prefix="tdm-ray-", dir="/tmp")
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", f"--port={gcs}", f"--temp-dir={temp_dir}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--num-cpus=2", '--resources={"target_pool": 1, "draft_pool": 1}', "--include-dashboard=true",
         "--disable-usage-stats",
         # free ports, not Ray's fixed defaults: another Ray on this machine may hold those
         *(f"--{flag}={port}" for flag, port in zip(
             ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port"),
             agent))],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    dashboard = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([ray_cli, "job", "list", "--address", dashboard], env=env, capture_output=True).returncode:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head's job server did not come up"
            time.sleep(1.0)
        control = _submit(dashboard, [sys.executable, "-c", "import ray; ray.init(num_cpus=2)"], env, 120)
        assert control.returncode != 0 and "num_cpus" in control.stdout + control.stderr
        job = _submit(dashboard, [sys.executable, "-m", "tandem.deploy.cli", "batch", "--config", str(tmp_path / "cfg.yaml"),
                                  "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
                                  "--min-actors", "1", "--max-actors", "1"], env, 300)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-2000:]
        assert "succeeded" in job.stdout.lower()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not Path("/tmp/ray/ray_current_cluster").exists() or existed_before
    records = list(iter_output(out))
    assert Counter(r["key"] for r in records) == Counter(keys)


def test_the_pools_engine_runs_records_through_the_servers_pools_and_router(ray_local, tiny_service_models, tmp_path):
    """--engine pools: every record once, through the server's pools and router with many in
    flight; greedy records give the same text as the in-process engines (the control run),
    and a re-run skips them all."""
    cfg_dict = write_config(tmp_path / "cfg.yaml", tiny_service_models)
    keys, bad = write_input(tmp_path / "in.jsonl", 8)
    runs = {}
    for engine in ("local", "pools"):
        out = tmp_path / f"{engine}.jsonl"
        summary = run_batch(parse_config(cfg_dict), input_path=str(tmp_path / "in.jsonl"), output_path=str(out),
                            min_actors=1, max_actors=1, progress=False, engine=engine)
        records = list(iter_output(out))
        assert Counter(r["key"] for r in records) == Counter(keys), engine
        assert sorted(r["line"] for r in records if "error" in r) == bad, engine
        assert summary["generated"] == 8, (engine, summary)
        runs[engine] = {r["key"]: r for r in records if "error" not in r}
    greedy = [k for k, r in runs["local"].items() if not k.startswith("id:chat-")]  # the chat records sample
    assert len(greedy) == 6
    for k in greedy:
        a, b = runs["local"][k], runs["pools"][k]
        assert a.get("text", a.get("turns")) == b.get("text", b.get("turns")), k
        assert a["usage"] == b["usage"], k
    again = run_batch(parse_config(cfg_dict), input_path=str(tmp_path / "in.jsonl"), output_path=str(tmp_path / "pools.jsonl"),
                      min_actors=1, max_actors=1, progress=False, engine="pools")
    assert again["skipped_done"] == len(keys) and again["generated"] == 0
    with pytest.raises(ValueError, match="engine must be one of local, pools"):
        run_batch(parse_config(cfg_dict), input_path=str(tmp_path / "in.jsonl"), output_path=str(tmp_path / "x.jsonl"),
                  min_actors=1, max_actors=1, progress=False, engine="gpu")
