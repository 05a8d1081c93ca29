"""Real-model tests: the model packs (installed by `make setup`), converted once into the
tandem cache. Marked slow; `make test` runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

EVAL = Path(__file__).resolve().parents[3] / "shared" / "eval"
TARGET = "qwen2.5-coder-1.5b-instruct"
DRAFT = "qwen2.5-coder-0.5b-instruct"


def code_prompts(n: int) -> list[list[dict]]:
    path = EVAL / "code_dev.jsonl"
    if not path.exists():  # a checkout without ../shared: the prompts' shape, inline
        texts = [
            "Write a Python function that returns the n-th Fibonacci number iteratively, with a docstring.",
            "Implement binary search over a sorted list in Python and explain its time complexity.",
            "Write a Python class Stack with push, pop, peek and is_empty methods, and raise IndexError on empty pop.",
        ]
    else:
        texts = [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line.strip()]
    return [[{"role": "user", "content": t}] for t in texts[:n]]


@pytest.fixture(scope="session")
def pack_paths():
    from deploy.packs import resolve_model_path

    return {"target": resolve_model_path(TARGET), "draft": resolve_model_path(DRAFT)}


@pytest.fixture(scope="session")
def qwen_tokenizer(pack_paths):
    from actors.runner import load_tokenizer

    return load_tokenizer(pack_paths["target"])
