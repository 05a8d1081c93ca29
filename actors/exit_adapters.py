"""Trained early exits for a multi-exit draft: small adapters in front of the shared head.

Glossary
- draft: one causal LM whose first k layers plus the shared final norm and LM head form a
  draft at every exit k (S2D sorted drafting, arXiv 2407.01955).
- exit: a depth k (decoder layers) where logits are read off. Untrained, the hidden state
  after k of 24 layers is not what the shared head expects, so shallow exits draft badly.
- exit adapter: a small residual module per exit, applied to the raw hidden state at depth k
  *before* the shared final norm and LM head (`ModelRunner(exit_adapters={k: adapter})`).
  Deeper layers always continue from the raw hidden state, so adapters never change what a
  deeper exit computes. The base weights are frozen; only adapters are trained (SoFT-style
  exit training: "Sorted fine-tuning", Kavehzadeh et al., arXiv 2309.08968, trains every
  exit of one model with a loss averaged over exits; here only per-exit adapters learn).
- head ids: an optional frequent-token subset S of the vocabulary. A runner built with
  `head_ids=S` computes logits only on S; q is then a distribution on S, which is exact for
  speculative sampling (the verifier only needs q(x) for the proposed x and q on the support
  it sampled from).

The adapter, per exit (h: [n, hidden] raw hidden state at the exit):

    h' = s * h + U silu(D rmsnorm_w(h))      s: [hidden] (init 1), D: [rank, hidden],
                                              U: [hidden, rank] (init 0), w: [hidden] (init 1)

so a fresh adapter is exactly the identity (an untrained exit). activation "none" gives a
plain low-rank residual. With linear=True (the default of `tandem train-exits`) the
elementwise scale becomes a full-rank linear map of the unit-RMS hidden state:

    h' = M unit(h) + b + U silu(D (w * unit(h)))      M: [hidden, hidden] (init I), b: [hidden]

(the shared final norm is scale-invariant, so this is still the identity when fresh). The
trainer starts M, b at the least-squares map from unit(h_k) to the full model's unit(h_L)
("linear shortcut", Din et al., arXiv 2303.09435), which alone recovers most of what
gradient training of the residual reaches, then trains everything on the KL. Files in an
adapter folder:

    exit_adapters.json           manifest: format, draft identity, exits, rank, activation,
                                 head ids file (if any), training summary
    exit_adapters.safetensors    exit{k}.scale (or exit{k}.mix, exit{k}.bias when linear),
                                 exit{k}.norm, exit{k}.down, exit{k}.up
    head_ids.safetensors         optional: "head_ids" int64 [S], sorted token ids
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "tandem-exit-adapters"
FORMAT_VERSION = 2  # 2: optional full-rank linear part (manifest "linear"); 1 reads as linear=False
MANIFEST = "exit_adapters.json"
WEIGHTS = "exit_adapters.safetensors"
HEAD_IDS = "head_ids.safetensors"
ACTIVATIONS = ("silu", "none")


class ExitAdapter(nn.Module):
    """h -> s * h + U act(D rmsnorm_w(h)), or with linear=True h -> M unit(h) + b + U act(D
    rmsnorm_w(h)); the identity at initialisation (U = 0; s = 1 or M = I, b = 0).

    Computes its norm statistics in float32 and everything else in the parameters' dtype;
    the output has the input's dtype, so it drops into a bf16 runner unchanged."""

    def __init__(self, hidden_size: int, rank: int, *, activation: str = "silu", eps: float = 1e-6, linear: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.hidden_size = hidden_size
        self.rank = rank
        self.activation = activation
        self.eps = eps
        self.linear = bool(linear)
        if self.linear:
            self.mix = nn.Parameter(torch.eye(hidden_size))  # [hidden, hidden]: output x input
            self.bias = nn.Parameter(torch.zeros(hidden_size))  # [hidden]
        else:
            self.scale = nn.Parameter(torch.ones(hidden_size))  # [hidden]
        self.norm = nn.Parameter(torch.ones(hidden_size))  # [hidden]
        self.down = nn.Parameter(torch.randn(rank, hidden_size) / hidden_size**0.5)  # [rank, hidden]
        self.up = nn.Parameter(torch.zeros(hidden_size, rank))  # [hidden, rank]: zero = identity

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: [..., hidden]
        x32 = h.float()
        unit = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(self.down.dtype)  # fp32 statistics
        a = F.linear(unit * self.norm, self.down)  # [..., rank]
        if self.activation == "silu":
            a = F.silu(a)
        if self.linear:
            base = F.linear(unit, self.mix, self.bias)  # [..., hidden]
        else:
            base = h.to(self.down.dtype) * self.scale  # residual: exit keeps h's content
        return (base + F.linear(a, self.up)).to(h.dtype)

    def state_for_save(self, depth: int) -> dict[str, torch.Tensor]:
        return {f"exit{depth}.{name}": p.detach().float().contiguous() for name, p in self.named_parameters()}


@dataclass(frozen=True)
class DraftIdentity:
    """Which draft an adapter folder belongs to. The fingerprint hashes the bf16 bytes of the
    final norm and the first embedding rows: equal for the same weights whatever dtype or
    weight quantization the runner uses (neither touches those tensors' bf16 values)."""

    ref: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def draft_fingerprint(embed: torch.Tensor, final_norm: torch.Tensor) -> str:
    """embed: [vocab, hidden]; final_norm: [hidden] (any float dtype)."""
    h = hashlib.sha256()
    for t in (final_norm.detach().reshape(-1), embed.detach()[:64].reshape(-1)):
        h.update(t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def identity_of_hf_model(model, ref: str) -> DraftIdentity:
    """DraftIdentity of a transformers causal LM (llama family)."""
    cfg = model.config
    return DraftIdentity(
        ref=str(ref),
        model_type=str(cfg.model_type),
        num_layers=int(cfg.num_hidden_layers),
        hidden_size=int(cfg.hidden_size),
        vocab_size=int(cfg.vocab_size),
        fingerprint=draft_fingerprint(model.model.embed_tokens.weight, model.model.norm.weight),
    )


def identity_of_runner(runner) -> DraftIdentity:
    """DraftIdentity of an actors.runner.ModelRunner."""
    return DraftIdentity(
        ref=str(runner.model_path),
        model_type=str(runner.config.model_type),
        num_layers=int(runner.num_layers),
        hidden_size=int(runner.hidden_size),
        vocab_size=int(runner.vocab_size),
        fingerprint=draft_fingerprint(runner.embed, runner.final_norm),
    )


# ----------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_exit_adapters(
    folder: str | os.PathLike,
    adapters: dict[int, ExitAdapter],
    *,
    draft: DraftIdentity,
    head_ids: Sequence[int] | torch.Tensor | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the adapter folder (each file atomically; the manifest last, so a folder with a
    manifest is complete). Returns the folder."""
    from safetensors.torch import save as st_save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not adapters:
        raise ValueError("adapters: at least one exit is needed")
    exits = sorted(int(k) for k in adapters)
    first = adapters[exits[0]]
    tensors: dict[str, torch.Tensor] = {}
    for depth in exits:
        ad = adapters[depth]
        if not 1 <= depth < draft.num_layers:
            raise ValueError(f"exit {depth} must be within 1..{draft.num_layers - 1}")
        if (ad.rank, ad.activation, ad.linear) != (first.rank, first.activation, first.linear) or ad.hidden_size != draft.hidden_size:
            raise ValueError("every exit adapter must share rank, activation, linear and the draft's hidden size")
        tensors.update(ad.state_for_save(depth))
    _atomic_write_bytes(folder / WEIGHTS, st_save(tensors))
    head_file = None
    if head_ids is not None:
        ids = torch.as_tensor(sorted({int(i) for i in torch.as_tensor(head_ids).tolist()}), dtype=torch.int64)
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= draft.vocab_size:
            raise ValueError("head_ids must be token ids within the draft's vocabulary")
        _atomic_write_bytes(folder / HEAD_IDS, st_save({"head_ids": ids}))
        head_file = HEAD_IDS
    elif (folder / HEAD_IDS).exists():
        (folder / HEAD_IDS).unlink()
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "draft": draft.to_dict(),
        "exits": exits,
        "rank": first.rank,
        "activation": first.activation,
        "linear": first.linear,
        "eps": first.eps,
        "weights": WEIGHTS,
        "head_ids_file": head_file,
        "head_size": None if head_ids is None else int(len(set(torch.as_tensor(head_ids).tolist()))),
        **(extra or {}),
    }
    _atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
    return folder


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"exit adapters: no {MANIFEST} in {folder}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"exit adapters: {path} is not a {FORMAT} manifest")
    if int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"exit adapters: {path} has version {manifest['version']}, this tandem reads <= {FORMAT_VERSION}")
    return manifest


def load_exit_adapters(
    folder: str | os.PathLike, dtype: str | torch.dtype = torch.bfloat16
) -> tuple[dict[int, ExitAdapter], tuple[int, ...], torch.Tensor | None]:
    """Load an adapter folder for inference.

    Returns (adapters {depth: module in `dtype`, eval, no grad}, exits (sorted depths),
    head_ids (int64 [S]) or None). Hand them to ModelRunner:
    `ModelRunner(path, exits=exits, head_ids=head_ids, exit_adapters=adapters, ...)`, then
    `check_runner_matches(folder, runner)`."""
    from safetensors.torch import load_file

    if isinstance(dtype, str):
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    folder = Path(folder)
    manifest = read_manifest(folder)
    tensors = load_file(str(folder / manifest.get("weights", WEIGHTS)))
    hidden = int(manifest["draft"]["hidden_size"])
    adapters: dict[int, ExitAdapter] = {}
    for depth in manifest["exits"]:
        depth = int(depth)
        with torch.device("cpu"):  # the file's tensors are on the CPU; the runner moves the module to its device
            ad = ExitAdapter(hidden, int(manifest["rank"]), activation=manifest["activation"], eps=float(manifest["eps"]),
                             linear=bool(manifest.get("linear", False)))
        state = {name: tensors[f"exit{depth}.{name}"] for name, _ in ad.named_parameters()}
        ad.load_state_dict(state)
        ad.to(dtype).eval().requires_grad_(False)
        adapters[depth] = ad
    head_ids = None
    if manifest.get("head_ids_file"):
        head_ids = load_file(str(folder / manifest["head_ids_file"]))["head_ids"].to(torch.int64)
    return adapters, tuple(sorted(adapters)), head_ids


def check_runner_matches(folder: str | os.PathLike, runner) -> None:
    """Raise ValueError when the adapters were trained for another draft than `runner`'s."""
    expected = read_manifest(folder)["draft"]
    got = identity_of_runner(runner).to_dict()
    for key in ("model_type", "num_layers", "hidden_size", "vocab_size", "fingerprint"):
        if str(expected.get(key)) != str(got[key]):
            raise ValueError(
                f"exit adapters in {folder} were trained for draft {expected.get('ref')!r} "
                f"({key}={expected.get(key)!r}), but the runner's draft has {key}={got[key]!r}"
            )


def suggest_thresholds(calibration: dict[str, list[dict[str, float]]], exits: Sequence[int], *, min_agree: float) -> tuple[float, ...]:
    """S2D thresholds for `exits` (the last always emits) from a manifest's calibration
    table (training.calibration): per exit, the lowest threshold whose emitted tokens agree
    with the full draft at least `min_agree` of the time (1.0 when none does: the exit never
    emits early). A large target wants min_agree near 1; a target that is the draft itself
    can take less, since its verification costs little more than the draft."""
    out = []
    for e in exits[:-1]:
        rows = sorted(calibration.get(str(e), []), key=lambda r: r["threshold"])
        ok = [r["threshold"] for r in rows if r["emit_share"] > 0 and r["agree"] >= min_agree]
        out.append(float(ok[0]) if ok else 1.0)
    return tuple(out)


__all__ = [
    "DraftIdentity",
    "ExitAdapter",
    "check_runner_matches",
    "draft_fingerprint",
    "identity_of_hf_model",
    "identity_of_runner",
    "load_exit_adapters",
    "read_manifest",
    "save_exit_adapters",
    "suggest_thresholds",
]
