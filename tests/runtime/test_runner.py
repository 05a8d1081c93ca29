"""The model runner against the transformers reference, on tiny random models in float32:
extend, rollback then extend (== a fresh prefill), batched verification with different
lengths, multi-exit forwards with lazy deeper KV, pipeline stages, quantized drafts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tandem.actors.kv_cache import ContextLengthError
from tandem.actors.runner import ModelRunner

TOL = 1e-5
TOL_BATCH = 1e-4  # padded batches block the matmuls differently: ~2e-5 apart in float32


def close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 1e-5) -> bool:
    """The runner's output (on its device) against a CPU reference."""
    return torch.allclose(got.cpu(), want.cpu(), atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def ref(tiny_paths):
    path = tiny_paths[1]  # 4 layers
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = torch.tensor([[0, 3, 1, 4, 2, 5, 1, 1, 2, 3, 0, 4, 5, 5, 2, 1]])
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    return path, model, tokens[0].tolist(), out.logits[0], out.hidden_states


def test_extend_in_pieces_matches_one_forward(ref, runner_device):
    path, _, tokens, logits, _ = ref
    r = ModelRunner(path, dtype="float32", device=runner_device)
    s = r.new_sequence(capacity=4)  # forces the cache to grow
    got = torch.cat([r.extend(s, tokens[:5]), r.extend(s, tokens[5:6]), r.extend(s, tokens[6:])])
    assert close(got, logits, atol=TOL)
    assert s.length == len(tokens)


def test_rollback_then_extend_equals_fresh_prefill(ref, runner_device):
    path, _, tokens, logits, _ = ref
    r = ModelRunner(path, dtype="float32", device=runner_device)
    s = r.new_sequence()
    r.extend(s, tokens)
    for cut in (12, 7, 1):
        r.rollback(s, cut)
        assert s.length == cut and s.tokens == tokens[:cut]
        again = r.extend(s, tokens[cut:])
        assert close(again, logits[cut:], atol=TOL), cut
    # a wrong continuation after a rollback leaves no trace
    r.rollback(s, 6)
    r.extend(s, [5, 5, 5])
    r.rollback(s, 6)
    assert close(r.extend(s, tokens[6:]), logits[6:], atol=TOL)


def test_common_prefix_rollback(ref, runner_device):
    path, _, tokens, logits, _ = ref
    r = ModelRunner(path, dtype="float32", device=runner_device)
    s = r.new_sequence()
    r.extend(s, tokens[:10])
    assert r.truncate_to_common_prefix(s, tokens[:4] + [5, 5]) == 4
    assert s.length == 4


@pytest.mark.parametrize("packed", [True, False])
def test_batched_verification_with_different_lengths(ref, runner_device, packed):
    """Both layouts of a batched forward (packed rows, the default; padded to the longest)
    match the reference."""
    path, _, tokens, logits, _ = ref
    r = ModelRunner(path, dtype="float32", device=runner_device)
    r.packed = packed
    seqs = [r.new_sequence() for _ in range(3)]
    prefixes = [3, 9, 6]
    for s, p in zip(seqs, prefixes):
        r.extend(s, tokens[:p])
    blocks = [tokens[3:8], tokens[9:10], tokens[6:16]]
    outs = r.extend_batch(seqs, blocks)
    for out, p, b in zip(outs, prefixes, blocks):
        assert close(out, logits[p : p + len(b)], atol=TOL_BATCH)


@pytest.mark.parametrize("packed", [True, False])
def test_batched_forward_fills_lazy_kv_beside_other_sequences(ref, runner_device, packed):
    """A sequence whose last tokens left at a shallow exit joins a batch at full depth beside
    another one: its lazy tokens ride along (rows of different lengths), both layouts."""
    path, _, tokens, logits, _ = ref
    r = ModelRunner(path, dtype="float32", exits=(2,), device=runner_device)
    r.packed = packed
    a, b = r.new_sequence(), r.new_sequence()
    r.extend(a, tokens[:4])
    for i in (4, 5):
        r.forward_to_depth([a], [[tokens[i]]], depth=2)  # lazy at layers 2..3
    r.extend(b, tokens[:9])
    # a: 2 lazy tokens + 1 new = 3 rows from layer 2 on; b: 4 rows (lengths differ: packed)
    ha, hb = r.forward_to_depth([a, b], [[tokens[6]], tokens[9:13]], depth=4)
    assert close(r.logits_at_exit(ha, 4), logits[6:7], atol=TOL_BATCH)
    assert close(r.logits_at_exit(hb, 4), logits[9:13], atol=TOL_BATCH)
    assert a.filled == [7] * 4 and b.filled == [13] * 4


def test_exit_logits_and_lazy_deeper_kv(ref, runner_device):
    path, model, tokens, logits, hidden = ref
    r = ModelRunner(path, dtype="float32", exits=(2,), device=runner_device)
    s = r.new_sequence()
    r.extend(s, tokens[:4])
    # three tokens leave at exit 2: their layer-2..3 KV is missing
    for i in range(4, 7):
        h = r.forward_to_depth([s], [[tokens[i]]], depth=2)[0]
        with torch.no_grad():
            with torch.device("cpu"):
                want = model.lm_head(model.model.norm(hidden[2][0, i : i + 1]))
        assert close(r.logits_at_exit(h, 2), want, atol=TOL)
    assert s.filled == [7, 7, 4, 4]
    # one token continues to the full depth at once (S2D: its exit was not confident)
    h = r.forward_to_depth([s], [[tokens[7]]], depth=2)[0]
    h = r.continue_to_depth(s, h, from_depth=2, depth=4)
    assert close(r.logits_at_exit(h, 4), logits[7:8], atol=TOL)
    assert s.filled == [8, 8, 8, 8]  # the lazy tokens were filled on the way
    assert close(r.extend(s, tokens[8:]), logits[8:], atol=TOL)


class _CountingHead:
    """A head that counts its calls and the rows it was given."""

    def __init__(self, head):
        self.head, self.calls, self.rows = head, 0, 0

    def __call__(self, x):
        self.calls += 1
        self.rows += x.shape[0]
        return self.head(x)


def test_a_batched_forward_runs_the_head_once(ref, runner_device):
    """The head streams its whole weight per call, so a forward over several sequences gives
    it every sequence's rows at once (one call), on a full runner and on a pipeline's last
    stage; each sequence still gets its own logits (checked against the reference)."""
    path, _, tokens, logits, _ = ref
    r = ModelRunner(path, dtype="float32", device=runner_device)
    assert r.full_head is None  # the head logits_at_exit uses at full depth is r.head
    seqs = [r.new_sequence() for _ in range(3)]
    for s, p in zip(seqs, (3, 9, 6)):
        r.extend(s, tokens[:p])
    r.head = counting = _CountingHead(r.head)
    outs = r.extend_batch(seqs, [tokens[3:4], tokens[9:12], tokens[6:7]], all_logits=[True, False, True])
    assert (counting.calls, counting.rows) == (1, 3)  # 1 + the last of 3 + 1 rows
    for out, want in zip(outs, (logits[3:4], logits[11:12], logits[6:7])):
        assert close(out, want, atol=TOL_BATCH)

    stages = [ModelRunner(path, dtype="float32", layer_range=rng, device=runner_device) for rng in ((0, 2), (2, 4))]
    stages[-1].head = counting = _CountingHead(stages[-1].head)
    pairs = [(st.new_sequence(), st.new_sequence()) for st in stages]
    x = [tokens[:5], tokens[:9]]
    for st, ss in zip(stages, pairs):
        x = st.forward_stage(list(ss), [0, 0], x)
    assert counting.calls == 1 and [t.shape[0] for t in x] == [5, 9]
    assert close(x[0], logits[:5], atol=TOL_BATCH) and close(x[1], logits[:9], atol=TOL_BATCH)


def test_pipeline_stages_chain_to_the_full_model(ref, runner_device):
    path, _, tokens, logits, _ = ref
    stages = [ModelRunner(path, dtype="float32", layer_range=rng, device=runner_device) for rng in ((0, 1), (1, 3), (3, 4))]
    seqs = [st.new_sequence() for st in stages]
    x = [tokens[:9]]
    for st, s in zip(stages, seqs):
        x = st.forward_stage([s], [0], x)
    assert close(x[0], logits[:9], atol=TOL)
    x = [tokens[5:]]  # re-start at 5: every stage cuts its cache back first
    for st, s in zip(stages, seqs):
        x = st.forward_stage([s], [5], x)
    assert close(x[0], logits[5:], atol=TOL)


def _dequantized(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The weights the quantized kernels should be computing with (the formulas of
    actors.kernels.QuantLinear, written out independently)."""
    w = weight.float()
    if kind == "int8":
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        return torch.round(w / scale[:, None]).clamp(-127, 127) * scale[:, None]
    out_f, in_f = w.shape
    wg = w.view(out_f, in_f // 32, 32)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return ((q - 8) * scale[..., None] + (lo + 8 * scale)[..., None]).view(out_f, in_f)


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3])
def test_quantized_kernels_compute_the_quantized_weights(tiny_service_models, kind, rows, runner_device, monkeypatch):
    """Every projection of a quantized draft against a dense matmul with its dequantized
    weights (so packing, scales and zero points are right); a prefill (many rows) takes
    the dense weights. torch's kernels (TANDEM_GGML=off): ggml's Q4_0 for int4 is checked
    against its own bound in tests/unit/test_ggml_kernel.py."""
    from tandem.actors import ggml_kernel

    monkeypatch.setenv(ggml_kernel.ENV_SWITCH, "off")
    r = ModelRunner(tiny_service_models["draft"], dtype="float32", quantize=kind, device=runner_device)
    if runner_device != "cpu":
        assert r.kernel == "dense"  # the packed kernels are CPU kernels (actors/kernels.py)
        return
    assert r.kernel == kind
    torch.manual_seed(0)
    for layer in r.layers:
        for lin in (layer.qkv, layer.o, layer.gate_up, layer.down):
            x = torch.randn(rows, lin.weight.shape[1], device="cpu")
            want = x @ (_dequantized(lin.weight, kind) if rows <= lin.max_rows else lin.weight).t()
            if lin.bias is not None:
                want = want + lin.bias
            assert close(lin(x), want, atol=1e-4, rtol=1e-4)
            assert lin.max_rows == r.quant_max_rows  # the runner's measured crossover, on every linear
            many = torch.randn(lin.max_rows + 1, lin.weight.shape[1], device="cpu")
            assert close(lin(many), many @ lin.weight.t() + (lin.bias if lin.bias is not None else 0), atol=1e-4)
            up_to = torch.randn(lin.max_rows, lin.weight.shape[1], device="cpu")
            assert close(lin(up_to), up_to @ _dequantized(lin.weight, kind).t() + (lin.bias if lin.bias is not None else 0),
                         atol=1e-4, rtol=1e-4)


def test_quantized_kernel_serves_blocks_up_to_the_measured_crossover():
    """choose_quant_max_rows: the quantized kernel serves every row count up to the first one
    at which the dense weight measured faster (an AVX2-only host, where bf16 is emulated,
    keeps it for long blocks; an avx512_bf16 host hands 9+ rows to the dense weight)."""
    from tandem.actors.kernels import QuantLinear, choose_quant_max_rows

    avx512 = choose_quant_max_rows({16: 2.6}, {16: 1.7})
    avx2 = choose_quant_max_rows({16: 2.6, 32: 5.0, 64: 9.0}, {16: 10.0, 32: 11.0, 64: 8.5})
    assert (avx512, avx2) == (8, 32)
    # never below 8 rows, whatever was measured: blocks a verification sends run the kernel a
    # single-row step runs (the pack test below fails greedy equality without this floor)
    assert choose_quant_max_rows({16: 2.0}, {16: 1.0}) == 8 == QuantLinear.QUANT_MAX_ROWS


def test_crossover_measurement_keeps_the_median_rep(monkeypatch):
    """measure_quant_max_rows on a fake clock: forwards whose quantized side costs 2 units a
    row count up to 64 rows and 20 at 128, the dense side 6. One rep of each row count's
    quantized side is slowed 40x (another actor loading beside it): the median of 5 reps
    still reads 64; the same trace read with a single rep (the control) reads 8, stopping at
    the slowed 16."""
    import time

    from tandem.actors.kernels import QuantLinear, measure_quant_max_rows

    clock = [0.0]
    bound = [QuantLinear.QUANT_MAX_ROWS]
    calls: dict[int, int] = {}
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    def forward(rows: int) -> None:
        quantized = bound[0] >= rows
        if quantized:
            calls[rows] = calls.get(rows, 0) + 1
        cost = (2.0 if rows <= 64 else 20.0) if quantized else 6.0
        clock[0] += cost * (40 if quantized and calls[rows] == 2 else 1)  # its first timed rep

    def set_bound(n: int) -> None:
        bound[0] = n

    assert measure_quant_max_rows(forward, set_bound) == 64
    calls.clear()
    assert measure_quant_max_rows(forward, set_bound, reps=1) == QuantLinear.QUANT_MAX_ROWS


def test_restricted_head_maps_columns_to_token_ids(tiny_paths, runner_device):
    path = tiny_paths[1]
    full = ModelRunner(path, dtype="float32", device=runner_device)
    part = ModelRunner(path, dtype="float32", head_ids=[0, 2, 5], device=runner_device)
    a = full.extend(full.new_sequence(), [1, 2, 3])
    b = part.extend(part.new_sequence(), [1, 2, 3])
    assert b.shape[-1] == 3 and close(b, a[:, [0, 2, 5]], atol=TOL)


def test_context_and_argument_errors(tiny_paths, runner_device):
    r = ModelRunner(tiny_paths[0], dtype="float32", max_context=16, device=runner_device)
    s = r.new_sequence()
    with pytest.raises(ContextLengthError, match="context"):
        r.extend(s, [1] * 17)
    with pytest.raises(ValueError, match="exits"):
        ModelRunner(tiny_paths[0], dtype="float32", exits=(7,))
    with pytest.raises(ValueError, match="quantize"):
        ModelRunner(tiny_paths[0], dtype="float32", quantize="int3")
    with pytest.raises(ValueError, match="layer_range"):
        ModelRunner(tiny_paths[0], dtype="float32", layer_range=(1, 9))
    with pytest.raises(ValueError, match="prompt"):
        r.prefill(r.new_sequence(), [])


def test_every_tensor_lives_on_the_runners_device(ref, runner_device):
    """Weights, KV caches, rotary tables and the logits all sit on the device the runner was
    given (for "auto", the one resolve_device picks)."""
    path, _, tokens, _, _ = ref
    r = ModelRunner(path, dtype="float32", exits=(2,), device=runner_device)
    want = torch.device(runner_device).type
    s = r.new_sequence()
    out = r.extend(s, tokens[:5])
    layer = r.layers[0]
    tensors = [r.embed, r.final_norm, r.cos, r.sin, layer.input_norm, layer.qkv.weight, r.head.weight, out, s.hidden]
    tensors += s.keys + s.values
    assert {t.device.type for t in tensors} == {want}
    assert str(r.device).startswith(want)


class _ForgetfulRunner(ModelRunner):
    """A runner with the bug the discipline exists for: its KV cache is made without device=."""

    def new_sequence(self, capacity: int = 256):
        seq = super().new_sequence(capacity)
        seq.keys = [torch.zeros(k.shape, dtype=k.dtype) for k in seq.keys]  # no device=
        return seq


def test_a_forgotten_device_fails_under_the_discipline(ref, runner_device):
    """Negative control for the device discipline (tests/runtime/conftest.py): the same
    forward with a KV cache made without device= raises here, on a CPU-only machine."""
    path, _, tokens, _, _ = ref
    r = _ForgetfulRunner(path, dtype="float32", device=runner_device)
    with pytest.raises((RuntimeError, NotImplementedError)):
        r.extend(r.new_sequence(), tokens[:5])


def _write_tiny_grid(src: str, dest) -> None:
    """A copy of a tiny model whose linears sit on a group-32 4-bit grid, with the grid file
    a pack gets (actors/kernels.py PackGrid format) for all of them but v_proj and the head
    (as in the real 1.5B pack, where some are Q6_K): the runner then mixes grid int4, int8
    and a ConcatLinear for q/k/v."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tandem.actors.kernels import PACK_GRID_FILE
    from tandem.deploy.pack_grid import pack_nibbles

    shutil.copytree(src, dest)
    weights_file = next(p for p in dest.glob("*.safetensors"))
    weights = load_file(str(weights_file))
    grid = {}
    with torch.device("cpu"):
        for name, w in list(weights.items()):
            if not name.endswith("_proj.weight") or "v_proj" in name:
                continue
            out_f, in_f = w.shape
            wg = w.float().view(out_f, in_f // 32, 32)
            lo, hi = wg.amin(-1), wg.amax(-1)
            scale = ((hi - lo) / 15).clamp(min=1e-8)
            codes = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
            weights[name] = (codes.float() * scale[..., None] + lo[..., None]).view(out_f, in_f).to(w.dtype)  # on the grid
            base = name[: -len(".weight")]
            grid[f"{base}.codes"] = torch.from_numpy(pack_nibbles(codes.view(out_f, in_f).numpy()))
            grid[f"{base}.scale"] = scale.contiguous()
            grid[f"{base}.min"] = (-lo).contiguous()
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    save_file(grid, str(dest / PACK_GRID_FILE))


@pytest.mark.parametrize("use_ggml", [False, True], ids=["torch-kernels", "ggml"])
def test_pack_grid_is_served_as_stored(tiny_service_models, tmp_path, runner_device, use_ggml, monkeypatch):
    """quantize="pack": each grid linear computes x @ W_grid^T (float32, to 1e-5) on the int4
    kernel (the tiny grid has no GGUF rows: its widths are not multiples of Q4_K's 256), the
    rest int8, or ggml's Q8_0 where ggml is built and switched on (within its 8-bit
    activations' bound; torch's ops at one thread in a forward, ggml's on the runner's);
    greedy speculation over a pack target equals its own target-only output (lossless w.r.t.
    the target as served). A folder without a grid is refused."""
    from tandem.actors import ggml_kernel
    from tandem.actors.kernels import ConcatLinear, QuantLinear
    from tandem.actors.local import LocalEngine, ThreadSplit

    if use_ggml and ggml_kernel.load() is None:
        pytest.skip(f"ggml kernels: {ggml_kernel.build_status()[1]}")
    monkeypatch.setenv(ggml_kernel.ENV_SWITCH, "on" if use_ggml else "off")
    other = "ggml" if use_ggml else "int8"
    folder = tmp_path / "packed"
    _write_tiny_grid(tiny_service_models["small"], folder)
    r = ModelRunner(str(folder), dtype="float32", quantize="pack", device=runner_device)
    if runner_device != "cpu":
        assert r.kernel == "dense"
        return
    assert r.kernel == ("pack-ggml" if use_ggml else "pack")
    layer = r.layers[0]
    assert isinstance(layer.qkv, ConcatLinear) and [p.kind for p in layer.qkv.parts] == ["int4", "int4", other]
    assert isinstance(layer.gate_up, QuantLinear) and layer.gate_up.kind == "int4" and r.head.kind == other
    for lin in (layer.o, layer.gate_up, layer.down, layer.qkv.parts[0]):
        x = torch.randn(3, lin.weight.shape[1], device="cpu")
        assert close(lin(x), x @ lin.weight.t() + (lin.bias if lin.bias is not None else 0), atol=1e-5)
    if use_ggml:
        from tests.unit.test_ggml_kernel import activation_bound

        # torch's own ops run at one thread inside a forward, ggml's matmuls on the runner's
        seen = []
        rms = r._rms
        r._rms = lambda x, w: (seen.append(torch.get_num_threads()), rms(x, w))[1]
        before = torch.get_num_threads()
        torch.set_num_threads(2)
        bound = r.quant_max_rows
        try:
            r.extend(r.new_sequence(), [1, 2, 3])
            assert seen and set(seen) == {1} and torch.get_num_threads() == 2
            # past the runner's row bound the linears run on the dense weights, torch's own
            # matmuls: that forward keeps torch's threads (the one above, within it, is the control)
            r.quant_max_rows = 2
            for lin in r._quant_linears():
                lin.max_rows = 2
            seen.clear()
            r.extend(r.new_sequence(), [1, 2, 3])
            assert seen and set(seen) == {2} and torch.get_num_threads() == 2
            # the row bound is measured with those threads on each side: a forward timed on the
            # dense weights at torch's, one timed on ggml's kernels with torch's at one
            sides: dict[bool, set] = {True: set(), False: set()}
            rope = r.ops.rope_tables
            r.ops.rope_tables = lambda c, s, pos: (sides[pos.numel() > layer.gate_up.max_rows].add(torch.get_num_threads()),
                                                    rope(c, s, pos))[1]
            try:
                r._calibrate_quant_rows()
            finally:
                del r.ops.rope_tables
            assert sides == {True: {2}, False: {1}}, sides
        finally:
            torch.set_num_threads(before)
            r._rms = rms
            r.quant_max_rows = bound
            for lin in r._quant_linears():
                lin.max_rows = bound

        v = layer.qkv.parts[2]
        served = ggml_kernel.dequantize_rows(ggml_kernel.quantize_rows(v.weight, "Q8_0"), "Q8_0", v.weight.shape[1])
        x = torch.randn(3, v.weight.shape[1], device="cpu")
        err = (v(x) - (x @ served.t() + (v.bias if v.bias is not None else 0))).abs()
        assert (err <= activation_bound(x, served, 32) + 1e-6).all()
    draft = ModelRunner(tiny_service_models["draft"], dtype="float32", device=runner_device)
    with LocalEngine(r, draft, threads=1, split=ThreadSplit(target=1, draft=1)) as eng:
        ref = eng.generate([1, 2, 3], method="ar", max_new_tokens=24).tokens
        for method in ("sd", "pearl"):
            assert eng.generate([1, 2, 3], method=method, max_new_tokens=24, draft_len=3).tokens == ref, method
    with pytest.raises(ValueError, match="quantize: 'pack'.*grid_q4k"):
        ModelRunner(tiny_service_models["small"], dtype="float32", quantize="pack", device=runner_device)


def test_block_costs_time_each_block_size(ref, runner_device):
    """actors/block_costs.py: one positive time per block size, measured on the runner as it
    serves (under the device discipline): a short context, a warm-up, each size `reps` times."""
    from tandem.actors.block_costs import CONTEXT, measure_block_costs

    path = ref[0]
    r = ModelRunner(path, dtype="float32", device=runner_device)
    calls = []
    extend = r.extend
    r.extend = lambda seq, tokens, **kw: (calls.append(len(tokens)), extend(seq, tokens, **kw))[1]
    costs = measure_block_costs(r, 5, reps=2)
    assert len(costs) == 5 and all(c > 0 for c in costs)
    assert calls == [CONTEXT, 1] + [k for k in range(1, 6) for _ in range(2)]
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        measure_block_costs(r, 0)


def test_batch_costs_time_batches_of_blocks(ref, runner_device):
    """measure_batch_costs: one forward of b sequences x block_rows rows per batch size, keyed
    by its rows, on the runner as it serves; the sequences are freed after."""
    from tandem.actors.block_costs import CONTEXT, measure_batch_costs

    r = ModelRunner(ref[0], dtype="float32", device=runner_device)
    calls = []
    extend_batch = r.extend_batch
    r.extend_batch = lambda seqs, blocks, **kw: (calls.append([len(b) for b in blocks]), extend_batch(seqs, blocks, **kw))[1]
    costs = measure_batch_costs(r, 3, [4, 2], reps=1)
    assert sorted(costs) == [6, 12] and all(c > 0 for c in costs.values())
    # four sequences prefilled with a short context, a warm-up, then each size once
    assert calls == [[CONTEXT]] * 4 + [[3, 3], [3, 3], [3, 3, 3, 3]]
    with pytest.raises(ValueError, match="block_rows"):
        measure_batch_costs(r, 0, [2])
    with pytest.raises(ValueError, match="batches"):
        measure_batch_costs(r, 3, [])


def test_verification_reports_the_rows_of_the_forward_it_ran_in(ref, runner_device):
    """Each outcome of a batched verification carries the forward's rows (every sequence's
    block, packed): what the goodput policy prices concurrent requests by."""
    from tandem.actors.drafter import DraftBlock
    from tandem.actors.verifier import Verifier
    from tandem.speculation.sampling import SamplingParams

    v = Verifier(ModelRunner(ref[0], dtype="float32", device=runner_device))
    for key in ("a", "b", "c"):
        v.open(key, [1, 2, 3, 4], sampling=SamplingParams())
    block = DraftBlock(tokens=[1, 2, 3], q=None, exits=[0, 0, 0])
    outs = v.verify_batch(["a", "b", "c"], [block, None, DraftBlock(tokens=[1], q=None, exits=[0])])
    # right after prefill each request holds its next-token logits, so a block of n drafts
    # feeds n rows and an empty block none: a's 3 and c's 1 ran packed as 4 rows; b, served
    # from its held logits, waited for that forward and reports it too
    assert [o.step_rows for o in outs] == [3 + 1] * 3
    assert v.verify("a", None).step_rows == 1  # alone, its last committed token: one row
    outs = v.verify_batch(["a", "b"], [DraftBlock(tokens=[1, 2], q=None, exits=[0, 0]), None])
    assert [o.step_rows for o in outs] == [3 + 1] * 2  # a: last token + 2 drafts; b: its last token
    v.runner.packed = False  # the padded layout computes 2 sequences x 3 rows
    outs = v.verify_batch(["a", "b"], [DraftBlock(tokens=[1, 2], q=None, exits=[0, 0]), None])
    assert [o.step_rows for o in outs] == [2 * 3] * 2


@pytest.mark.parametrize("hidden", [64, 32], ids=["heads-of-16", "heads-of-8"])
def test_blocks_attend_in_cpp_on_ggml_in_bf16(tmp_path, monkeypatch, runner_device, hidden):
    """On ggml's kernels in bf16 (the fused ops), decode steps and verification blocks attend
    in one C++ call a layer (actors/layer_ops.py attend); prefill-sized blocks and heads that
    are not a multiple of 16 keep torch's attention. Cases: one sequence of 1 and of 5 rows,
    3 sequences of one row each (the padded batch) and of 1, 5 and 130 rows (the packed one:
    two blocks in C++, the 130 past a prefill chunk in torch). Each C++ call equals float32 attention over what it
    was handed to rounding, with the rows' k and v in each cache; the logits agree with the
    same runner's on torch's attention (ops.attend_max_rows = 0) to within 10% of their
    largest (this random 2-layer model turns a bf16 ulp in an activation into up to ~3%
    through ggml's 8-bit activations). Control: a sequence whose cache was cut one position
    short is told apart (~150% there)."""
    from tests.runtime.conftest import ggml_bf16_runner, on_cpu
    from tests.unit.test_layer_ops import rounded_from

    r = ggml_bf16_runner(tmp_path, monkeypatch, runner_device, hidden)
    H, kvh, hd = r.num_heads, r.num_kv_heads, r.head_dim
    assert hd == hidden // 4 and r.ops.attends(1, hd) == (hidden == 64)
    cpp_rows = r.ops.attend_max_rows
    calls = []
    attend = r.ops.attend

    def checked(qkv, heads, kv_heads, head_dim, keys, values, offsets, starts, counts, out):
        calls.append(list(counts))
        before = [(k.clone(), v.clone()) for k, v in zip(keys, values)]
        attend(qkv, heads, kv_heads, head_dim, keys, values, offsets, starts, counts, out)
        with on_cpu():
            for (k0, v0), kc, vc, o, s, n in zip(before, keys, values, offsets, starts, counts):
                rows = qkv[o : o + n]
                k0[:, s : s + n] = rows[:, H * hd : (H + kvh) * hd].view(n, kvh, hd).transpose(0, 1)
                v0[:, s : s + n] = rows[:, (H + kvh) * hd :].view(n, kvh, hd).transpose(0, 1)
                assert torch.equal(kc[:, : s + n], k0[:, : s + n]) and torch.equal(vc[:, : s + n], v0[:, : s + n])
                q = rows[:, : H * hd].view(n, H, hd).transpose(0, 1).float()
                kk = k0[:, : s + n].float().repeat_interleave(H // kvh, dim=0)
                vv = v0[:, : s + n].float().repeat_interleave(H // kvh, dim=0)
                mask = torch.arange(s + n)[None, :] <= torch.arange(s, s + n)[:, None]
                ref = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
                assert rounded_from(out[o : o + n], ref.transpose(0, 1).reshape(n, H * hd))

    r.ops.attend = checked
    r._lean = None  # the general forward's calls are checked here; test_lean_layers.py checks the lean one equals it
    prompt = [(3 * i + 1) % r.vocab_size for i in range(140)]  # prefills of 130+ rows: torch's attention

    def logits(blocks, *, in_cpp: bool, cut: int = 0):
        r.ops.attend_max_rows = cpp_rows if in_cpp else 0
        seqs = []
        for i in range(len(blocks)):
            s = r.new_sequence(300)
            r.prefill(s, prompt[: 130 + i])
            r.rollback(s, s.length - cut)
            seqs.append(s)
        return torch.cat(r.extend_batch(seqs, blocks)).float()

    def agree(a, b):
        return float((a - b).abs().max()) <= 0.1 * float(b.abs().max())

    cases = {"1x1": [[5]], "1x5": [[5, 6, 7, 8, 9]], "3x1": [[5], [6], [7]], "mixed": [[5], [5, 6, 7, 8, 9], list(range(1, 131))]}
    try:
        for name, blocks in cases.items():
            calls.clear()
            got = logits(blocks, in_cpp=True)
            in_cpp = [len(b) for b in blocks if len(b) <= cpp_rows] if hidden == 64 else []
            assert calls == ([in_cpp] * r.num_layers if in_cpp else []), (name, calls)  # one call a layer
            assert agree(got, logits(blocks, in_cpp=False)), name
        short = logits([[5, 6, 7, 8, 9]], in_cpp=True, cut=1)
        assert not agree(short, logits([[5, 6, 7, 8, 9]], in_cpp=False))
    finally:
        r.ops.attend_max_rows = cpp_rows
