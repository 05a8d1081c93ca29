"""The Ray Train path of exit training: a TorchTrainer with one worker runs the same loop
(on a GPU when the cluster has one; here on CPU) and writes the same adapter folder."""

from __future__ import annotations

import json

import pytest

from tests.training.test_exit_training import _argv
from tests.training.tiny_exit_model import make_tiny_draft


@pytest.mark.slow
def test_ray_train_backend_writes_adapters(tmp_path, monkeypatch, ray_local):
    """On the suite's local Ray cluster (2 CPUs; run_ray uses the running cluster)."""
    from tandem.training.train_exits import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    draft = make_tiny_draft(tmp_path / "draft")
    out = tmp_path / "out"
    assert main(_argv(draft, out, **{"--steps": 6, "--checkpoint-every": 3}) + ["--backend", "ray"]) == 0
    manifest = json.loads((out / "exit_adapters.json").read_text())
    assert manifest["exits"] == [1, 2] and manifest["training"]["steps"] == 6
