"""`tandem generate --local` goes through the server's own request validation, planner and
router on an in-process engine (actors/local.py InProcessEngine, deploy/local.py): for the
same request it gives the server's tokens, stops where the server stops, and refuses what
the server refuses with the same message, naming the same field."""

from __future__ import annotations

import contextlib
import io
import json

import grpc
import pytest

from tandem.deploy.cli import main as cli
from tandem.services.client import TandemClient, TandemError

PROMPT = "the a of to and in is"


def local(models: dict, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    argv = ["generate", "--local", "--target", models["small"], "--draft", models["draft"], "--exits", "2", "--dtype", "float32",
            "--draft-quantize", "none", "--target-quantize", "none", "--threads", "1", "--json", "--prompt", PROMPT, *args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("method", ["off", "sd", "pearl", "auto"])
def test_local_gives_the_servers_greedy_tokens(server, tiny_service_models, method):
    with TandemClient(server.address) as c:
        remote = c.generate(target="small", prompt=PROMPT, method=method, max_new_tokens=12, ignore_eos=True)
    code, out, err = local(tiny_service_models, "--method", method, "--max-new-tokens", "12", "--ignore-eos")
    assert code == 0, err
    got = json.loads(out)
    assert got["text"] == remote.text and got["completion_tokens"] == 12
    assert got["finish_reason"] == remote.finish_reason == "length"
    assert got["method"] in ("off", "sd", "pearl")  # what the planner chose (auto resolved)
    if method != "auto":
        assert got["method"] == method


def test_local_stops_where_the_server_stops(server, tiny_service_models):
    with TandemClient(server.address) as c:
        full = c.generate(target="small", prompt=PROMPT, method="sd", max_new_tokens=12, ignore_eos=True).text
    words = full.split()
    assert len(words) >= 4
    stop = words[3]
    with TandemClient(server.address) as c:
        remote = c.generate(target="small", prompt=PROMPT, method="sd", max_new_tokens=12, ignore_eos=True, stop=[stop])
    code, out, err = local(tiny_service_models, "--method", "sd", "--max-new-tokens", "12", "--ignore-eos", "--stop", stop)
    assert code == 0, err
    got = json.loads(out)
    assert remote.finish_reason == "stop" and stop not in remote.text
    assert got["finish_reason"] == "stop" and got["text"] == remote.text


@pytest.mark.parametrize(
    "args, kwargs",
    [
        (["--max-new-tokens", "100000"], {"max_new_tokens": 100000}),  # the server's check
        (["--stop", ""], {"stop": [""]}),  # the server's check
        (["--top-p", "1.5"], {"top_p": 1.5}),  # the request builder's (client side)
    ],
)
def test_local_refuses_what_the_server_refuses_in_the_same_words(server, tiny_service_models, args, kwargs):
    with TandemClient(server.address, retries=0) as c:
        try:
            c.generate(target="small", prompt=PROMPT, **kwargs)
            pytest.fail(f"the server accepted {kwargs}")
        except TandemError as exc:
            assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
            expected = exc.details
        except ValueError as exc:
            expected = str(exc)
    code, out, err = local(tiny_service_models, *args)
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1] == f"tandem generate: error: {expected}"
