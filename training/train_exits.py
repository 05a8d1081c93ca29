"""`tandem train-exits`: train the early exits of a draft model (SoFT-style exit training).

Why one module of ~850 lines: it is one pipeline, read top to bottom (config, teacher and
loss, ridge init, validation, checkpoints, the loop, the Ray fan-out, the command); its
training text lives apart (training/data.py), and serving never imports either
(tests/unit/test_layers.py).

Glossary
- draft: the multi-exit model whose first k layers plus the shared final norm and LM head
  draft at exit k (S2D, arXiv 2407.01955). Its weights stay frozen here.
- teacher: the same draft at full depth; its next-token distribution p is what every exit
  learns to predict (self-distillation, as in sorted fine-tuning, arXiv 2309.08968).
- exit adapter: per exit, a small module in front of the shared final norm and head
  (actors/exit_adapters.py): a full-rank linear map of the unit-RMS hidden state plus a
  low-rank residual MLP; the only trainable part.
- linear init ("linear shortcut", Din et al., arXiv 2303.09435): before any gradient step,
  the linear part is set to the ridge-regression map from unit(h_k) to the full model's
  unit(h_L) over `--ridge-tokens` training tokens (teacher forwards only, no backward: a
  minute here). Measured on the 0.5B draft: top-1 agreement with the full draft 0.3-2% bare,
  29-38% from this init alone (32k tokens), before training starts.
- head subset S: the `--head-vocab` most useful token ids (by frequency in the training
  text, then by id, plus every special token). Training and the trained draft compute logits
  on S only: q is a distribution on S, exact for speculative sampling, and the head costs
  |S| / vocab of the full one. `--head-vocab 0` keeps the whole vocabulary.
- step: one teacher forward over a batch of packed sequences, followed by `--reuse`
  optimizer updates of the adapters on that batch. On the 0.5B draft with a 49k-token head
  the exits' head forward and backward cost ~8x the teacher forward, so the default is 1.

Loss per exit k, on every position of the batch (p: teacher on S, q_k: exit k on S):

    L_k = KL(p || q_k) + ce_weight * CE(next token, q_k)      (temperature 1)

averaged over the exits (sorted fine-tuning averages over all exits). The teacher's
distribution restricted to S is renormalised on S: that is the best q on S can do.

Training text (exists on every machine; training/data.py): the Python standard library's
source on disk (raw files, plus chat-formatted "write this function" samples built from
functions with docstrings, plus pydoc topics as prose), and the repository's evaluation
prompts, bench/eval/*_dev.jsonl (deploy.paths.EVAL_DIR), as user turns. A stable hash of each
document's key puts `--val-fraction` of them in the validation split.

Checkpoints (every `--checkpoint-every` steps, atomic: temp file + rename) hold the
adapters, the optimizer, the step, the data position, the RNG state and the elapsed time;
`--resume` (the default) continues from one. The adapter folder is rewritten at every
checkpoint, so a killed run still leaves usable exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from tandem.actors.exit_adapters import ExitAdapter, identity_of_hf_model, save_exit_adapters
from tandem.deploy.paths import EVAL_DIR
from tandem.training.data import (
    Doc,
    DocRenderer,
    StreamState,
    TokenStream,
    choose_head_ids,
    collect_documents,
    count_token_frequencies,
    special_token_ids,
    split_documents,
)

DEFAULT_PROMPTS = str(EVAL_DIR / "*_dev.jsonl")
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    draft: str  # pack name, folder or hub id, as given
    draft_path: str  # resolved from_pretrained argument
    exits: tuple[int, ...]
    out: str
    steps: int = 1000
    minutes: float | None = None
    seq_len: int = 256
    batch: int = 4
    reuse: int = 1
    rank: int = 128
    activation: str = "silu"
    linear: bool = True
    ridge_tokens: int = 32768
    ridge_lambda: float = 1e-3
    lr: float = 2e-3
    warmup: int = 10
    ce_weight: float = 0.2
    seed: int = 0
    resume: bool = True
    val_fraction: float = 0.03
    val_tokens: int = 4096
    head_vocab: int = 49152
    head_freq_share: float = 0.75
    count_chars: int = 16_000_000
    chat_fraction: float = 0.4
    checkpoint_every: int = 20
    dtype: str = "bfloat16"
    threads: int | None = None
    compile: str = "auto"
    stdlib: str | None = None
    prompts: str = DEFAULT_PROMPTS
    max_doc_tokens: int = 2048
    progress: bool = True

    def identity_key(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed (the rest may change)."""
        return {
            "exits": list(self.exits),
            "seq_len": self.seq_len,
            "batch": self.batch,
            "rank": self.rank,
            "activation": self.activation,
            "linear": self.linear,
            "ridge_tokens": self.ridge_tokens,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "head_vocab": self.head_vocab,
            "chat_fraction": self.chat_fraction,
        }


def parse_exits(text: str) -> tuple[int, ...]:
    try:
        exits = tuple(sorted({int(x) for x in str(text).split(",") if x.strip()}))
    except ValueError:
        raise ValueError(f"--exits must be comma-separated layer counts, got {text!r}") from None
    if not exits or exits[0] < 1:
        raise ValueError(f"--exits must hold depths >= 1, got {text!r}")
    return exits


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tandem train-exits",
        description="Train a draft's early exits (adapters before the shared head) to predict the full draft.",
    )
    p.add_argument("--draft", required=True, help="draft model: pack name, local folder or hub id")
    p.add_argument("--exits", required=True, help="exit depths to train, e.g. 8,12,16 (each < the draft's layers)")
    p.add_argument("--output", required=True, help="output folder (adapters, manifest, checkpoints, log)")
    p.add_argument("--steps", type=int, default=1000, help="teacher batches to train on (default 1000)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this much training time and write the output")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence (default 256)")
    p.add_argument("--batch", type=int, default=4, help="sequences per teacher batch (default 4)")
    p.add_argument("--reuse", type=int, default=1, help="optimizer updates per teacher batch (default 1)")
    p.add_argument("--rank", type=int, default=128, help="adapter bottleneck width (default 128)")
    p.add_argument("--activation", choices=("silu", "none"), default="silu", help="adapter nonlinearity")
    p.add_argument("--no-linear", dest="linear", action="store_false", default=True,
                   help="no full-rank linear part in the adapters (elementwise scale + low-rank residual only)")
    p.add_argument("--ridge-tokens", type=int, default=32768,
                   help="training tokens for the least-squares init of the linear part (default 32768; 0: identity init)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW; default 2e-3)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps (default 10)")
    p.add_argument("--ce-weight", type=float, default=0.2, help="weight of the next-token loss next to the KL")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", dest="resume", action="store_true", default=True, help="continue from a checkpoint (default)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start over, ignoring any checkpoint")
    p.add_argument("--val-fraction", type=float, default=0.03, help="share of documents held out for validation")
    p.add_argument("--val-tokens", type=int, default=4096, help="validation tokens evaluated (rounded to whole batches)")
    p.add_argument("--head-vocab", type=int, default=49152, help="restrict the head to the N most useful tokens (default 49152; 0: full vocabulary)")
    p.add_argument("--checkpoint-every", type=int, default=20, help="steps between checkpoints")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all available)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="torch.compile the frozen teacher (auto: models >= 100M parameters)")
    p.add_argument("--stdlib", default=None, help="folder of Python sources (default: this interpreter's standard library)")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS, help="glob of JSONL prompt files (turns)")
    p.add_argument("--count-chars", type=int, default=16_000_000, help="characters of training text tokenized to rank tokens by frequency")
    p.add_argument("--backend", choices=("auto", "local", "ray"), default="auto", help="ray: a Ray Train job (GPU when the cluster has one); auto: ray only if a cluster with GPUs is reachable")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True, help="no progress bar")
    p.add_argument("--calibrate-only", action="store_true", help="only (re)compute validation KL and the S2D threshold calibration of the adapters in --out")
    return p


def config_from_args(args: argparse.Namespace, draft_path: str) -> TrainConfig:
    exits = parse_exits(args.exits)
    for name, value, low in (
        ("--steps", args.steps, 0),
        ("--seq-len", args.seq_len, 2),
        ("--batch", args.batch, 1),
        ("--reuse", args.reuse, 1),
        ("--rank", args.rank, 1),
        ("--checkpoint-every", args.checkpoint_every, 1),
        ("--head-vocab", args.head_vocab, 0),
        ("--ridge-tokens", args.ridge_tokens, 0),
    ):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not 0.0 < args.val_fraction < 0.5:
        raise ValueError(f"--val-fraction must be in (0, 0.5), got {args.val_fraction}")
    if args.lr < 0:
        raise ValueError(f"--lr must be >= 0, got {args.lr}")
    return TrainConfig(
        draft=args.draft,
        draft_path=draft_path,
        exits=exits,
        out=str(Path(args.output).expanduser()),
        steps=args.steps,
        minutes=args.minutes,
        seq_len=args.seq_len,
        batch=args.batch,
        reuse=args.reuse,
        rank=args.rank,
        activation=args.activation,
        linear=args.linear,
        ridge_tokens=args.ridge_tokens if args.linear else 0,
        lr=args.lr,
        warmup=args.warmup,
        ce_weight=args.ce_weight,
        seed=args.seed,
        resume=args.resume,
        val_fraction=args.val_fraction,
        val_tokens=args.val_tokens,
        head_vocab=args.head_vocab,
        checkpoint_every=args.checkpoint_every,
        dtype=args.dtype,
        threads=args.threads,
        compile=args.compile,
        stdlib=args.stdlib,
        prompts=args.prompts,
        count_chars=args.count_chars,
        progress=args.progress,
    )


# ----------------------------------------------------------------------------------------
# Teacher, student, loss
# ----------------------------------------------------------------------------------------


class Teacher:
    """The frozen draft: hidden states at the exits and the full model's logits on S."""

    def __init__(self, model, *, exits: Sequence[int], head_ids: torch.Tensor | None, compile_body: bool):
        self.model = model
        inner = model.model
        self.exits = tuple(exits)
        self.eps = float(model.config.rms_norm_eps)
        self.final_norm = inner.norm.weight.detach()  # [hidden]
        head_w = model.get_output_embeddings().weight.detach()  # [vocab, hidden]
        self.head_w = head_w[head_ids].contiguous() if head_ids is not None else head_w  # [S, hidden]
        self.body = torch.compile(inner, dynamic=False) if compile_body else inner

    @torch.no_grad()
    def _body(self, ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """ids [B, L] -> ({exit: hidden [B*L, H]}, final normed hidden [B*L, H])."""
        out = self.body(input_ids=ids, output_hidden_states=True, use_cache=False)
        hs = {e: out.hidden_states[e].reshape(-1, out.hidden_states[e].shape[-1]).detach() for e in self.exits}
        return hs, out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])

    def forward(self, ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """ids [B, L] -> ({exit: hidden [B*L, H]}, teacher logits on S [B*L, S] float32)."""
        hs, final = self._body(ids)
        return hs, F.linear(final, self.head_w).float()

    def hidden_and_target(self, ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """ids [B, L] -> ({exit: hidden [B*L, H]}, unit(h_L) [B*L, H] float32): the direction
        the final norm's input has (the output of the final norm divided by its weight)."""
        hs, final = self._body(ids)
        return hs, _unit(final.float() / self.final_norm.float(), self.eps)

    def exit_logits(self, adapter: ExitAdapter | None, h: torch.Tensor) -> torch.Tensor:
        """What the runner computes at an exit: head(rmsnorm(adapter(h)) * w), on S.
        h: [N, H] in the model dtype -> [N, S] float32."""
        z = adapter(h) if adapter is not None else h  # [N, H], model dtype
        z32 = _unit(z, self.eps)  # fp32 statistics, as the runner
        return F.linear(self.final_norm * z32.to(h.dtype), self.head_w).float()


def _unit(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def ridge_init(teacher: Teacher, stream: TokenStream, *, tokens: int, batch: int, lam: float, device, progress: bool = False) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Least-squares linear maps unit(h_k) -> unit(h_L), one per exit, over `tokens` tokens of
    `stream`: per exit (mix [H, H] (output x input), bias [H]), float32. Normal equations in
    float64 with a ridge of lam * mean(diag(X^T X))."""
    acc: dict[int, list[torch.Tensor]] = {}
    seen = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=tokens, desc="train-exits: linear init", unit="tok", dynamic_ncols=True, file=sys.stderr)
    while seen < tokens:
        ids = stream.next_batch(batch)[:, :-1].to(device)  # [B, L]
        hs, y = teacher.hidden_and_target(ids)
        y = y.double().cpu()  # [N, H]
        for e in teacher.exits:
            x = _unit(hs[e], teacher.eps).double().cpu()
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)  # [N, H + 1]: bias column
            if e not in acc:
                acc[e] = [torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype), torch.zeros(x.shape[1], y.shape[1], dtype=x.dtype)]
            acc[e][0] += x.T @ x
            acc[e][1] += x.T @ y
        seen += ids.numel()
        if bar is not None:
            bar.update(ids.numel())
    if bar is not None:
        bar.close()
    out = {}
    for e, (xtx, xty) in acc.items():
        ridge = lam * xtx.diagonal().mean() * torch.eye(xtx.shape[0], dtype=xtx.dtype)
        sol = torch.linalg.solve(xtx + ridge, xty)  # [H + 1, H]
        out[e] = (sol[:-1].T.float().contiguous(), sol[-1].float().contiguous())
    return out


def kl_and_ce(
    student_logits: torch.Tensor, teacher_logp: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(p || q) and next-token CE of q.

    student_logits, teacher_logp: [N, S]; targets: [N] column in S, -1 when the next token is
    not in S (no CE there). Returns (kl [N], ce [N]; ce is 0 where the target is -1)."""
    s_logp = F.log_softmax(student_logits, dim=-1)  # [N, S]
    kl = (teacher_logp.exp() * (teacher_logp - s_logp)).sum(-1)  # KL(p || q) per token
    valid = targets >= 0
    ce = -s_logp.gather(-1, targets.clamp(min=0)[:, None])[:, 0] * valid  # [N]
    return kl, ce


def column_map(head_ids: torch.Tensor | None, vocab: int) -> torch.Tensor:
    """[vocab] token id -> column in S (or -1)."""
    if head_ids is None:
        return torch.arange(vocab)
    cols = torch.full((vocab,), -1, dtype=torch.long)
    cols[head_ids] = torch.arange(head_ids.numel())
    return cols


LINEAR_LR_SCALE = 0.1  # the linear part starts at its least-squares optimum: smaller steps


def lr_at(cfg: TrainConfig, step: int, elapsed_s: float) -> float:
    """Linear warm-up, then cosine decay to 10% over the run (steps or time, whichever is
    the tighter bound on progress)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = step / max(cfg.steps, 1)
    if cfg.minutes:
        progress = max(progress, elapsed_s / (cfg.minutes * 60.0))
    progress = min(max(progress, 0.0), 1.0)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class ValSet:
    """Validation batches with the teacher's outputs cached (inputs and hidden states are
    fixed, so every evaluation is comparable)."""

    ids: list[torch.Tensor]  # per batch [B, L + 1]
    hidden: list[dict[int, torch.Tensor]]  # per batch {exit: [B*L, H]}
    teacher_logp: list[torch.Tensor]  # per batch [B*L, S]
    targets: list[torch.Tensor]  # per batch [B*L] columns (-1: not in S)

    @property
    def tokens(self) -> int:
        return sum(t.numel() for t in self.targets)


def build_val_set(teacher: Teacher, stream: TokenStream, *, batches: int, batch: int, cols: torch.Tensor, device) -> ValSet:
    vs = ValSet(ids=[], hidden=[], teacher_logp=[], targets=[])
    for _ in range(batches):
        ids = stream.next_batch(batch)
        hs, t_logits = teacher.forward(ids[:, :-1].to(device))
        vs.ids.append(ids)
        vs.hidden.append(hs)
        vs.teacher_logp.append(F.log_softmax(t_logits, dim=-1))
        vs.targets.append(cols[ids[:, 1:].reshape(-1)].to(device))
    return vs


@torch.no_grad()
def evaluate(teacher: Teacher, adapters: dict[int, ExitAdapter] | None, val: ValSet) -> dict[int, dict[str, Any]]:
    """Per exit: per-token KL(p || q_exit) [N] (float64 numpy-able tensor), its mean, and the
    share of positions where the exit's argmax equals the teacher's (greedy acceptance proxy)."""
    out: dict[int, dict[str, Any]] = {}
    for e in teacher.exits:
        kls, agree, conf = [], [], []
        for hs, t_logp, targets in zip(val.hidden, val.teacher_logp, val.targets):
            logits = teacher.exit_logits(adapters.get(e) if adapters else None, hs[e])
            kl, _ = kl_and_ce(logits, t_logp, targets)
            kls.append(kl.double().cpu())
            agree.append((logits.argmax(-1) == t_logp.argmax(-1)).cpu())
            conf.append(torch.softmax(logits, dim=-1).amax(-1).cpu())  # the exit's max probability
        kl_all, agree_all = torch.cat(kls), torch.cat(agree)
        out[e] = {"kl": kl_all, "kl_mean": float(kl_all.mean()), "top1_agree": float(agree_all.float().mean()),
                  "agree": agree_all, "max_prob": torch.cat(conf)}
    return out


CALIBRATION_THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def calibration(ev: dict[int, dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Per exit and S2D threshold t: the share of validation positions where the exit's max
    probability reaches t (it would emit), and how often its argmax then equals the full
    draft's. Per-target thresholds follow from it: a target that accepts the full draft's
    tokens at rate a accepts an exit's emitted tokens at about a * agree."""
    table: dict[str, list[dict[str, float]]] = {}
    for e, v in ev.items():
        rows = []
        for t in CALIBRATION_THRESHOLDS:
            emit = v["max_prob"] >= t
            n = int(emit.sum())
            rows.append({"threshold": t, "emit_share": round(n / max(1, emit.numel()), 4),
                         "agree": round(float(v["agree"][emit].float().mean()) if n else 0.0, 4)})
        table[str(e)] = rows
    return table


def _summary(ev: dict[int, dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {str(e): {"kl": round(v["kl_mean"], 5), "top1_agree": round(v["top1_agree"], 4)} for e, v in ev.items()}


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_path(out: str | Path) -> Path:
    return Path(out) / CHECKPOINT_DIR / CHECKPOINT_FILE


def load_checkpoint(cfg: TrainConfig, fingerprint: str) -> dict[str, Any] | None:
    path = checkpoint_path(cfg.out)
    if not cfg.resume or not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("identity") != cfg.identity_key() or state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"checkpoint {path} was made with other settings or another draft "
            f"({state.get('identity')} vs {cfg.identity_key()}); pass --no-resume to start over"
        )
    return state


class _Log:
    def __init__(self, out: Path):
        self.path = out / LOG_FILE

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int
    tokens: int
    elapsed_s: float
    val_before: dict[str, dict[str, float]]
    val_after: dict[str, dict[str, float]]
    resumed_from: int | None
    stopped: str  # "steps" | "minutes" | "signal"
    out: str


def _load_model(cfg: TrainConfig, dtype: torch.dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(cfg.draft_path, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(cfg.draft_path)
    return model, tokenizer


def train(cfg: TrainConfig, *, device: str | torch.device = "cpu", report=None) -> TrainResult:
    """Run (or resume) exit training and write the adapter folder. `report(metrics)` is
    called at each checkpoint (the Ray Train path reports through it)."""
    t_wall = time.perf_counter()
    device = torch.device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = _Log(out)

    model, tokenizer = _load_model(cfg, dtype, device)
    ident = identity_of_hf_model(model, cfg.draft)
    n_layers, hidden, vocab = ident.num_layers, ident.hidden_size, ident.vocab_size
    if cfg.exits[-1] >= n_layers:
        raise ValueError(f"--exits must be below the draft's {n_layers} layers (the full depth needs no training), got {list(cfg.exits)}")
    ckpt = load_checkpoint(cfg, ident.fingerprint)

    docs = collect_documents(stdlib=cfg.stdlib, prompts=cfg.prompts)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    prompts = [d.source for d in train_docs if d.kind == "prompt"]
    max_chars = cfg.max_doc_tokens * 6
    renderer = DocRenderer(tokenizer, prompts=prompts, chat_fraction=cfg.chat_fraction, max_chars=max_chars)

    # Head subset: from token frequencies in the training split (same text as training).
    head_ids: torch.Tensor | None = None
    coverage: dict[str, float] = {}
    if ckpt is not None:
        head_ids = ckpt["head_ids"]
    elif cfg.head_vocab and cfg.head_vocab < vocab:
        t0 = time.perf_counter()
        order = list(range(len(train_docs)))
        random.Random(f"{cfg.seed}:count").shuffle(order)
        texts = (renderer.render(train_docs[i], random.Random(f"{cfg.seed}:count:{i}")) for i in order)
        counts = count_token_frequencies(texts, tokenizer, vocab, max_chars=cfg.count_chars)
        head_ids = choose_head_ids(counts, size=cfg.head_vocab, specials=special_token_ids(tokenizer), freq_share=cfg.head_freq_share)
        coverage["train_text"] = float(counts[head_ids].sum() / counts.sum().clamp(min=1))
        log.write(event="head_ids", size=int(head_ids.numel()), counted_tokens=int(counts.sum()), seconds=round(time.perf_counter() - t0, 1))
    cols = column_map(head_ids, vocab)

    compile_body = cfg.compile == "on" or (cfg.compile == "auto" and sum(p.numel() for p in model.parameters()) >= 100_000_000)
    teacher = Teacher(model, exits=cfg.exits, head_ids=head_ids.to(device) if head_ids is not None else None, compile_body=compile_body)

    # Adapters (float32 master weights) and optimizer.
    torch.manual_seed(cfg.seed)
    adapters = {e: ExitAdapter(hidden, cfg.rank, activation=cfg.activation, eps=teacher.eps, linear=cfg.linear).to(device)
                for e in cfg.exits}
    params = [p for e in cfg.exits for p in adapters[e].parameters()]
    named = [(n, p) for e in cfg.exits for n, p in adapters[e].named_parameters()]
    groups = [{"params": [p for n, p in named if n not in ("mix", "bias")], "lr_scale": 1.0}]
    if cfg.linear:
        groups.append({"params": [p for n, p in named if n in ("mix", "bias")], "lr_scale": LINEAR_LR_SCALE})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)

    stream_state = StreamState()
    step, elapsed, tokens_done = 0, 0.0, 0
    val_before = None
    if ckpt is not None:
        for e in cfg.exits:
            adapters[e].load_state_dict(ckpt["adapters"][e])
        opt.load_state_dict(ckpt["optimizer"])
        stream_state = StreamState(**ckpt["stream"])
        step, elapsed, tokens_done = int(ckpt["step"]), float(ckpt["elapsed_s"]), int(ckpt["tokens"])
        torch.set_rng_state(ckpt["torch_rng"])
        val_before = ckpt["val_before"]
        coverage = ckpt.get("coverage", {})
        log.write(event="resume", step=step, sequences=stream_state.sequences, tokens=tokens_done)
    else:
        log.write(event="start", config=dataclasses.asdict(cfg))
        if cfg.linear and cfg.ridge_tokens > 0:
            t0 = time.perf_counter()
            ridge_stream = TokenStream(train_docs, renderer, seed=cfg.seed + 2, seq_len=cfg.seq_len, max_doc_tokens=cfg.max_doc_tokens)
            fitted = ridge_init(teacher, ridge_stream, tokens=cfg.ridge_tokens, batch=cfg.batch, lam=cfg.ridge_lambda,
                                device=device, progress=cfg.progress)
            with torch.no_grad():
                for e, (mix, bias) in fitted.items():
                    adapters[e].mix.copy_(mix)
                    adapters[e].bias.copy_(bias)
            log.write(event="linear_init", tokens=cfg.ridge_tokens, seconds=round(time.perf_counter() - t0, 1))

    # Validation: fixed batches of held-out text; the teacher's outputs cached once.
    val = _validation_set(cfg, teacher, renderer, val_docs, cols, device)
    if val_before is None:
        val_before = _summary(evaluate(teacher, None, val))
        if head_ids is not None:
            coverage.update(_val_coverage(model, val, head_ids, device))
        log.write(event="val", step=0, exits=val_before, coverage=coverage)
        if cfg.linear and cfg.ridge_tokens > 0:
            log.write(event="val", step=0, init="linear", exits=_summary(evaluate(teacher, adapters, val)))

    stream = TokenStream(train_docs, renderer, seed=cfg.seed, seq_len=cfg.seq_len, max_doc_tokens=cfg.max_doc_tokens, state=stream_state)
    stop = {"reason": None}

    def on_signal(signum, _frame):
        stop["reason"] = "signal"

    old_handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old_handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread (e.g. inside a Ray worker thread)
            pass

    def save(final: bool) -> None:
        state = {
            "identity": cfg.identity_key(),
            "fingerprint": ident.fingerprint,
            "adapters": {e: {k: v.detach().cpu() for k, v in adapters[e].state_dict().items()} for e in cfg.exits},
            "optimizer": opt.state_dict(),
            "stream": dataclasses.asdict(stream.state),
            "step": step,
            "tokens": tokens_done,
            "elapsed_s": elapsed,
            "torch_rng": torch.get_rng_state(),
            "head_ids": head_ids,
            "val_before": val_before,
            "coverage": coverage,
        }
        _atomic_torch_save(state, checkpoint_path(out))
        cpu_adapters = {e: ExitAdapter(hidden, cfg.rank, activation=cfg.activation, eps=teacher.eps, linear=cfg.linear)
                        for e in cfg.exits}
        for e in cfg.exits:
            cpu_adapters[e].load_state_dict(state["adapters"][e])
        save_exit_adapters(
            out,
            cpu_adapters,
            draft=ident,
            head_ids=head_ids,
            extra={"training": {"steps": step, "tokens": tokens_done, "elapsed_s": round(elapsed, 1), "final": final,
                                "val_before": val_before, "val_after": val_after_holder.get("v"), "head_coverage": coverage,
                                "calibration": val_after_holder.get("calibration"),
                                "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out",)}}},
        )
        log.write(event="checkpoint", step=step, tokens=tokens_done, final=final)

    val_after_holder: dict[str, Any] = {}
    resumed_from = step if ckpt is not None else None
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=None if cfg.minutes else cfg.steps, initial=step, desc="train-exits", unit="step", dynamic_ncols=True, file=sys.stderr)
    budget_s = cfg.minutes * 60.0 if cfg.minutes else None
    stopped = "steps"
    tok_per_step = cfg.batch * cfg.seq_len
    try:
        while step < cfg.steps:
            if stop["reason"]:
                stopped = stop["reason"]
                break
            if budget_s is not None and elapsed >= budget_s:
                stopped = "minutes"
                break
            t0 = time.perf_counter()
            ids = stream.next_batch(cfg.batch)  # [B, L + 1]
            hs, t_logits = teacher.forward(ids[:, :-1].to(device))
            t_logp = F.log_softmax(t_logits, dim=-1)  # [B*L, S]
            del t_logits
            targets = cols[ids[:, 1:].reshape(-1)].to(device)  # [B*L]
            lr = lr_at(cfg, step, elapsed)
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            per_exit: dict[int, float] = {}
            total = 0.0
            for _ in range(cfg.reuse):
                opt.zero_grad(set_to_none=True)
                for e in cfg.exits:
                    logits = teacher.exit_logits(adapters[e], hs[e])
                    kl, ce = kl_and_ce(logits, t_logp, targets)
                    loss = (kl.mean() + cfg.ce_weight * ce.mean()) / len(cfg.exits)  # averaged over exits
                    loss.backward()  # per exit: frees that exit's [N, S] buffers early
                    per_exit[e] = float(kl.mean().detach())
                    total += float(loss.detach())
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            step += 1
            tokens_done += tok_per_step
            dt = time.perf_counter() - t0
            elapsed += dt
            rec = {"step": step, "loss": round(total / cfg.reuse, 5), "lr": lr, "tok_s": round(tok_per_step / dt, 1),
                   "kl": {str(e): round(v, 4) for e, v in per_exit.items()}, "sequences": stream.state.sequences}
            log.write(**rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tok_s']:.0f}", **{f"kl{e}": f"{v:.2f}" for e, v in per_exit.items()})
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save(final=False)
                if report is not None:
                    report({"step": step, "loss": rec["loss"], "tokens": tokens_done})
    finally:
        if bar is not None:
            bar.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)

    ev = evaluate(teacher, adapters, val)
    val_after = _summary(ev)
    val_after_holder["v"] = val_after
    val_after_holder["calibration"] = calibration(ev)
    log.write(event="val", step=step, exits=val_after)
    save(final=stopped != "signal")
    if report is not None:
        report({"step": step, "tokens": tokens_done, "done": True, **{f"val_kl_{e}": v["kl"] for e, v in val_after.items()}})
    result = TrainResult(steps=step, tokens=tokens_done, elapsed_s=elapsed, val_before=val_before, val_after=val_after,
                         resumed_from=resumed_from, stopped=stopped, out=str(out))
    log.write(event="done", steps=step, tokens=tokens_done, train_s=round(elapsed, 1), wall_s=round(time.perf_counter() - t_wall, 1), stopped=stopped)
    return result


def _validation_set(cfg: TrainConfig, teacher: Teacher, renderer: DocRenderer, val_docs: Sequence[Doc], cols: torch.Tensor, device) -> ValSet:
    val_stream = TokenStream(val_docs, renderer, seed=cfg.seed + 1, seq_len=cfg.seq_len, max_doc_tokens=cfg.max_doc_tokens)
    val_batches = max(1, round(cfg.val_tokens / (cfg.batch * cfg.seq_len)))
    return build_val_set(teacher, val_stream, batches=val_batches, batch=cfg.batch, cols=cols, device=device)


def validation_kl(cfg: TrainConfig, adapters: dict[int, ExitAdapter], *, device: str = "cpu"):
    """Evaluate bare exits and `adapters` on cfg's validation split, with the head subset
    saved in cfg.out. Returns (before, after, sequences): per exit {"kl": per-token KL [N],
    "kl_mean", "top1_agree"}; N = sequences * seq_len, in sequence order."""
    from tandem.actors.exit_adapters import load_exit_adapters

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    model, tokenizer = _load_model(cfg, dtype, torch.device(device))
    _, _, head_ids = load_exit_adapters(cfg.out, torch.float32)
    train_docs, val_docs = split_documents(collect_documents(stdlib=cfg.stdlib, prompts=cfg.prompts), cfg.val_fraction)
    renderer = DocRenderer(tokenizer, prompts=[d.source for d in train_docs if d.kind == "prompt"],
                           chat_fraction=cfg.chat_fraction, max_chars=cfg.max_doc_tokens * 6)
    teacher = Teacher(model, exits=cfg.exits, head_ids=head_ids, compile_body=False)
    val = _validation_set(cfg, teacher, renderer, val_docs, column_map(head_ids, model.config.vocab_size), device)
    adapters = {e: a.to(device=device, dtype=torch.float32) for e, a in adapters.items()}
    return evaluate(teacher, None, val), evaluate(teacher, adapters, val), sum(ids.shape[0] for ids in val.ids)


@torch.no_grad()
def _val_coverage(model, val: ValSet, head_ids: torch.Tensor, device) -> dict[str, float]:
    """Share of validation tokens in S, and share of positions where the full draft's
    full-vocabulary argmax lies in S (a draft restricted to S can only propose those)."""
    in_s = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    in_s[head_ids] = True
    text_hits = torch.cat([in_s[ids[:, 1:].reshape(-1)] for ids in val.ids]).float().mean()
    head_w = model.get_output_embeddings().weight  # [vocab, H]
    arg_hits = []
    for ids in val.ids:
        hidden = model.model(input_ids=ids[:, :-1].to(device), use_cache=False).last_hidden_state
        top = F.linear(hidden.reshape(-1, hidden.shape[-1]), head_w).argmax(-1).cpu()
        arg_hits.append(in_s[top])
    return {"val_text": float(text_hits), "val_teacher_argmax": float(torch.cat(arg_hits).float().mean())}


# ----------------------------------------------------------------------------------------
# Ray Train
# ----------------------------------------------------------------------------------------


def _ray_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**{**config["cfg"], "exits": tuple(config["cfg"]["exits"]), "progress": False})
    device = ray.train.torch.get_device() if config.get("use_gpu") else "cpu"
    train(cfg, device=device, report=lambda metrics: ray.train.report(metrics))


def ray_gpus(address: str | None) -> int:
    """GPUs in the Ray cluster at `address` (or $RAY_ADDRESS); 0 when none is reachable."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return 0
    import ray

    try:
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)
        return int(ray.cluster_resources().get("GPU", 0))
    except Exception:  # noqa: BLE001 - no cluster: train here
        return 0


def run_ray(cfg: TrainConfig, *, use_gpu: bool, address: str | None) -> None:
    """One Ray Train worker runs `train` (the adapters are small: data parallelism would not
    pay). The output folder must be reachable from the worker (shared storage, or a
    single-node cluster)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu),
        run_config=RunConfig(name=f"train-exits-{Path(cfg.out).name}", storage_path=str(Path(cfg.out) / "ray")),
    )
    trainer.fit()


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def resolve_draft(ref: str) -> str:
    from tandem.deploy.packs import resolve_model_path

    return resolve_model_path(ref)


def recalibrate(out: str | Path, *, device: str = "cpu") -> dict[str, Any]:
    """Recompute validation KL and the threshold calibration of a finished adapter folder
    (with the settings it was trained with) and store them in its manifest."""
    from tandem.actors.exit_adapters import MANIFEST, _atomic_write_bytes, load_exit_adapters, read_manifest

    manifest = read_manifest(out)
    saved = dict(manifest["training"]["config"])
    saved["exits"] = tuple(saved["exits"])
    cfg = TrainConfig(**{**saved, "out": str(out), "progress": False})
    adapters, _, _ = load_exit_adapters(out, torch.float32)
    before, after, _ = validation_kl(cfg, adapters, device=device)
    manifest["training"].update({"val_before": _summary(before), "val_after": _summary(after),
                                 "calibration_before": calibration(before), "calibration": calibration(after)})
    _atomic_write_bytes(Path(out) / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest["training"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.calibrate_only:
        summary = recalibrate(Path(args.output).expanduser())
        print(json.dumps({k: summary[k] for k in ("val_before", "val_after", "calibration")}))
        return 0
    try:
        cfg = config_from_args(args, resolve_draft(args.draft))
    except (ValueError, RuntimeError) as exc:
        print(f"train-exits: {exc}", file=sys.stderr)
        return 2
    backend = args.backend
    gpus = 0
    if backend in ("auto", "ray"):
        gpus = ray_gpus(args.address)
        if backend == "auto":
            backend = "ray" if gpus > 0 else "local"
    try:
        if backend == "ray":
            run_ray(cfg, use_gpu=gpus > 0, address=args.address)
            summary = json.loads((Path(cfg.out) / "exit_adapters.json").read_text()).get("training", {})
            print(json.dumps({"out": cfg.out, "backend": "ray", "gpus": gpus, "steps": summary.get("steps"),
                              "val_before": summary.get("val_before"), "val_after": summary.get("val_after")}))
            return 0
        result = train(cfg, device="cpu")
    except ValueError as exc:
        print(f"train-exits: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": result.out, "backend": "local", "steps": result.steps, "tokens": result.tokens,
                      "train_s": round(result.elapsed_s, 1), "stopped": result.stopped, "resumed_from": result.resumed_from,
                      "val_before": result.val_before, "val_after": result.val_after}))
    return 130 if result.stopped == "signal" else 0


if __name__ == "__main__":
    sys.exit(main())
