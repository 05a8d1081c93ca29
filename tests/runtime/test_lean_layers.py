"""The lean forward of one sequence's block (actors/lean_layers.py) against the runner's
general one: bit for bit the same logits and caches, on a tiny random model on ggml's
kernels with the fused ops (skipped where those are not built, and off the CPU)."""

from __future__ import annotations

import pytest
import torch

from tandem.actors.lean_layers import LeanLayers


def _runs(runner) -> list[int]:
    """Counts the lean forwards from here on (rows of each)."""
    calls: list[int] = []
    run = runner._lean.run

    def counted(x, *a, **k):
        calls.append(x.shape[0])
        return run(x, *a, **k)

    runner._lean.run = counted
    return calls


def _steps(runner, *, lean: bool, prompt, blocks):
    """Logits of each block fed after the prompt (with a rollback between), lean or not."""
    keep = runner._lean
    runner._lean = keep if lean else None
    try:
        seq = runner.new_sequence(256)
        out = [runner.prefill(seq, prompt).clone()]
        for block, back in blocks:
            out.append(runner.extend(seq, block).clone())
            if back:
                runner.rollback(seq, seq.length - back)
        return out, [k[:, : seq.length].clone() for k in seq.keys]
    finally:
        runner._lean = keep


def test_lean_blocks_equal_the_general_forward_bit_for_bit(tmp_path, monkeypatch, runner_device):
    from tests.runtime.conftest import ggml_bf16_runner

    r = ggml_bf16_runner(tmp_path, monkeypatch, runner_device)
    assert isinstance(r._lean, LeanLayers)
    calls = _runs(r)
    prompt = [(5 * i + 2) % r.vocab_size for i in range(40)]
    # decode steps, verification blocks (one rolled back in part), a block past the bound
    blocks = [([7], 0), ([8], 0), ([1, 2, 3, 4, 5], 2), ([9], 0), ([3, 4], 0)]
    lean, lean_keys = _steps(r, lean=True, prompt=prompt, blocks=blocks)
    assert calls[-5:] == [1, 1, 5, 1, 2], calls  # (the prompt too, where its 40 rows are within the bound)
    calls.clear()
    general, general_keys = _steps(r, lean=False, prompt=prompt, blocks=blocks)
    assert not calls
    for a, b in zip(lean, general):
        assert torch.equal(a, b)
    for a, b in zip(lean_keys, general_keys):
        assert torch.equal(a, b)
    # control: the comparison tells a lean forward that differs (a layer's norm scaled)
    layer = list(r._lean.layers[1])
    layer[5] = layer[5] * 1.01
    r._lean.layers[1] = tuple(layer)
    changed, _ = _steps(r, lean=True, prompt=prompt, blocks=blocks[:1])
    assert not torch.equal(changed[1], general[1])


def test_lean_blocks_stop_at_the_quantized_row_bound_and_skip_batches(tmp_path, monkeypatch, runner_device):
    from tests.runtime.conftest import ggml_bf16_runner

    r = ggml_bf16_runner(tmp_path, monkeypatch, runner_device)
    calls = _runs(r)
    bound = r.quant_max_rows
    try:
        for lin in r._quant_linears():
            lin.max_rows = 2  # longer blocks run on the dense weights: the general forward
        seq = r.new_sequence(64)
        r.prefill(seq, [1, 2, 3, 4])
        calls.clear()
        r.extend(seq, [5, 6, 7])
        assert calls == []
        r.extend(seq, [8, 9])
        assert calls == [2]
    finally:
        for lin in r._quant_linears():
            lin.max_rows = bound
    # several sequences in one forward: the general (batched) forward
    a, b = r.new_sequence(64), r.new_sequence(64)
    r.prefill(a, [1, 2, 3])
    r.prefill(b, [4, 5, 6])
    calls.clear()
    r.extend_batch([a, b], [[7], [8]])
    assert calls == []


def test_no_lean_forward_off_ggml_or_the_fused_ops(tiny_paths, runner_device):
    from tandem.actors.runner import ModelRunner

    dense = ModelRunner(tiny_paths[0], dtype="float32", device=runner_device)
    assert dense._lean is None
    if runner_device == "cpu":
        quant = ModelRunner(tiny_paths[0], dtype="bfloat16", quantize="int8", device=runner_device)
        assert quant.ops.name == "torch" and quant._lean is None
    else:
        pytest.skip("quantized kernels are the CPU's")
