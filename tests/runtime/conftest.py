"""Runtime tests run on every device this machine has: "cpu" always, "cuda" when a GPU is
visible (skipped cleanly without one).

Device discipline (issue 10): on "cpu", each test - and each module fixture that builds a
runner or an engine - runs with torch's default device set to "meta" while the runner is
told "cpu". A tensor the runtime makes without an explicit device is then a meta tensor, and
using it with the runner's CPU tensors raises (or yields no data), so a forgotten `device=`
fails these tests here instead of on a GPU. torch keeps the default device per thread; the
runtime's worker threads take their creator's (actors/devices.py), which is what carries the
mode into LocalEngine's draft and target threads. Test code that makes its own reference
tensors says device="cpu" (or runs under `on_cpu()`).
"""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import contextmanager

import pytest
import torch

RUNNER_DEVICES = ["cpu", "cuda"]


@pytest.fixture(scope="session", params=RUNNER_DEVICES)
def runner_device(request) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    return request.param


@contextmanager
def device_discipline(device: str):
    """Default device "meta" while a CPU runner works (see the module docstring); nothing
    changes for a CUDA runner (a stray CPU tensor mixed with CUDA ones raises by itself)."""
    if device != "cpu":
        yield
        return
    before = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(before)


@contextmanager
def on_cpu():
    """Reference computations of the tests themselves, outside the discipline."""
    with torch.device("cpu"):
        yield


def ggml_bf16_runner(tmp_path, monkeypatch, runner_device: str, hidden: int = 64):
    """A tiny random 2-layer model (vocab 256) on ggml's int4 kernels in bf16 with the fused
    C++ ops and their attention; skips where those are not (a GPU, the extension not built)."""
    from tandem.actors import ggml_kernel
    from tandem.actors.runner import ModelRunner
    from tandem.bench.tiny_models import make_tiny_model

    if runner_device != "cpu":
        pytest.skip("ggml's kernels and the fused ops are the CPU's")
    if ggml_kernel.load() is None or not hasattr(ggml_kernel.load(), "attend"):
        pytest.skip(f"ggml kernels: {ggml_kernel.build_status()[1]}")
    monkeypatch.setenv(ggml_kernel.ENV_SWITCH, "on")
    with on_cpu():
        path = make_tiny_model(tmp_path / "m", seed=5, hidden=hidden, layers=2, vocab=256)
    runner = ModelRunner(str(path), dtype="bfloat16", quantize="int4", device="cpu")
    assert runner.kernel == "int4-ggml" and runner.ops.name == "fused"
    return runner


@pytest.fixture(autouse=True)
def _device_discipline(runner_device):
    with device_discipline(runner_device):
        yield


@pytest.fixture(scope="session")
def discipline():
    """device_discipline, for module fixtures that build runners and engines."""
    return device_discipline


def count_forwards(runner) -> list[int]:
    """Counts a runner's forwards from here on ([count], updated in place): first passes
    (forward_to_depth, which extend_batch goes through) and exit continuations."""
    calls = [0]
    for name in ("forward_to_depth", "continue_batch"):
        inner = getattr(runner, name)

        def counted(*a, _inner=inner, **k):
            calls[0] += 1
            return _inner(*a, **k)

        setattr(runner, name, counted)
    return calls


class Inline:
    """A side whose calls run at once in the caller's thread (a done Future): the loop of
    actors/speculative.py drives a real Verifier or Drafter with no thread between."""

    def __init__(self, obj):
        self.obj = obj

    def call(self, method: str, /, *args, **kwargs) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(getattr(self.obj, method)(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - handed to the loop like a real side's
            fut.set_exception(exc)
        return fut
