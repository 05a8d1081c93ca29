"""Exit training on a tiny random draft (4 layers, exits 1 and 2, vocab 384 with a BPE
tokenizer trained in-process), through the real data pipeline (standard library text, eval
prompts, frequent-token head subset).

The KL criterion
----------------
For each validation position i the trainer's loss term is KL_i = KL(p_full || q_exit) on the
head subset. With d_i = KL_i(untrained) - KL_i(trained) on the *same* held-out positions,
training helped at an exit if the mean of d is positive beyond noise. Positions inside one
packed sequence are correlated, so the noise is estimated from per-sequence means d_s
(S sequences, treated as independent): SE = sd(d_s) / sqrt(S). The test requires

    mean(d_s) > Z * SE   with Z = 4    (one-sided normal tail 3e-5 per exit)

and a relative drop of at least 2% (so a vanishing SE cannot pass a negligible change).
The negative control (learning rate 0: the same steps, the same data, no update) has d = 0
at every position and must fail the same criterion. These two runs start from the identity
(`--ridge-tokens 0`) so that only gradient steps can move the KL; the least-squares init of
the adapters' linear part (the default) is tested separately by the same criterion: alone
(lr 0) it must lower the KL, and the same 60 steps must end lower from it than from the
identity. Measured here: the init alone lowers exit 1 by 0.229 nats = 17 SE (18%), exit 2
by 0.149 = 23 SE (20%); trained from it, exit 1 ends 0.059 = 16 SE and exit 2 0.040 = 16 SE
below the identity-started run. Measured here (60 steps): exit 1 drops
by 0.196 nats = 11.6 SE (15%), exit 2 by 0.062 = 8.7 SE (8%). (An exit one layer below the
top, KL 0.34 untrained, only reached ~4 SE: too close to the bar for a stable test.)
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.training.tiny_exit_model import make_tiny_draft

REPO = Path(__file__).resolve().parents[2]
Z = 4.0
MIN_REL_DROP = 0.02


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory):
    return make_tiny_draft(tmp_path_factory.mktemp("tinydraft") / "draft")


def _argv(draft: str, out: Path, **overrides) -> list[str]:
    opts = {
        "--exits": "1,2", "--steps": "60", "--seq-len": "64", "--batch": "4", "--reuse": "2",
        "--rank": "16", "--lr": "1e-2", "--warmup": "5", "--head-vocab": "256", "--count-chars": "200000",
        "--val-tokens": "2048", "--checkpoint-every": "10", "--threads": "1", "--compile": "off",
        "--ridge-tokens": "2048",
    }
    opts.update({k: str(v) for k, v in overrides.items()})
    argv = ["--draft", draft, "--output", str(out), "--no-progress", "--backend", "local"]
    for k, v in opts.items():
        argv += [k, v]
    return argv


def _per_sequence_drop(draft: str, out: Path, argv: list[str]) -> dict[int, tuple[float, float, float]]:
    """Per exit: (mean per-sequence KL drop, its standard error, untrained mean KL)."""
    from tandem.actors.exit_adapters import load_exit_adapters
    from tandem.training.train_exits import build_parser, config_from_args, validation_kl

    cfg = config_from_args(build_parser().parse_args(argv), draft)
    ev_before, ev_after, n_seq = validation_kl(cfg, load_exit_adapters(out, torch.float32)[0])
    res = {}
    for e in cfg.exits:
        d = (ev_before[e]["kl"] - ev_after[e]["kl"]).view(n_seq, -1).mean(1)  # [sequences]
        res[e] = (float(d.mean()), float(d.std() / math.sqrt(n_seq)), float(ev_before[e]["kl"].mean()))
    return res


def _drop_between(draft: str, argv: list[str], before: Path, after: Path) -> dict[int, tuple[float, float, float]]:
    """Per exit: (mean per-sequence KL drop from adapters `before` to adapters `after`, its SE,
    the mean KL with `before`), on the validation split of argv's config."""
    from tandem.actors.exit_adapters import load_exit_adapters
    from tandem.training.train_exits import build_parser, config_from_args, validation_kl

    cfg = config_from_args(build_parser().parse_args(argv), draft)
    _, ev_a, n_seq = validation_kl(cfg, load_exit_adapters(before, torch.float32)[0])
    _, ev_b, _ = validation_kl(cfg, load_exit_adapters(after, torch.float32)[0])
    res = {}
    for e in cfg.exits:
        d = (ev_a[e]["kl"] - ev_b[e]["kl"]).view(n_seq, -1).mean(1)
        res[e] = (float(d.mean()), float(d.std() / math.sqrt(n_seq)), float(ev_a[e]["kl"].mean()))
    return res


def _passes(drop: float, se: float, base: float) -> bool:
    return drop > Z * se and drop > MIN_REL_DROP * base


def test_training_lowers_validation_kl_and_control_does_not(tiny_draft, tmp_path):
    from tandem.training.train_exits import main

    trained = tmp_path / "trained"
    argv = _argv(tiny_draft, trained, **{"--ridge-tokens": "0"})
    assert main(argv) == 0
    manifest = json.loads((trained / "exit_adapters.json").read_text())
    assert manifest["exits"] == [1, 2] and manifest["head_size"] == 256
    for e, (drop, se, base) in _per_sequence_drop(tiny_draft, trained, argv).items():
        assert _passes(drop, se, base), f"exit {e}: KL drop {drop:.4f} vs {Z} SE = {Z * se:.4f}, base {base:.4f}"

    control = tmp_path / "control"
    argv_c = _argv(tiny_draft, control, **{"--lr": "0", "--ridge-tokens": "0"})
    assert main(argv_c) == 0
    for e, (drop, se, base) in _per_sequence_drop(tiny_draft, control, argv_c).items():
        assert not _passes(drop, se, base), f"exit {e}: the lr=0 control lowered KL by {drop}"


def test_linear_init_lowers_kl_and_training_from_it_ends_lower(tiny_draft, tmp_path):
    """The least-squares init alone (lr 0) lowers the KL; and the same training steps end
    lower from it than from the identity (what the init is for)."""
    from tandem.training.train_exits import main

    init_only = tmp_path / "init"
    argv_i = _argv(tiny_draft, init_only, **{"--lr": "0"})
    assert main(argv_i) == 0
    assert json.loads((init_only / "exit_adapters.json").read_text())["linear"] is True
    for e, (drop, se, base) in _per_sequence_drop(tiny_draft, init_only, argv_i).items():
        assert _passes(drop, se, base), f"exit {e}: the least-squares init lowered KL by {drop:.4f} (SE {se:.4f}, base {base:.4f})"
    from_init, from_identity = tmp_path / "from_init", tmp_path / "from_identity"
    argv_t = _argv(tiny_draft, from_init)
    assert main(argv_t) == 0
    assert main(_argv(tiny_draft, from_identity, **{"--ridge-tokens": "0"})) == 0
    for e, (drop, se, base) in _drop_between(tiny_draft, argv_t, from_identity, from_init).items():
        assert _passes(drop, se, base), f"exit {e}: training from the init ended {drop:.4f} lower than from the identity (SE {se:.4f})"


def test_ridge_init_recovers_an_exact_linear_map():
    """With unit(h_L) an exact affine function of unit(h_k), the least-squares init is it."""
    from tandem.training.train_exits import _unit, ridge_init

    H, N = 12, 64
    gen = torch.Generator().manual_seed(3)
    A, b = torch.randn(H, H, generator=gen), torch.randn(H, generator=gen)

    class Teacher:
        exits, eps = (2,), 1e-6

        def hidden_and_target(self, ids):
            x = torch.randn(ids.numel(), H, generator=gen) * 3.0  # raw hidden at the exit
            return {2: x}, _unit(x, self.eps) @ A.T + b

    class Stream:
        def next_batch(self, batch):
            return torch.zeros(batch, N + 1, dtype=torch.long)

    mix, bias = ridge_init(Teacher(), Stream(), tokens=4 * N * 3, batch=4, lam=1e-10, device="cpu")[2]
    assert torch.allclose(mix, A, atol=1e-4) and torch.allclose(bias, b, atol=1e-4)


def _log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_killed_run_resumes_from_its_checkpoint(tiny_draft, tmp_path):
    """SIGKILL a real training process after its first checkpoint, rerun with --resume: it
    continues from the checkpoint's step (not 0), finishes, and ends with the same adapters
    as an uninterrupted run (data position, optimizer and RNG restored exactly)."""
    from tandem.actors.exit_adapters import load_exit_adapters
    from tandem.training.train_exits import checkpoint_path, main

    steps = 40
    out = tmp_path / "killed"
    argv = _argv(tiny_draft, out, **{"--steps": steps, "--checkpoint-every": 4})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tandem.training.train_exits", *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = checkpoint_path(out)
    deadline = time.monotonic() + 120
    try:
        while not ckpt.exists():
            assert proc.poll() is None, "training exited before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved_step = int(torch.load(ckpt, weights_only=False)["step"])
    assert 0 < saved_step < steps, "kill the run before it finishes"

    assert main(argv) == 0  # --resume is the default
    records = _log_records(out)
    resume = [r for r in records if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == saved_step
    after_resume = records[records.index(resume[0]) + 1 :]
    steps_after = [r["step"] for r in after_resume if "loss" in r]
    assert steps_after[0] == saved_step + 1 and steps_after[-1] == steps
    done = [r for r in records if r.get("event") == "done"]
    assert done and done[-1]["steps"] == steps

    straight = tmp_path / "straight"
    assert main(_argv(tiny_draft, straight, **{"--steps": steps, "--checkpoint-every": 4})) == 0
    a, _, _ = load_exit_adapters(out, torch.float32)
    b, _, _ = load_exit_adapters(straight, torch.float32)
    for e in a:
        for (name, pa), (_, pb) in zip(a[e].named_parameters(), b[e].named_parameters()):
            assert torch.allclose(pa, pb, atol=1e-6), f"exit {e} {name} differs after resume"


def test_token_stream_resumes_exactly(tiny_draft):
    from transformers import AutoTokenizer

    from tandem.training.data import DocRenderer, StreamState, TokenStream, collect_documents, split_documents
    from tandem.training.train_exits import DEFAULT_PROMPTS

    tok = AutoTokenizer.from_pretrained(tiny_draft)
    train, val = split_documents(collect_documents(stdlib=None, prompts=DEFAULT_PROMPTS), 0.03)
    assert val and not {d.key for d in train} & {d.key for d in val}
    renderer = DocRenderer(tok, prompts=["Write code."], chat_fraction=0.5, max_chars=2000)
    a = TokenStream(train, renderer, seed=3, seq_len=32, max_doc_tokens=256)
    for _ in range(7):
        a.next_batch(2)
    state = StreamState(**json.loads(json.dumps(a.state.__dict__)))
    b = TokenStream(train, renderer, seed=3, seq_len=32, max_doc_tokens=256, state=state)
    assert torch.equal(a.next_batch(3), b.next_batch(3))


def test_head_ids_keep_specials_and_frequent_tokens():
    from tandem.training.data import choose_head_ids

    counts = torch.zeros(100, dtype=torch.int64)
    counts[[50, 60, 70]] = torch.tensor([10, 8, 1])  # 70 seen once: not trusted as frequent
    ids = choose_head_ids(counts, size=6, specials={99}, freq_share=1.0).tolist()
    assert ids == sorted(ids) and len(ids) == 6
    assert {99, 50, 60} <= set(ids) and 70 not in ids
    assert set(ids) - {99, 50, 60} == {0, 1, 2}  # the rest filled by lowest id


def test_replay_simulation_counts_rounds_exactly():
    """Hand-built replay: target 10 tokens; exit 1 matches at positions 0-2 and 5-9 with
    max probability 0.9, else mismatches with 0.2; exit 2 always matches."""
    from tandem.training.exit_report import Replay, simulate

    target = torch.arange(10)
    good = torch.tensor([1, 1, 1, 0, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    rp = Replay(target=target, tokens={1: torch.where(good, target, target + 100), 2: target.clone()},
                max_prob={1: torch.where(good, 0.9, 0.2), 2: torch.full((10,), 0.99)})
    cost = {"token_ms": {1: 1.0, 2: 2.0}, "head_ms": {1: 0.5, 2: 0.5}, "layers_ms": {1: 0.5, 2: 1.5}, "verify_ms": 10.0}
    # Exit 1 alone, draft_len 4: round 1 accepts 0-2, commits 3 (correction): 4 tokens; round 2 at 4
    # rejects at once: 1 token; round 3 at 5 accepts 5-8, bonus 9: 5 tokens. 3 rounds, 10 tokens.
    one = simulate([rp], exits=(1,), thresholds=(), draft_len=4, **cost)
    assert (one["rounds"], one["emitted"], one["drafted"]) == (3, 10, 12)
    assert one["mean_accepted_len"] == round(10 / 3, 3) and one["draft_ms_per_token"] == 1.0
    # S2D (1 -> 2, threshold 0.5): the confident exit-1 tokens are exactly the right ones, so
    # every draft is accepted: rounds at 0 (0-3 + bonus 4), 5 (5-8 + bonus 9) = 2 rounds.
    s2d = simulate([rp], exits=(1, 2), thresholds=(0.5,), draft_len=4, **cost)
    assert (s2d["rounds"], s2d["emitted"]) == (2, 10)
    # costs: exit-1 tokens 0.5 + 0.5; exit-2 tokens 1.5 + 0.5 + 0.5 (both heads tried)
    assert s2d["draft_ms_per_token"] == round((7 * 1.0 + 1 * 2.5) / 8, 2)


def test_ceiling_prices_the_full_drafts_acceptance_at_each_exits_cost():
    """Full draft (exit 2) matches all 10 target tokens: draft_len 4 gives rounds at 0 and 5
    (4 accepted + bonus each): 2 rounds, 8 drafted. Time = 2 x 10 ms + 8 x cost per token:
    36 ms at the full draft's 2 ms, 28 ms at exit 1's 1 ms, 20 ms at no cost."""
    from tandem.training.exit_report import Replay, ceiling

    target = torch.arange(10)
    rp = Replay(target=target, tokens={1: target + 100, 2: target.clone()},
                max_prob={1: torch.full((10,), 0.2), 2: torch.full((10,), 0.99)})
    costs = {"token": {1: 1.0, 2: 2.0}, "head": {1: 0.5, 2: 0.5}, "layers": {1: 0.5, 2: 1.5}}
    c = ceiling([rp], full=2, trained=(1,), costs=costs, draft_len=4, verify_ms=10.0)
    assert c["sd_full_predicted_tok_s"] == round(1000 * 10 / 36, 2)
    assert c["1"]["predicted_tok_s"] == round(1000 * 10 / 28, 2) and c["1"]["x_sd_full"] == round((10 / 28) / (10 / 36), 3)
    assert c["free"]["predicted_tok_s"] == round(1000 * 10 / 20, 2)


def test_report_markdown_and_plot(tmp_path):
    from tandem.training.exit_report import plot, render_markdown

    speed = {"tok_s": 5.0, "mean_accepted_len": 2.0, "greedy_equal": 3, "prompts": 3, "tokens": 10, "draft_ms_per_drafted": 3.0, "exits_used": {}}
    sim = {"mean_accepted_len": 2.0, "draft_ms_per_token": 2.0, "predicted_tok_s": 4.0, "rounds": 5, "emitted": 10, "drafted": 20}
    report = {
        "draft": "d", "draft_quantize": "int4", "head_size": 100, "limit": 3, "max_new_tokens": 8, "threads": 2, "draft_len": 4,
        "sd_draft_len": 6, "exits": [1, 4],
        "draft_costs_ms": {v: {"token": {"1": c, "4": 4 * c}} for v, c in (("before", 2.0), ("after", 1.5))},
        "training": {"val_before": {"1": {"kl": 3.0, "top1_agree": 0.1}}, "val_after": {"1": {"kl": 1.0, "top1_agree": 0.5}}},
        "targets": {"t": {"policy": {"policy": "1,4:0.5", "draft_len": 6, "source": "tuned"}, "datasets": {"code_dev": {
            "speed": {"ar": speed, "sd_full_before": speed, "sorted_after": {**speed, "tok_s": 6.0}},
            "per_exit": {"1_before": sim, "1_after": {**sim, "mean_accepted_len": 3.0}, "4_before": sim, "4_after": sim},
            "ceiling": {"draft_len": 6, "sd_full_predicted_tok_s": 5.0, "1": {"predicted_tok_s": 5.5, "x_sd_full": 1.1},
                        "free": {"predicted_tok_s": 7.0, "x_sd_full": 1.4}}}}}},
    }
    md = render_markdown(report)
    assert "| 1 | 2.0 | 1.5 | 2.00 | 3.00 |" in md and "| 1.20 | 1.20 |" in md
    assert "exit 1 1.10x" in md and "cost nothing: 1.40x" in md
    plot(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
