"""Folders inside the tandem checkout, located from this package, never from beside it.

Imports nothing from tandem, so any module (and the tests) can use it without cycles.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The repository's evaluation prompts (JSONL, one record per line with `turns`): Spec-Bench's
# dev half and code prompts; bench/eval/README.md says where each comes from and its license.
EVAL_DIR = REPO_ROOT / "bench" / "eval"
