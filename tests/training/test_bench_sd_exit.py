"""`tandem bench --sd-exit K`: `sd` drafts from exit K of the draft alone (what a trained
shallow exit buys a target), on a tiny draft with its own tokenizer, in float32."""

from __future__ import annotations

import json

import pytest

from tests.training.tiny_exit_model import TINY_LAYERS, make_tiny_draft


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_sd_exit")
    draft = make_tiny_draft(root / "draft")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(draft)  # bench sends prompts through the chat template
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(draft)
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ("def add(a, b):", "import heapq\n")) + "\n")
    return draft, prompts


def _argv(draft, prompts, out, *extra):
    return ["bench", "--target", draft, "--draft", draft, "--prompts", str(prompts), "--limit", "2",
            "--max-new-tokens", "12", "--methods", "hf-ar,ar,sd", "--draft-len", "2", "--dtype", "float32",
            "--draft-quantize", "none", "--exit-adapters", "none", "--threads", "1", "--output", str(out), *extra]


def test_sd_exit_drafts_from_that_exit_only_and_stays_lossless(tiny, tmp_path):
    from tandem.deploy.cli import main

    draft, prompts = tiny
    out = tmp_path / "b.json"
    assert main(_argv(draft, prompts, out, "--sd-exit", "2")) == 0
    payload = json.loads(out.read_text())
    assert payload["config"]["sd_exit"] == 2
    rows = {r["method"]: r for r in payload["results"]}
    assert set(rows["sd"]["exits_used"]) == {"2"}  # every draft token from exit 2 of 4
    assert rows["sd"]["greedy_equal"] == 2 and rows["ar"]["greedy_equal"] == 2  # float32: token for token


def test_sd_exit_outside_the_draft_is_a_clear_error(tiny, tmp_path, capsys):
    from tandem.deploy.cli import main

    draft, prompts = tiny
    assert main(_argv(draft, prompts, tmp_path / "b.json", "--sd-exit", str(TINY_LAYERS + 5))) == 2
    err = capsys.readouterr().err
    assert "tandem bench: error:" in err and "exits" in err and "Traceback" not in err
