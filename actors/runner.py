"""Model runner: one causal LM with per-request KV caches, rollback, multi-exit forwards and
batched verification. Plain classes; the Ray actors in this package wrap them.

Glossary
- sequence: one request's state on this model: the token ids fed so far and their KV cache.
- fed / filled: a token is *fed* once it went through layer 0; layer l is *filled* up to the
  number of positions whose key/value at layer l exist. Without early exits every layer is
  filled to the same length.
- exit: a depth k (number of decoder layers) after which the shared final norm and LM head
  turn the hidden state into logits (S2D sorted drafting). A token that left at exit k has KV
  only in layers < k; its hidden state at depth k is kept, and deeper layers are filled
  *lazily* the next time a deeper exit runs for a later token.
- rollback: cut a sequence back to a length (a rejected draft, a rejected verification).

The forward is written out over the Hugging Face modules' weights (fused QKV and gate/up
projections, a preallocated KV cache per sequence, GQA packed into the query dimension) for
the Llama family of architectures (llama, qwen2, mistral: pre-norm RMSNorm, rotary, GQA,
SwiGLU). Loading goes through transformers, so any local folder or hub id of those families
works; other architectures are refused with a clear error.

Every tensor lives on the runner's `device` (actors/devices.py). The runner's parts: linear
kernels per device (actors/kernels.py), KV memory per request (actors/kv_cache.py), loading
(actors/loading.py), and here the conversion and the forward. Past 400 lines on purpose:
the multi-exit lazy fill, the stage forward and the batched forward share one invariant
(`filled` per layer, `hidden` at each lazy token's depth) and one set of converted weights.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from tandem.actors import layer_ops
from tandem.actors.devices import resolve_device
from tandem.actors.kv_cache import KVLayout, SequenceState
from tandem.actors.kernels import (
    CROSSOVER_ROWS,
    ConcatLinear,
    DenseLinear,
    QuantLinear,
    linear_kernel,
    make_linear,
    measure_quant_max_rows,
    open_pack_grid,
)
from tandem.actors.lean_layers import LeanLayers
from tandem.actors.loading import SUPPORTED_MODEL_TYPES, load_causal_lm, parse_dtype

# layers a runner times its quantized kernels' row bound on at load (_calibrate_quant_rows).
# Two were too few: on the 1.5B pack (ggml, 2-core AVX-512 EPYC, 2 threads, best of 3) a
# 16-row block through 2 layers took 17.9 ms quantized against 16.2 dense, so the bound fell
# to 8 in most loads, while through all 28 layers it took 126 against 214 ms (dense 1.70x);
# through 8 layers 40 against 63 (1.57x), and 64 / 128 rows 1.11x / 1.03x there against
# 1.14x / 1.04x through all 28. Few layers' weights stay in the caches between the reps,
# which flatters the dense side. Eight cost ~10 s more at the 1.5B pack's load.
CALIBRATION_LAYERS = 8


@dataclass
class _Layer:
    input_norm: torch.Tensor  # [hidden]
    post_norm: torch.Tensor  # [hidden]
    qkv: DenseLinear | QuantLinear | ConcatLinear  # hidden -> (heads + 2 kv_heads) * head_dim
    o: DenseLinear | QuantLinear | ConcatLinear
    gate_up: DenseLinear | QuantLinear | ConcatLinear  # hidden -> 2 * intermediate
    down: DenseLinear | QuantLinear | ConcatLinear


@dataclass
class _Row:
    """One sequence inside a batched forward over a span of layers."""

    seq: SequenceState
    start: int  # position of the first query token
    hidden: torch.Tensor  # [n, hidden]
    n_new: int  # the last n_new tokens are the ones the caller asked for; the rest are lazy


@dataclass
class RunnerTimings:
    """Wall time spent inside model forwards (for overhead accounting)."""

    forward_s: float = 0.0
    forwards: int = 0

    def add(self, dt: float) -> None:
        self.forward_s += dt
        self.forwards += 1


class ModelRunner:
    """A causal LM with KV caches per sequence.

    Parameters (keyword-only beyond the path):
    - dtype: compute dtype ("bfloat16", "float32").
    - exits: draft exit depths (layer counts) for multi-exit forwards; the full depth is
      always an exit.
    - device: where every weight, KV cache, rotary table, mask and token-id tensor lives
      ("auto": the GPU this process was given, else the CPU; actors/devices.py).
    - quantize: None, "int8" or "int4" (weight-only, for drafts); the kernel per device is
      actors/kernels.py's choice, reported as `kernel`.
    - head_ids: restrict the LM head to these token ids (a draft over frequent tokens);
      logits then have len(head_ids) columns, and `head_ids` maps column -> token id.
      With restricted_head="early" the restriction applies to exits below the full depth
      only (the deepest exit keeps the whole vocabulary); "all" restricts every exit.
    - exit_adapters: {depth: callable(hidden [n, H]) -> hidden} applied before the shared
      norm at that exit (trained exits, SoFT-style).
    - layer_range: (lo, hi) keeps only decoder layers [lo, hi): a pipeline stage of a sharded
      target (see `forward_stage`). The first stage embeds tokens, the last one applies the
      final norm and LM head.
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str | torch.dtype = "bfloat16",
        device: str | torch.device = "auto",
        exits: Sequence[int] = (),
        quantize: str | None = None,
        head_ids: Sequence[int] | None = None,
        restricted_head: str = "all",
        exit_adapters: dict | None = None,
        max_context: int | None = None,
        layer_range: tuple[int, int] | None = None,
        model=None,
    ):
        self.dtype = parse_dtype(dtype)
        self.device = resolve_device(device)
        if quantize not in (None, "int8", "int4", "pack"):
            raise ValueError(f"quantize must be None, 'int8', 'int4' or 'pack', got {quantize!r}")
        if model is None:
            with torch.device("cpu"):  # loaded on the CPU, converted onto self.device below
                model = load_causal_lm(model_path, self.dtype)
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model: architecture {cfg.model_type!r} is not supported by tandem's runner "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"model: activation {cfg.hidden_act!r} is not supported (silu only)")
        self.model_path = model_path
        self.config = cfg
        self.total_layers = cfg.num_hidden_layers
        lo, hi = layer_range if layer_range is not None else (0, self.total_layers)
        if not 0 <= lo < hi <= self.total_layers:
            raise ValueError(f"layer_range must satisfy 0 <= lo < hi <= {self.total_layers}, got {layer_range}")
        if layer_range is not None and (exits or quantize or head_ids is not None):
            raise ValueError("layer_range (a pipeline stage) takes no exits, quantization or head_ids")
        self.layer_lo, self.layer_hi = lo, hi
        self.is_first, self.is_last = lo == 0, hi == self.total_layers
        self.num_layers = hi - lo  # layers held here
        self.hidden_size = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden_size // self.num_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.vocab_size = cfg.vocab_size
        self.eps = cfg.rms_norm_eps
        self.max_context = int(max_context or cfg.max_position_embeddings)
        window = getattr(cfg, "sliding_window", None)
        if cfg.model_type == "mistral" and window and window < self.max_context:
            self.max_context = int(window)  # beyond the window we would attend differently
        # several sequences in one forward run packed, not padded to the longest (_run_layers)
        self.packed = True
        exits_sorted = sorted({int(e) for e in exits} | {self.num_layers})
        for e in exits_sorted:
            if not 1 <= e <= self.num_layers:
                raise ValueError(f"exits must be within 1..{self.num_layers}, got {e}")
        self.exits = tuple(exits_sorted)
        self.quantize = quantize
        self.kernel = linear_kernel(self.device, quantize)
        self._grid = open_pack_grid(model_path) if self.kernel == "pack" else None
        self.exit_adapters = {d: _adapter_on(a, self.device) for d, a in (exit_adapters or {}).items()}
        self.timings = RunnerTimings()
        self.kv = KVLayout(
            num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            hidden_size=self.hidden_size, dtype=self.dtype, device=self.device, max_context=self.max_context,
            keep_hidden=len(self.exits) > 1,
        )

        inner = model.model
        with torch.no_grad(), torch.device("cpu"):  # conversion reads the CPU copy; results go to self.device
            self.embed = self._place(inner.embed_tokens.weight) if self.is_first else None  # [vocab, hidden]
            self.final_norm = self._place(inner.norm.weight)
            self.layers = [self._convert_layer(layer, lo + i) for i, layer in enumerate(inner.layers[lo:hi])]
            head_w = model.get_output_embeddings().weight.detach()  # [vocab, hidden]
            if not self.is_last:
                head_w = head_w[:1]  # a middle stage computes no logits
            if restricted_head not in ("all", "early"):
                raise ValueError(f"restricted_head must be 'all' or 'early', got {restricted_head!r}")
            self.head_ids: torch.Tensor | None = None
            self.full_head = None  # the whole-vocabulary head of the deepest exit ("early")
            if head_ids is not None:
                ids = torch.as_tensor(sorted(set(int(i) for i in head_ids)), dtype=torch.long)
                if ids.numel() == 0 or ids.min() < 0 or ids.max() >= self.vocab_size:
                    raise ValueError("head_ids must be token ids within the vocabulary")
                self.head_ids = ids.to(self.device)
                if restricted_head == "early":
                    self.full_head = self._linear(head_w, None, head=True)
                head_w = head_w[ids]
            self.head = self._linear(head_w, None, head=True)
            # Rotary tables for every position, from the model's own rotary module (honours
            # its rope scaling); indexed by position at run time.
            pos = torch.arange(self.max_context + 1)[None, :]
            dummy = torch.zeros(1, 1, dtype=torch.float32)
            cos, sin = inner.rotary_emb(dummy, pos)
            self.cos = self._place(cos[0])  # [positions, head_dim]
            self.sin = self._place(sin[0])
        self.attention_bias = self.layers[0].qkv.bias is not None
        self._grid = None  # read during conversion only
        del model  # the runner keeps only the converted weights
        # rows up to which the quantized kernels beat the dense weight here (None: no quantized
        # linear); measured once on a layer's linears, applied to all (actors/kernels.py)
        if any(lin.kind == "ggml" for lin in self._quant_linears()):
            self.kernel += "-ggml"  # "pack-ggml", "int4-ggml": on ggml's kernels (actors/ggml_kernel.py)
        # norms, rotary and the SiLU gate: one C++ call each on ggml's kernels in bf16, else torch
        self.ops = layer_ops.for_runner(self.kernel, self.dtype, self.device, self.eps)
        # one sequence's blocks through the layers as bound C++ calls, where all are (actors/lean_layers.py)
        self._lean = LeanLayers.of(self)
        # set by each timed side while it is measured (set_bound), then the crossover found
        self.quant_max_rows: int | None = self._calibrate_quant_rows()

    # ------------------------------------------------------------------ conversion
    def _quant_linears(self, layers=None):
        """The QuantLinear objects of `layers` (all, and the heads, when None)."""
        mods = []
        for layer in self.layers if layers is None else layers:
            mods += [layer.qkv, layer.o, layer.gate_up, layer.down]
        if layers is None:
            mods += [self.head, self.full_head]
        for m in mods:
            for part in getattr(m, "parts", [m]):
                if isinstance(part, QuantLinear):
                    yield part

    def _calibrate_quant_rows(self) -> int | None:
        """Rows up to which the quantized kernels serve a block, measured on blocks through
        the first CALIBRATION_LAYERS layers of a scratch sequence (actors/kernels.py)."""
        if next(self._quant_linears(self.layers[:1]), None) is None:
            return None
        depth = min(CALIBRATION_LAYERS, self.num_layers)
        tried = [r for r in CROSSOVER_ROWS if r <= self.max_context]  # a block past it never runs
        seq = self.new_sequence(max(tried, default=1) + 1)

        def forward(n: int) -> None:
            ids = torch.arange(n, device=self.device) % self.vocab_size
            # with the threads a forward of n rows serves with (_threads): the dense side at
            # torch's threads, not at the one thread ggml's side leaves torch (at one thread
            # the 1.5B pack's dense weights lost to ggml's kernels up to 256 rows on a 2-core
            # AVX-512 EPYC, where at 2 threads they win from 16: prefill 65 rows 0.79 -> 0.6 s)
            with self._threads(n):
                self._run_layers([_Row(seq=seq, start=0, hidden=self.embed[ids], n_new=n)], 0, depth)

        def set_bound(n: int) -> None:
            self.quant_max_rows = n
            for lin in self._quant_linears():
                lin.max_rows = n

        with torch.inference_mode():
            rows = measure_quant_max_rows(forward, set_bound, rows=tried)
        set_bound(rows)
        self.release(seq)
        return rows

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=self.device, dtype=self.dtype)

    def _linear(self, weight: torch.Tensor, bias: torch.Tensor | None, *, head: bool = False):
        return make_linear(weight, bias, kernel=self.kernel, dtype=self.dtype, device=self.device, head=head)

    def _fused(self, prefix: str, names: Sequence[str], modules: Sequence) -> DenseLinear | QuantLinear | ConcatLinear:
        """One linear for projections that share their input (q/k/v, gate/up), fused along
        the output. With a pack grid, the parts in the grid run on the int4 kernel as
        stored (one fused grid when all are), the others int8."""
        weights = [m.weight for m in modules]
        biases = [m.bias for m in modules]
        bias = torch.cat(biases, dim=0) if biases[0] is not None else None
        if self._grid is None:
            return self._linear(torch.cat(weights, dim=0), bias)
        grids = [self._grid.linear(f"{prefix}.{n}") for n in names]
        rows = [self._grid.rows(f"{prefix}.{n}") for n in names]
        if all(g is not None for g in grids):
            codes, scale, minimum = (torch.cat(part, dim=0) for part in zip(*grids))
            fused_rows = torch.cat(rows, dim=0) if all(r is not None for r in rows) else None
            return QuantLinear.from_grid(
                codes, scale, minimum, self._place(bias) if bias is not None else None, dense=torch.cat(weights, dim=0), dtype=self.dtype,
                rows=fused_rows,
            )
        parts = []
        for g, r, w, b in zip(grids, rows, weights, biases):
            b = self._place(b) if b is not None else None
            parts.append(QuantLinear.from_grid(*g, b, dense=w, dtype=self.dtype, rows=r) if g is not None else self._linear(w, b))
        return ConcatLinear(parts)

    def _convert_layer(self, layer, index: int) -> _Layer:
        att, mlp = layer.self_attn, layer.mlp
        for name in ("q_norm", "k_norm"):
            if getattr(att, name, None) is not None:
                raise ValueError("model: attention with q/k norms is not supported by tandem's runner")
        prefix = f"model.layers.{index}"
        return _Layer(
            input_norm=self._place(layer.input_layernorm.weight),
            post_norm=self._place(layer.post_attention_layernorm.weight),
            qkv=self._fused(prefix, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], [att.q_proj, att.k_proj, att.v_proj]),
            o=self._fused(prefix, ["self_attn.o_proj"], [att.o_proj]),
            gate_up=self._fused(prefix, ["mlp.gate_proj", "mlp.up_proj"], [mlp.gate_proj, mlp.up_proj]),
            down=self._fused(prefix, ["mlp.down_proj"], [mlp.down_proj]),
        )

    # ------------------------------------------------------------------ sequences
    @property
    def head_size(self) -> int:
        """Columns of the logits this runner returns."""
        return self.head.out_features

    # ------------------------------------------------------------------ KV cache (actors/kv_cache.py)
    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one position takes here: keys and values of every layer held."""
        return self.kv.kv_bytes_per_token

    def new_sequence(self, capacity: int = 256) -> SequenceState:
        return self.kv.new_sequence(capacity)

    def _ensure_capacity(self, seq: SequenceState, needed: int) -> None:
        self.kv.ensure_capacity(seq, needed)

    def fork(self, seq: SequenceState) -> SequenceState:
        """An independent copy of a sequence (SpecTr branches share the prefix this way)."""
        return self.kv.fork(seq)

    def rows_kind(self, rows: int) -> tuple:
        """What decides a row's bits in a forward of one sequence's `rows` rows: two forwards
        of the same kind compute a row at the same position over the same cache alike, bit
        for bit (a reused prompt prefix relies on it, actors/prefix_cache.py). Measured on
        the 1.5B pack: the linears and the C++ attend compute each row alone, so the kind is
        the side of quant_max_rows (dense matmuls past it); torch's attention gives rows
        that depend on the block's size (a 128-row chunk against its last 85 rows: keys
        differ from layer 1 on), so there the size itself is the kind."""
        if not self.ops.attends(rows, self.head_dim):
            return ("torch attention", rows)
        return ("dense" if self.quant_max_rows is not None and rows > self.quant_max_rows else "quantized",)

    def release(self, seq: SequenceState) -> None:
        """Free a sequence's KV (local memory is freed with the last reference)."""

    def rollback(self, seq: SequenceState, length: int) -> None:
        """Cut the sequence back to `length` fed tokens (KV past it becomes garbage)."""
        self.kv.rollback(seq, length)

    def truncate_to_common_prefix(self, seq: SequenceState, tokens: Sequence[int]) -> int:
        """Roll back to the longest prefix of `tokens` already fed; returns that length."""
        return self.kv.truncate_to_common_prefix(seq, tokens)

    # ------------------------------------------------------------------ public forwards
    @torch.inference_mode()
    def extend(self, seq: SequenceState, tokens: Sequence[int], *, all_logits: bool = True) -> torch.Tensor:
        """Feed `tokens` through every layer; return logits [n, head] (or [1, head] for the
        last token only). Lazy deeper KV of earlier early-exited tokens is filled first."""
        return self.extend_batch([seq], [tokens], all_logits=all_logits)[0]

    def prefill(self, seq: SequenceState, tokens: Sequence[int]) -> torch.Tensor:
        """Feed a prompt; return the logits [head] of its last position."""
        if len(tokens) == 0:
            raise ValueError("prompt must hold at least one token")
        return self.extend(seq, tokens, all_logits=False)[-1]

    def forward_rows(self, lengths: Sequence[int]) -> int:
        """Rows a batched forward over blocks of these lengths computes: their total when
        packed (several sequences), else sequences x the longest."""
        lengths = [int(n) for n in lengths if n]
        if len(lengths) > 1 and not self.packed:
            return len(lengths) * max(lengths)
        return sum(lengths)

    @torch.inference_mode()
    def extend_batch(
        self, seqs: Sequence[SequenceState], blocks: Sequence[Sequence[int]], *, all_logits: bool | Sequence[bool] = True
    ) -> list[torch.Tensor]:
        """Batched verification: feed blocks[i] to seqs[i] in one forward through all layers.
        Returns per sequence logits [n_i, head] (or [1, head] where all_logits, one flag or one
        per sequence, is False: a prefill chunk mixed into verification needs its last row)."""
        hidden = self.forward_to_depth(seqs, blocks, depth=self.num_layers)
        flags = [all_logits] * len(hidden) if isinstance(all_logits, bool) else list(all_logits)
        picked = [h if every_row else h[-1:] for h, every_row in zip(hidden, flags)]
        if len(picked) == 1:
            return [self.logits_at_exit(picked[0], self.num_layers)]
        # one head call for every sequence's rows: the head streams its whole weight (the
        # 1.5B pack's 151936 x 1536 Q8_0) once whatever the rows, so 8 one-row sequences cost
        # 16 ms where a call each cost 70 (2-core AMX host; docs/deploy.md "Gathering a batch")
        logits = self.logits_at_exit(torch.cat(picked), self.num_layers)
        return list(logits.split([h.shape[0] for h in picked]))

    @torch.inference_mode()
    def forward_to_depth(
        self, seqs: Sequence[SequenceState], blocks: Sequence[Sequence[int]], *, depth: int
    ) -> list[torch.Tensor]:
        """Feed new tokens and run them through layers [0, depth). Returns per sequence the
        hidden state [n_i, hidden] of the new tokens at `depth` (before any norm). Tokens
        reaching depth < num_layers are recorded as lazy for deeper layers."""
        if depth not in self.exits:
            raise ValueError(f"depth {depth} is not an exit of this runner {self.exits}")
        if not (self.is_first and self.is_last):
            raise RuntimeError("a pipeline stage runs forward_stage, not forward_to_depth")
        rows = []
        for seq, block in zip(seqs, blocks):
            block = [int(t) for t in block]
            if not block:
                raise ValueError("each block must hold at least one token")
            start = seq.length
            self._ensure_capacity(seq, start + len(block))
            ids = torch.tensor(block, dtype=torch.long, device=self.device)
            rows.append(_Row(seq=seq, start=start, hidden=self.embed[ids], n_new=len(block)))
            seq.tokens.extend(block)
        return self._run_to(rows, lo=0, depth=depth)

    @torch.inference_mode()
    def continue_to_depth(self, seq: SequenceState, hidden: torch.Tensor, *, from_depth: int, depth: int) -> torch.Tensor:
        """Take the last `hidden.shape[0]` tokens of seq, currently at from_depth, deeper to
        `depth` (S2D: the token did not pass its exit's threshold). hidden: [n, hidden]."""
        return self.continue_batch([seq], [hidden], from_depth=from_depth, depth=depth)[0]

    @torch.inference_mode()
    def continue_batch(
        self, seqs: Sequence[SequenceState], hiddens: Sequence[torch.Tensor], *, from_depth: int, depth: int
    ) -> list[torch.Tensor]:
        """continue_to_depth for several sequences in one forward (sorted drafting batched
        across requests: the rows no exit emitted go deeper together)."""
        if from_depth not in self.exits or depth not in self.exits or depth <= from_depth:
            raise ValueError(f"bad exit step {from_depth} -> {depth} for exits {self.exits}")
        rows = []
        for seq, hidden in zip(seqs, hiddens):
            n = hidden.shape[0]
            start = seq.length - n
            if seq.filled[from_depth - 1] != seq.length or seq.filled[from_depth] > start:
                raise RuntimeError("continue_to_depth: the tokens are not the newest at that depth")
            rows.append(_Row(seq=seq, start=start, hidden=hidden, n_new=n))
        return self._run_to(rows, lo=from_depth, depth=depth)

    def head_columns(self, depth: int) -> torch.Tensor | None:
        """Token id of each logit column at exit `depth` (None: column == token id)."""
        return None if self._full_vocab_at(depth) else self.head_ids

    def _full_vocab_at(self, depth: int) -> bool:
        return self.full_head is not None and depth == self.num_layers

    def logits_at_exit(self, hidden: torch.Tensor, depth: int) -> torch.Tensor:
        """[n, hidden] at exit `depth` -> [n, columns] logits (float32); see head_columns."""
        if depth in self.exit_adapters:
            hidden = self.exit_adapters[depth](hidden)
        head = self.full_head if self._full_vocab_at(depth) else self.head
        # torch at one thread only where ggml computes the head: torch's own int4 head wants
        # every thread (7.2 against 3.4 ms for the 0.5B draft's, at one row)
        with self._threads(hidden.shape[0]) if getattr(head, "kind", None) == "ggml" else contextlib.nullcontext():
            return head(self._rms(hidden, self.final_norm)).float()

    def _threads(self, rows: int | None = None):
        """On ggml's kernels: torch's ops at one thread, ggml's matmuls on the runner's threads
        (actors/ggml_kernel.py torch_at_one_thread); otherwise nothing changes. A forward of
        `rows` past quant_max_rows runs its linears on the dense weights, torch's own
        matmuls, which want every thread: it keeps them."""
        if rows is not None and self.quant_max_rows is not None and rows > self.quant_max_rows:
            return contextlib.nullcontext()
        if self.kernel.endswith("-ggml"):
            from tandem.actors.ggml_kernel import torch_at_one_thread

            return torch_at_one_thread()
        return contextlib.nullcontext()

    @torch.inference_mode()
    def forward_stage(
        self, seqs: Sequence[SequenceState], starts: Sequence[int], inputs: Sequence
    ) -> list[torch.Tensor]:
        """One pipeline stage for a batch: each sequence is first cut back to `starts[i]`
        (rejected positions from an earlier round are dropped lazily here, so a rollback
        never needs its own call), then inputs[i] - token ids on the first stage, hidden
        states [n, hidden] on later ones - go through this stage's layers. Returns hidden
        states [n, hidden], or logits [n, vocab] (float32) on the last stage."""
        rows = []
        for seq, start, x in zip(seqs, starts, inputs):
            if start > seq.length:
                raise RuntimeError(f"stage got position {start} beyond its {seq.length} cached tokens")
            self.rollback(seq, start)
            if self.is_first:
                block = [int(t) for t in x]
                hidden = self.embed[torch.tensor(block, dtype=torch.long, device=self.device)]
                seq.tokens.extend(block)
            else:
                hidden = torch.as_tensor(x, device=self.device).to(self.dtype)
                seq.tokens.extend([-1] * hidden.shape[0])  # positions only; ids live on stage 0
            self._ensure_capacity(seq, start + hidden.shape[0])
            rows.append(_Row(seq=seq, start=start, hidden=hidden, n_new=hidden.shape[0]))
        t0 = time.perf_counter()
        self._run_layers(rows, 0, self.num_layers)
        self.timings.add(time.perf_counter() - t0)
        if self.is_last:
            # one head call for all rows (as extend_batch's), split per sequence
            logits = self.head(self._rms(torch.cat([r.hidden for r in rows]), self.final_norm)).float()
            return list(logits.split([r.hidden.shape[0] for r in rows]))
        return [r.hidden for r in rows]

    # ------------------------------------------------------------------ internals
    def _run_to(self, rows: list[_Row], *, lo: int, depth: int) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        seg_lo = lo
        for seg_hi in [e for e in self.exits if e > lo and e <= depth]:
            for row in rows:
                self._prepend_lazy(row, seg_lo)
            with self._threads(self.forward_rows([r.hidden.shape[0] for r in rows])):
                self._run_layers(rows, seg_lo, seg_hi)
            seg_lo = seg_hi
        out = []
        for row in rows:
            seq = row.seq
            if depth < self.num_layers and seq.hidden is not None:
                # Keep the state at this depth for the lazy fill of deeper layers later.
                seq.hidden[row.start : row.start + row.hidden.shape[0]] = row.hidden
            out.append(row.hidden[row.hidden.shape[0] - row.n_new :])
        self.timings.add(time.perf_counter() - t0)
        return out

    def _prepend_lazy(self, row: _Row, layer: int) -> None:
        """Tokens that earlier stopped at depth `layer` join this forward from there."""
        seq = row.seq
        f = seq.filled[layer]
        if f < row.start:
            assert seq.hidden is not None
            row.hidden = torch.cat([seq.hidden[f : row.start], row.hidden], dim=0)
            row.start = f

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.ops.rms(x, weight)  # float32 statistics, scaled in the compute dtype

    def _add_down(self, x: torch.Tensor, layer: _Layer, h: torch.Tensor, li: int, hi: int):
        """The MLP of layer li on its normed input h, added to x; with the next layer's input
        norm when one follows in this run (x, that norm), else (x, None)."""
        delta = layer.down(self.ops.silu_mul(layer.gate_up(h)))
        if li + 1 < hi:
            return self.ops.add_rms(x, delta, self.layers[li + 1].input_norm)
        return x + delta, None

    def _run_layers(self, rows: list[_Row], lo: int, hi: int) -> None:
        """Run layers [lo, hi) for every row; updates rows in place. Rows of different lengths
        run packed (_run_layers_packed): none is padded to the longest. Rows of one length
        (nothing to pad: a batch of decode steps) run as one padded batch, whose single
        attention call beat the packed path's call per row there (bench/packed_rows.py)."""
        if len(rows) == 1 and self._lean is not None:
            n = rows[0].hidden.shape[0]
            if self.ops.attends(n, self.head_dim) and self._lean.takes(n):
                return self._run_layers_lean(rows[0], lo, hi)
        if len(rows) > 1 and self.packed and len({r.hidden.shape[0] for r in rows}) > 1:
            return self._run_layers_packed(rows, lo, hi)
        return self._run_layers_padded(rows, lo, hi)

    def _run_layers_lean(self, row: _Row, lo: int, hi: int) -> None:
        """_run_layers_padded for one sequence's block, on the layers bound at load
        (actors/lean_layers.py): the same calls, the same values, less Python between them."""
        from tandem.actors.ggml_kernel import matmul_threads

        s, n = row.start, row.hidden.shape[0]
        pos = torch.arange(s, s + n, device=self.device).clamp(max=self.max_context)
        self._ensure_capacity(row.seq, min(s + n, self.max_context))
        row.hidden = self._lean.run(
            row.hidden.contiguous(), lo, hi, keys=row.seq.keys, values=row.seq.values, start=s,
            rope=self.ops.rope_tables(self.cos, self.sin, pos), heads=self.num_heads, kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, threads=matmul_threads(),
        )
        row.seq.filled[lo:hi] = [s + n] * (hi - lo)

    def _run_layers_packed(self, rows: list[_Row], lo: int, hi: int) -> None:
        """Every row's tokens concatenated into one [1, T, hidden] batch for the linear layers
        (T = the rows' total, not rows x the longest), attention per row against its own
        cache (no copy of the caches into one padded tensor). Measured on the 1.5B pack,
        2 cores: see bench/results/packed_rows.json."""
        ns = [r.hidden.shape[0] for r in rows]
        offs = [0]
        for n in ns:
            offs.append(offs[-1] + n)
        H, hd, kvh, g = self.num_heads, self.head_dim, self.num_kv_heads, self.groups
        dev = self.device
        x = torch.cat([r.hidden for r in rows])[None]  # [1, T, hidden]
        starts = [r.start for r in rows]
        pos = torch.cat([torch.arange(s, s + n, device=dev) for s, n in zip(starts, ns)]).clamp(max=self.max_context)
        rope = self.ops.rope_tables(self.cos, self.sin, pos)
        for r, s, n in zip(rows, starts, ns):
            self._ensure_capacity(r.seq, min(s + n, self.max_context))
        ops = self.ops
        # blocks ops.attends() takes attend in one C++ call (decode and verification blocks),
        # the rest (prefill chunks) one by one in torch
        in_ops = [i for i, n in enumerate(ns) if ops.attends(n, hd)]
        in_torch = [i for i, n in enumerate(ns) if not ops.attends(n, hd)]
        # per row with more than one query: [1, 1, g * n, s + n], query j sees keys <= s + j
        masks: dict[int, torch.Tensor | None] = {}
        for i in in_torch:
            s, n = starts[i], ns[i]
            if n == 1:
                masks[i] = None  # a single query sees every cached key
                continue
            m = torch.arange(s + n, device=dev)[None, :] <= torch.arange(s, s + n, device=dev)[:, None]
            masks[i] = (m.repeat(g, 1) if g > 1 else m)[None, None]
        T = offs[-1]
        h = ops.rms(x, self.layers[lo].input_norm)
        for li in range(lo, hi):
            layer = self.layers[li]
            qkv = layer.qkv(h)[0].contiguous()  # [T, (H + 2 kvh) * hd]
            q, k = ops.rope_qk(qkv, rope, H, kvh, hd)  # [T, H, hd], [T, kvh, hd]
            v = qkv[:, (H + kvh) * hd :].view(T, kvh, hd)
            att = torch.empty(T, H * hd, dtype=x.dtype, device=dev)
            if in_ops:
                ops.attend(qkv, H, kvh, hd, [rows[i].seq.keys[li] for i in in_ops], [rows[i].seq.values[li] for i in in_ops],
                           [offs[i] for i in in_ops], [starts[i] for i in in_ops], [ns[i] for i in in_ops], att)
            for i in in_torch:
                r, s, n, o = rows[i], starts[i], ns[i], offs[i]
                r.seq.keys[li][:, s : s + n] = k[o : o + n].transpose(0, 1)
                r.seq.values[li][:, s : s + n] = v[o : o + n].transpose(0, 1)
                keys = r.seq.keys[li][None, :, : s + n]  # [1, kvh, L, hd]
                vals = r.seq.values[li][None, :, : s + n]
                # GQA packed into the query dimension: [1, kvh, g * n, hd]
                qp = q[o : o + n].transpose(0, 1).reshape(1, kvh, g * n, hd)
                a = F.scaled_dot_product_attention(qp, keys, vals, attn_mask=masks[i])
                att[o : o + n] = a.reshape(H, n, hd).transpose(0, 1).reshape(n, H * hd)
            x, h = ops.add_rms(x, layer.o(att[None]), layer.post_norm)
            x, h = self._add_down(x, layer, h, li, hi)
        for i, r in enumerate(rows):
            r.hidden = x[0, offs[i] : offs[i + 1]]
            r.seq.filled[lo:hi] = [r.start + ns[i]] * (hi - lo)

    def _run_layers_padded(self, rows: list[_Row], lo: int, hi: int) -> None:
        """Run layers [lo, hi) for every row (padded to one batch); updates rows in place."""
        B = len(rows)
        ns = [r.hidden.shape[0] for r in rows]
        nmax = max(ns)
        H, hd, kvh, g = self.num_heads, self.head_dim, self.num_kv_heads, self.groups
        if B == 1:
            x = rows[0].hidden[None]  # [1, n, hidden]
        else:
            x = torch.zeros(B, nmax, self.hidden_size, dtype=self.dtype, device=self.device)
            for i, r in enumerate(rows):
                x[i, : ns[i]] = r.hidden
        starts = [r.start for r in rows]
        # positions of the query tokens: [B, nmax] (padding continues the count; discarded)
        dev = self.device
        pos = torch.tensor(starts, device=dev)[:, None] + torch.arange(nmax, device=dev)[None, :]
        pos = pos.clamp(max=self.max_context)
        rope = self.ops.rope_tables(self.cos, self.sin, pos)
        kv_len = min(max(s + nmax for s in starts), self.max_context)
        for r in rows:
            self._ensure_capacity(r.seq, kv_len)
        ops = self.ops
        # every row's attention in one C++ call (ops.attend: decode and verification blocks)
        in_ops = all(ops.attends(n, hd) for n in ns)
        # Boolean mask [B, 1, g * nmax, kv_len]: query j of row i sees keys <= start_i + j.
        # Not needed for a single decode token (it sees every cached key).
        mask = None
        if not (B == 1 and nmax == 1) and not in_ops:
            key_pos = torch.arange(kv_len, device=dev)[None, None, :]  # [1, 1, kv_len]
            mask = key_pos <= pos[:, :, None]  # [B, nmax, kv_len]
            mask = mask[:, None].repeat(1, 1, g, 1) if g > 1 else mask[:, None]
        h = ops.rms(x, self.layers[lo].input_norm)
        for li in range(lo, hi):
            layer = self.layers[li]
            qkv = layer.qkv(h).contiguous()  # [B, n, (H + 2 kvh) * hd]
            q, k = ops.rope_qk(qkv, rope, H, kvh, hd)  # [B, n, H, hd], [B, n, kvh, hd]
            if in_ops:  # padding rows (ns[i] < nmax) stay zero and are dropped below
                att = (torch.empty if min(ns) == nmax else torch.zeros)(B * nmax, H * hd, dtype=x.dtype, device=dev)
                ops.attend(qkv.view(B * nmax, -1), H, kvh, hd, [r.seq.keys[li] for r in rows],
                           [r.seq.values[li] for r in rows], [i * nmax for i in range(B)], starts, ns, att)
                att = att.view(B, nmax, H * hd)
            else:
                q, k = q.transpose(1, 2), k.transpose(1, 2)
                v = qkv[..., (H + kvh) * hd :].view(B, nmax, kvh, hd).transpose(1, 2)
                if B == 1:
                    seq, s, n = rows[0].seq, starts[0], ns[0]
                    seq.keys[li][:, s : s + n] = k[0, :, :n]
                    seq.values[li][:, s : s + n] = v[0, :, :n]
                    keys = seq.keys[li][None, :, : s + n]  # [1, kvh, L, hd]
                    vals = seq.values[li][None, :, : s + n]
                    m = mask[..., : s + n] if mask is not None else None
                else:
                    for i, r in enumerate(rows):
                        s, n = starts[i], ns[i]
                        r.seq.keys[li][:, s : s + n] = k[i, :, :n]
                        r.seq.values[li][:, s : s + n] = v[i, :, :n]
                    keys = torch.stack([r.seq.keys[li][:, :kv_len] for r in rows])
                    vals = torch.stack([r.seq.values[li][:, :kv_len] for r in rows])
                    m = mask
                # GQA packed into the query dimension: [B, kvh, g * n, hd] (no repeat of K/V)
                qp = q.reshape(B, kvh, g * nmax, hd)
                att = F.scaled_dot_product_attention(qp, keys, vals, attn_mask=m)
                att = att.reshape(B, H, nmax, hd).transpose(1, 2).reshape(B, nmax, H * hd)
            x, h = ops.add_rms(x, layer.o(att), layer.post_norm)
            x, h = self._add_down(x, layer, h, li, hi)
        for i, r in enumerate(rows):
            r.hidden = x[i, : ns[i]]
            r.seq.filled[lo:hi] = [r.start + ns[i]] * (hi - lo)


def _adapter_on(adapter, device: torch.device):
    """An exit adapter (a torch module, or any callable) with its parameters on `device`."""
    return adapter.to(device) if isinstance(adapter, torch.nn.Module) else adapter
