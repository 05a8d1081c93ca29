"""Device choice (actors/devices.py), the per-device kernel choice (actors/kernels.py) and
the config's `device` fields: clear errors naming the field, never a silent CPU fallback
when a GPU was asked for."""

from __future__ import annotations

import pytest
import torch

from tandem.actors.devices import check_device_spec, resolve_device, thread_initializer
from tandem.actors.kernels import linear_kernel
from tandem.deploy.config import TandemConfig, parse_config


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device(None).type == want
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_naming_the_field():
    for spec in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(ValueError, match="draft_pool.device.*no CUDA device"):
            resolve_device(spec, field="draft_pool.device")


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "gpu", "", "meta", "cuda:-1"])
def test_bad_spellings_are_refused(spec):
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        check_device_spec(spec)


def test_config_validates_device_per_pool():
    cfg = parse_config({"draft_pool": {"device": "cpu"}, "targets": [{"name": "t", "device": "cuda:1"}]})
    assert cfg.draft_pool.device == "cpu" and cfg.targets[0].device == "cuda:1"  # checked on the actor
    assert TandemConfig().draft_pool.device == "auto"
    with pytest.raises(ValueError, match=r"targets\.0\.device"):
        parse_config({"targets": [{"name": "t", "device": "tpu"}]})


def test_kernel_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [linear_kernel(cpu, q) for q in (None, "none", "int8", "int4")] == ["dense", "dense", "int8", "int4"]
    assert [linear_kernel(cuda, q) for q in (None, "int8", "int4")] == ["dense"] * 3
    with pytest.raises(ValueError, match="quantize"):
        linear_kernel(cpu, "int3")


def test_threads_take_their_creators_default_device():
    import threading

    before = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        init = thread_initializer(1)
    finally:
        torch.set_default_device(before)
    seen: list = []

    def run():
        init()
        seen.append(torch.zeros(1).device.type)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == ["meta"]
