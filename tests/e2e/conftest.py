"""Real-model tests: the model packs (installed by `make setup`), converted once into the
tandem cache. Marked slow; `make test` runs them."""

from __future__ import annotations

import json

import pytest

from tandem.deploy.paths import EVAL_DIR

TARGET = "qwen2.5-coder-1.5b-instruct"
DRAFT = "qwen2.5-coder-0.5b-instruct"


def code_prompts(n: int) -> list[list[dict]]:
    lines = (EVAL_DIR / "code_dev.jsonl").read_text().splitlines()
    texts = [json.loads(line)["turns"][0] for line in lines if line.strip()]
    return [[{"role": "user", "content": t}] for t in texts[:n]]


@pytest.fixture(scope="session")
def pack_paths():
    from tandem.deploy.packs import resolve_model_path

    return {"target": resolve_model_path(TARGET), "draft": resolve_model_path(DRAFT)}


@pytest.fixture(scope="session")
def qwen_tokenizer(pack_paths):
    from tandem.actors.loading import load_tokenizer

    return load_tokenizer(pack_paths["target"])
