"""Where a runner's tensors live: picking the torch device for a runner or an actor, and the
per-thread default device that the device-discipline test mode relies on.

Device choice (`resolve_device`): "auto" is the first GPU this process may use - on a Ray
actor, Ray hands the actor its accelerator ids and sets CUDA_VISIBLE_DEVICES, so that GPU is
cuda:0 - else the CPU. "cpu", "cuda" and "cuda:N" pin it; a CUDA device asked for where none
is visible is refused with a clear error rather than silently run on the CPU.

Device discipline: every tensor a runner, drafter or verifier makes is created on the
runner's device (weights, KV caches, rotary tables, masks, token ids, sampling randomness);
only token ids, small stats and sparse q (numpy) leave it. To catch a forgotten `device=`
on a CPU-only machine, tests set torch's default device to "meta" while the runner is told
"cpu": a tensor made without a device is then a meta tensor and mixing it with the runner's
tensors raises. torch keeps the default device per thread, so the worker threads a runtime
starts take the default device of the thread that built them (`thread_initializer`), and a
Ray worker process takes it from TANDEM_TORCH_DEFAULT_DEVICE (`apply_default_device_env`,
a test and debugging knob; unset in production).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")  # "cuda:N" is accepted too
DEFAULT_DEVICE_ENV = "TANDEM_TORCH_DEFAULT_DEVICE"


def cuda_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def check_device_spec(spec: str, *, field: str = "device") -> str:
    """Validate a device spelling without looking for the device (the process that checks a
    config may have no GPU while the actor that runs it will)."""
    value = str(spec).strip().lower()
    if value in DEVICE_CHOICES or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError(f"{field} must be auto, cpu, cuda or cuda:N, got {spec!r}")


def resolve_device(spec: str | torch.device | None = "auto", *, field: str = "device") -> torch.device:
    """The torch device for `spec` ("auto", "cpu", "cuda", "cuda:N" or a torch.device)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = check_device_spec(spec or "auto", field=field)
    if spec == "auto":
        return torch.device("cuda", 0) if cuda_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cpu":
        return torch.device("cpu")
    if not cuda_available():
        raise ValueError(f"{field} is {spec!r} but this process sees no CUDA device (CUDA_VISIBLE_DEVICES, Ray num_gpus)")
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"{field} is {spec!r} but this process sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def thread_initializer(threads: int | None = None) -> Callable[[], None]:
    """An initializer for worker threads started by the calling thread: the torch thread
    count (OpenMP keeps it per thread) and the caller's default device (torch keeps that per
    thread too; see the module docstring)."""
    default = torch.get_default_device()

    def init() -> None:
        if threads:
            torch.set_num_threads(threads)
        if torch.get_default_device() != default:
            torch.set_default_device(default)

    return init


def apply_default_device_env() -> torch.device:
    """In a Ray worker, for the calling thread: take the default device from
    TANDEM_TORCH_DEFAULT_DEVICE when set (the device-discipline test mode sets "meta");
    returns the thread's default device. Actors call it where their model work starts
    (their __init__, whose worker threads inherit it; a pipeline stage's forward, which
    Ray runs on its own threads)."""
    value = os.environ.get(DEFAULT_DEVICE_ENV)
    if value and torch.get_default_device() != torch.device(value):
        torch.set_default_device(value)
    return torch.get_default_device()


def available_threads() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def use_threads(threads: int | None) -> int:
    """An actor's torch threads for its calling thread: `threads`, or with None every core
    this process may use on its node (the config's default); returns the count."""
    n = int(threads or available_threads())
    torch.set_num_threads(n)
    return n


def node_placement() -> dict:
    """Where this process runs: its Ray node ("node_id", None outside Ray) and the cores it may
    use there ("node_cpus"), for the router's choice whether drafting and verification overlap
    (deploy/serve.py overlap_pays)."""
    node_id = None
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - informational only
        pass
    return {"node_id": node_id, "node_cpus": available_threads()}


def assigned_resources() -> dict:
    """Ray resources this actor holds (empty outside Ray): its GPUs among them."""
    try:
        import ray

        if ray.is_initialized():
            return dict(ray.get_runtime_context().get_assigned_resources())
    except Exception:  # noqa: BLE001 - informational only
        pass
    return {}


# Share of a device's free memory (measured once the weights are loaded) that an actor takes
# as its KV budget when none is configured: the rest is left to activations, the allocator's
# slack and, on a CPU host, the other actors and processes that share it.
KV_BUDGET_FRACTION = 0.5


def default_kv_budget(device: torch.device) -> int:
    """Bytes of KV cache an actor on `device` may hold by default: KV_BUDGET_FRACTION of the
    GPU's free memory, or of the host's available memory on a CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
    return int(free * KV_BUDGET_FRACTION)


_LIBC: object | None = None


def return_freed_host_memory() -> bool:
    """Hand the host memory of freed KV caches back to the OS (glibc's malloc_trim). Actors
    call it when a request closes. glibc raises its mmap threshold each time a large block
    is freed, after which blocks of a KV cache's size come from its heap arenas and stay
    there once freed: measured (bench/pressure_check.py, 64 long requests, a 40 MiB KV
    budget) a target actor peaked 156 MiB over its idle memory without it. A fixed mmap
    threshold (mallopt) held it too but made 128-row prefill chunks up to ~10% slower (their
    temporaries mapped and faulted every forward); a trim per closed request costs 4-6 ms
    (measured in a process holding the 0.5B pack), on the closing call's thread, with the
    GIL released. False where there is no glibc (nothing to do)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True
