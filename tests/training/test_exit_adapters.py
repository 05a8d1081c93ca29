"""Exit adapters: identity at initialisation, save/load round trip, draft identity checks,
and that the training forward computes exactly what the runner computes at an exit."""

from __future__ import annotations

import pytest
import torch

from tandem.actors.exit_adapters import (
    ExitAdapter,
    check_runner_matches,
    identity_of_hf_model,
    load_exit_adapters,
    read_manifest,
    save_exit_adapters,
)
from tandem.actors.loading import load_causal_lm
from tandem.actors.runner import ModelRunner
from tests.conftest import make_tiny_model

EXITS = (1, 2, 3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("exitdraft") / "m", seed=5, vocab=40, layers=4, hidden=32)
    return path, load_causal_lm(path, torch.float32)


def _random_adapters(hidden: int, rank: int = 8, seed: int = 0, linear: bool = False) -> dict[int, ExitAdapter]:
    torch.manual_seed(seed)
    ads = {}
    for e in EXITS:
        ad = ExitAdapter(hidden, rank, linear=linear)
        with torch.no_grad():
            ad.up.normal_(0, 0.3)  # non-identity so the tests see the adapter act
            if linear:
                ad.mix.add_(torch.randn(hidden, hidden) * 0.3)
                ad.bias.normal_(0, 0.2)
            else:
                ad.scale.uniform_(0.5, 1.5)
        ads[e] = ad
    return ads


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_fresh_adapter_is_identity():
    ad = ExitAdapter(16, 4)
    h = torch.randn(5, 16)
    assert torch.equal(ad(h), h)
    assert ad(h.bfloat16()).dtype == torch.bfloat16
    # The linear form is the identity up to scale, which the shared final norm removes.
    lin = ExitAdapter(16, 4, linear=True)
    h = torch.randn(5, 16) * 7.0
    assert torch.allclose(_rms(lin(h)), _rms(h), atol=1e-5)
    assert lin(h.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("linear", [False, True])
def test_save_load_round_trip_and_manifest(tiny, tmp_path, linear):
    path, model = tiny
    ident = identity_of_hf_model(model, path)
    ads = _random_adapters(32, linear=linear)
    head_ids = [0, 3, 5, 7, 11, 39]
    save_exit_adapters(tmp_path, ads, draft=ident, head_ids=head_ids, extra={"training": {"steps": 3}})
    manifest = read_manifest(tmp_path)
    assert manifest["exits"] == list(EXITS) and manifest["rank"] == 8 and manifest["head_ids_file"]
    assert manifest["linear"] is linear
    assert manifest["draft"]["fingerprint"] == ident.fingerprint and manifest["training"]["steps"] == 3
    loaded, exits, ids = load_exit_adapters(tmp_path, torch.float32)
    assert exits == EXITS and ids.tolist() == head_ids
    h = torch.randn(7, 32)
    for e in EXITS:
        assert torch.allclose(loaded[e](h), ads[e](h), atol=1e-6)
        assert not any(p.requires_grad for p in loaded[e].parameters())
    # Saved files are small: adapters, not the model.
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) < 200_000


def test_adapters_load_as_real_tensors_under_the_device_discipline(tiny, tmp_path):
    """An actor's threads make tensors on "meta" unless told a device (the test discipline,
    actors/devices.py): loading must still give real weights (it once made meta modules, and
    the runner failed to move them: the first actor to load shipped exits died)."""
    path, model = tiny
    ads = _random_adapters(32, linear=True)
    save_exit_adapters(tmp_path, ads, draft=identity_of_hf_model(model, path))
    with torch.device("meta"):
        loaded, exits, _ = load_exit_adapters(tmp_path, torch.float32)
    for e in exits:
        assert all(p.device.type == "cpu" for p in loaded[e].parameters())
        assert torch.allclose(loaded[e](torch.ones(2, 32)), ads[e](torch.ones(2, 32)), atol=1e-6)


def test_version_1_folder_still_loads(tiny, tmp_path):
    """A folder written before the linear part existed (manifest version 1, no "linear")."""
    import json

    path, model = tiny
    ads = _random_adapters(32)
    save_exit_adapters(tmp_path, ads, draft=identity_of_hf_model(model, path))
    manifest = json.loads((tmp_path / "exit_adapters.json").read_text())
    del manifest["linear"]
    manifest["version"] = 1
    (tmp_path / "exit_adapters.json").write_text(json.dumps(manifest))
    loaded, _, _ = load_exit_adapters(tmp_path, torch.float32)
    h = torch.randn(3, 32)
    assert all(not loaded[e].linear and torch.allclose(loaded[e](h), ads[e](h), atol=1e-6) for e in EXITS)


@pytest.mark.parametrize("linear", [False, True])
def test_runner_logits_match_training_forward(tiny, tmp_path, linear):
    """The training path (HF hidden states -> adapter -> shared norm -> head on S) and the
    runner's exit (forward_to_depth -> logits_at_exit) agree: what is trained is what drafts."""
    from tandem.training.train_exits import Teacher

    path, model = tiny
    ads = _random_adapters(32, seed=1, linear=linear)
    head_ids = torch.tensor([0, 2, 4, 8, 16, 31, 33, 39])
    save_exit_adapters(tmp_path, ads, draft=identity_of_hf_model(model, path), head_ids=head_ids)
    loaded, exits, ids = load_exit_adapters(tmp_path, torch.float32)
    runner = ModelRunner(path, dtype="float32", exits=exits, head_ids=ids, exit_adapters=loaded)
    check_runner_matches(tmp_path, runner)
    tokens = [1, 5, 9, 2, 7, 3, 3, 8]
    teacher = Teacher(model, exits=EXITS, head_ids=ids, compile_body=False)
    hs, t_logits = teacher.forward(torch.tensor([tokens]))
    for e in EXITS:
        seq = runner.new_sequence()
        h = runner.forward_to_depth([seq], [tokens], depth=e)[0]
        got = runner.logits_at_exit(h, e)  # [n, S]
        want = teacher.exit_logits(loaded[e], hs[e])
        assert torch.allclose(got, want, atol=1e-4), (e, (got - want).abs().max())
    seq = runner.new_sequence()
    assert torch.allclose(runner.extend(seq, tokens), t_logits, atol=1e-4)


def test_mismatched_draft_is_refused(tiny, tmp_path, tmp_path_factory):
    path, model = tiny
    save_exit_adapters(tmp_path, _random_adapters(32), draft=identity_of_hf_model(model, path))
    other = make_tiny_model(tmp_path_factory.mktemp("other") / "m", seed=6, vocab=40, layers=4, hidden=32)
    runner = ModelRunner(other, dtype="float32", exits=EXITS)
    with pytest.raises(ValueError, match="fingerprint"):
        check_runner_matches(tmp_path, runner)


def test_quantized_runner_keeps_fingerprint(tiny, tmp_path):
    """Weight-quantized drafts match adapters trained on the unquantized weights."""
    path, model = tiny
    save_exit_adapters(tmp_path, _random_adapters(32), draft=identity_of_hf_model(model, path))
    check_runner_matches(tmp_path, ModelRunner(path, dtype="bfloat16", exits=EXITS, quantize="int8"))


@pytest.mark.parametrize("linear", [False, True])
def test_trained_exits_keep_greedy_output_lossless(tiny, tmp_path, tmp_path_factory, linear):
    """A draft with (non-identity) exit adapters and a restricted head, drafting with `sd`
    from a shallow exit and with `sorted`, reproduces target-only greedy output (float32)."""
    from tandem.actors.local import LocalEngine, ThreadSplit
    from tandem.speculation.sorted_policy import ExitPolicy

    path, model = tiny
    save_exit_adapters(tmp_path, _random_adapters(32, seed=2, linear=linear), draft=identity_of_hf_model(model, path),
                       head_ids=list(range(0, 40, 2)) + [1, 3])
    loaded, exits, ids = load_exit_adapters(tmp_path, torch.float32)
    draft = ModelRunner(path, dtype="float32", exits=exits, head_ids=ids, exit_adapters=loaded)
    target_path = make_tiny_model(tmp_path_factory.mktemp("tgt") / "m", seed=7, vocab=40, layers=2, hidden=32)
    target = ModelRunner(target_path, dtype="float32")
    with LocalEngine(target, draft, threads=1, split=ThreadSplit(target=1, draft=1)) as eng:
        for prompt in ([0, 1, 2], [5, 9, 3, 3, 7]):
            ar = eng.generate(prompt, method="ar", max_new_tokens=24).tokens
            one = eng.generate(prompt, method="sd", draft_len=3, policy=ExitPolicy.single(2), max_new_tokens=24)
            s2d = eng.generate(prompt, method="sorted", draft_len=3, policy=ExitPolicy(exits=(1, 3, 4), thresholds=(0.3, 0.2)), max_new_tokens=24)
            assert one.tokens == ar and s2d.tokens == ar
            assert set(s2d.stats.exits_used) <= {1, 3, 4}
