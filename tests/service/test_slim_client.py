"""`pip install tandem` is the client alone: built as a user gets it (a wheel of this
checkout), installed into a fresh venv with no torch and no Ray, it streams from a running
server and reports the same tokens as the full install. `tandem serve` there fails with a
message that names the extra to install.

The fresh venv's pip reaches the package index this machine has (as `make setup` does).
"""

from __future__ import annotations

import email
import json
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tandem.services.client import TandemClient

REPO = Path(__file__).resolve().parents[2]
CLIENT_DEPS = {"grpcio", "grpcio-status", "grpcio-health-checking", "protobuf"}
PROMPT = "def x return y"

STREAM = """
import json, sys
from tandem.services.client import TandemClient
with TandemClient(sys.argv[1]) as c:
    chunks = list(c.generate_stream(target="small", prompt=sys.argv[2], max_new_tokens=12, ignore_eos=True, method="sd"))
print(json.dumps({"ids": [t for ch in chunks for t in ch.token_ids], "chunks": len(chunks),
                  "finish": chunks[-1].finish_reason}))
"""


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def slim(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, a fresh venv with only that wheel and its declared dependencies)."""
    root = tmp_path_factory.mktemp("slim")
    # a copy of the checkout's files (tracked and new, not ignored): the build writes its
    # build/ folder there, not into the repo, and no stale build output leaks into the wheel
    src = root / "src"
    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO)
    if listed.returncode == 0:
        for name in listed.stdout.split():
            if (REPO / name).is_file():
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, src / name)
    else:  # not a git checkout: the tree without what set-up and builds add
        shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__"))
    built = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "wheel", src])
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (root / "wheel").glob("tandem-*.whl")
    venv.create(root / "venv", with_pip=True, system_site_packages=False)
    py = root / "venv" / "bin" / "python"
    done = run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel])
    assert done.returncode == 0, done.stderr[-2000:]
    return wheel, py


def test_the_wheel_requires_only_the_client_stack(slim):
    wheel, _ = slim
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = email.message_from_bytes(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    required = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    plain = {r.name for r in required if r.marker is None}
    assert plain == CLIENT_DEPS, plain
    server = {r.name for r in required if r.marker is not None and r.marker.evaluate({"extra": "server"})}
    assert {"torch", "ray", "transformers"} <= server
    # the stubs and the .proto travel with the client; one namespace, no top-level `actors` etc.
    assert {"tandem/v1/tandem.proto", "tandem/v1/tandem_pb2.py", "tandem/v1/tandem_pb2_grpc.py", "tandem/services/client.py"} <= names
    assert {n.split("/")[0] for n in names} == {"tandem", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}


def test_fresh_venv_has_no_torch_and_no_ray(slim):
    _, py = slim
    for heavy in ("torch", "ray", "transformers"):
        probe = run([py, "-c", f"import {heavy}"])
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, heavy
    # control: the same probe finds the client there
    assert run([py, "-c", "import tandem.services.client, tandem.v1.tandem_pb2"]).returncode == 0


def test_slim_client_streams_the_same_tokens(slim, server):
    _, py = slim
    out = run([py, "-c", STREAM, server.address, PROMPT])
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    with TandemClient(server.address) as c:
        ref = c.generate(target="small", prompt=PROMPT, max_new_tokens=12, ignore_eos=True, method="off")
    assert got["finish"] == "length" and got["chunks"] >= 2
    assert got["ids"] == ref.token_ids  # greedy: sd over the wire equals target-only


def test_slim_cli_talks_to_a_server_and_names_the_extra_for_serving(slim, server):
    _, py = slim
    tandem = py.parent / "tandem"
    models = run([tandem, "models", "--server", server.address])
    assert models.returncode == 0, models.stderr[-2000:]
    assert "small" in models.stdout and "other" in models.stdout
    serve = run([tandem, "serve"])
    assert serve.returncode == 2
    assert "tandem[server]" in serve.stderr and "Traceback" not in serve.stderr, serve.stderr[-2000:]
