"""The trained exit adapters shipped with tandem (deploy/shipped_exits): present for the
default draft, complete and intact (SHA256SUMS), with their training report; a damaged copy
is refused (negative control) and then not used."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from tandem.deploy import exits
from tandem.deploy.packs import DEFAULT_DRAFT


def test_the_default_draft_ships_trained_exits():
    folder = exits.shipped_exits_dir(DEFAULT_DRAFT)
    assert folder is not None
    exits.verify_shipped(folder)
    manifest = json.loads((folder / exits.MANIFEST).read_text())
    assert manifest["draft"]["ref"] == DEFAULT_DRAFT
    training = manifest["training"]
    assert training["final"] and training["calibration"]  # a finished run, thresholds calibrated
    for depth in manifest["exits"]:  # the report it ships with: trained exits beat the bare ones
        before, after = training["val_before"][str(depth)], training["val_after"][str(depth)]
        assert after["top1_agree"] > before["top1_agree"] + 0.2 and after["kl"] < before["kl"]
    assert (folder / "REPORT.md").is_file()


def test_a_damaged_copy_is_refused_and_not_used(tmp_path, monkeypatch, caplog):
    src = exits.shipped_exits_dir(DEFAULT_DRAFT)
    copy = tmp_path / "shipped" / DEFAULT_DRAFT
    shutil.copytree(src, copy)
    monkeypatch.setattr(exits, "SHIPPED", tmp_path / "shipped")
    assert exits.shipped_exits_dir(DEFAULT_DRAFT) == copy  # intact: used
    weights = copy / "exit_adapters.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="exit_adapters.safetensors does not match its SHA256"):
        exits.verify_shipped(copy)
    with caplog.at_level(logging.WARNING, logger="tandem.exits"):
        assert exits.shipped_exits_dir(DEFAULT_DRAFT) is None
    assert "not using them" in caplog.text
    weights.unlink()
    with pytest.raises(ValueError, match="exit_adapters.safetensors is missing"):
        exits.verify_shipped(copy)


def test_no_shipped_exits_for_another_draft():
    assert exits.shipped_exits_dir("some-other-draft") is None
