"""The 1.5B pack served at 4 bits from its own GGUF grid (quantize "pack", issue 10):
- the grid file reproduces the pack's de-quantized weights exactly (every Q4_K linear);
  and, where ggml is built, so do the GGUF's own Q4_K rows as ggml decodes them;
- on ggml (TANDEM_GGML=on, where built) and on torch's kernels (TANDEM_GGML=off), both;
- greedy speculation over the pack target (float32 activations, so the int4 kernel's
  scales are exact; on ggml, its 8-bit activations whatever the block) equals that
  target's own target-only output, token for token.
Own module: its float32 runner must not share memory with test_qwen_greedy's."""

from __future__ import annotations

import glob

import numpy as np
import pytest
import torch

from tandem.actors.local import LocalEngine, ThreadSplit
from tandem.actors.loading import generation_eos_ids
from tandem.actors.runner import ModelRunner
from tests.e2e.conftest import DRAFT, TARGET, code_prompts

pytestmark = pytest.mark.slow


def test_grid_equals_the_converted_weights(pack_paths):
    from safetensors import safe_open

    from tandem.actors import ggml_kernel
    from tandem.deploy.pack_grid import pack_grid_file, unpack_nibbles

    grid = safe_open(str(pack_grid_file(TARGET)), "np")
    where = {}
    for f in glob.glob(f"{pack_paths['target']}/model*.safetensors"):
        with safe_open(f, "np") as h:
            where.update({k: f for k in h.keys()})
    names = [k[: -len(".codes")] for k in grid.keys() if k.endswith(".codes")]
    assert len(names) >= 150  # 168 of the 1.5B's 196 linears are Q4_K
    for base in names[::12]:
        codes = unpack_nibbles(grid.get_tensor(f"{base}.codes")).astype(np.float32)
        scale, minimum = grid.get_tensor(f"{base}.scale"), grid.get_tensor(f"{base}.min")
        w = (codes.reshape(codes.shape[0], -1, 32) * scale[..., None] - minimum[..., None]).reshape(codes.shape)
        with safe_open(where[f"{base}.weight"], "np") as h:
            assert np.array_equal(w, h.get_tensor(f"{base}.weight")), base
        if ggml_kernel.load() is not None:  # the GGUF rows ggml serves decode to the same weights
            rows = torch.from_numpy(grid.get_tensor(f"{base}.rows"))
            got = ggml_kernel.dequantize_rows(rows, "Q4_K", w.shape[1]).numpy()
            assert np.allclose(got, w, rtol=1e-6, atol=1e-7 * np.abs(w).max()), base


@pytest.mark.parametrize("use_ggml", [False, True], ids=["torch-kernels", "ggml"])
def test_speculation_over_a_pack_target_equals_its_target_only_output(pack_paths, qwen_tokenizer, use_ggml, monkeypatch):
    from tandem.actors import ggml_kernel
    from tandem.deploy.models import ModelSpec, build_runner
    from tandem.deploy.pack_grid import draft_quantize, pack_grid_file
    from tandem.deploy.packs import DRAFT_QUANTIZE_DEFAULT

    if use_ggml and ggml_kernel.load() is None:
        pytest.skip(f"ggml kernels: {ggml_kernel.build_status()[1]}")
    monkeypatch.setenv(ggml_kernel.ENV_SWITCH, "on" if use_ggml else "off")

    pack_grid_file(TARGET)
    target = ModelRunner(pack_paths["target"], dtype="float32", quantize="pack")
    # the draft as the server's default config builds it: its own grid and the shipped exits
    quantize = draft_quantize(DRAFT, DRAFT_QUANTIZE_DEFAULT)
    draft = build_runner(ModelSpec(ref=DRAFT, dtype="float32", device="cpu", quantize=quantize, exit_adapters="auto"))
    assert target.kernel == ("pack-ggml" if use_ggml else "pack")
    assert quantize == "pack" and draft.kernel == target.kernel and len(draft.exits) > 1
    prompt = qwen_tokenizer.apply_chat_template(code_prompts(1)[0], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    eos = generation_eos_ids(pack_paths["target"])
    with LocalEngine(target, draft, threads=2, split=ThreadSplit(target=1, draft=1)) as engine:
        ref = engine.generate(prompt, method="ar", max_new_tokens=32, stop_ids=eos).tokens
        for method in ("sd", "pearl"):
            out = engine.generate(prompt, method=method, max_new_tokens=32, stop_ids=eos, draft_len=4)
            assert out.tokens == ref, method
            assert out.stats.mean_accepted_len > 1.5
