"""`tandem serve` as a user runs it (a subprocess with a config file): SIGTERM ends it, and
every process its embedded Ray started ends with it (no raylet, GCS, worker or agent left
behind)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml


def test_sigterm_leaves_no_ray_process_behind(tiny_service_models, tmp_path):
    cfg = {
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None},
        "ray": {"num_cpus": 1},
        "draft_pool": {"model": tiny_service_models["draft"], "dtype": "float32", "quantize": "none", "exit_adapters": None},
        "targets": [{"name": "small", "model": tiny_service_models["small"], "dtype": "float32"}],
    }
    path = tmp_path / "tandem.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem.deploy.cli", "serve", "--config", str(path)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "serving tandem.v1.Tandem" in line:
                break
        assert any("serving tandem.v1.Tandem" in ln for ln in lines), "".join(lines)
        spawned = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in spawned if p.is_running())
        assert "raylet" in names and "gcs_server" in names  # the check below has something to find
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        rest = proc.stderr.read()
        assert proc.returncode == 0, "".join(lines) + rest
        _, alive = psutil.wait_procs(spawned, timeout=2.0)
        assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
