"""Where a draft's trained exits are found: the folder `tandem train-exits` writes by
default ($TANDEM_CACHE/exits/<draft>), else the adapters shipped with tandem
(deploy/shipped_exits/<draft>: the ones the README's numbers used, with their training
report, verified against their SHA256SUMS before use). Light on purpose: serving imports
this, never the trainer (training/train_exits.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

MANIFEST = "exit_adapters.json"  # = actors.exit_adapters.MANIFEST (not imported: that pulls torch)
SHIPPED = Path(__file__).resolve().parent / "shipped_exits"  # package data: one folder per draft
SUMS = "SHA256SUMS"  # `sha256sum` format: "<hex>  <file>" per file of a shipped folder

log = logging.getLogger("tandem.exits")


def default_exits_dir(draft_ref: str) -> Path:
    """$TANDEM_CACHE/exits/<pack name, or the last part of a local path>."""
    from tandem.deploy.packs import cache_root

    return cache_root() / "exits" / _draft_name(draft_ref)


def _draft_name(draft_ref: str) -> str:
    return Path(draft_ref.rstrip("/")).name if ("/" in draft_ref or os.sep in draft_ref) else draft_ref


def verify_shipped(folder: Path) -> None:
    """ValueError naming the file unless every file SHA256SUMS lists is there with its hash."""
    sums = folder / SUMS
    if not sums.is_file():
        raise ValueError(f"shipped exits {folder}: no {SUMS}")
    listed = [line.split(None, 1) for line in sums.read_text().splitlines() if line.strip()]
    if not any(name.strip().lstrip("*") == MANIFEST for _, name in listed):
        raise ValueError(f"shipped exits {folder}: {SUMS} does not list {MANIFEST}")
    for digest, name in listed:
        path = folder / name.strip().lstrip("*")
        if not path.is_file():
            raise ValueError(f"shipped exits {folder}: {path.name} is missing")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != digest:
            raise ValueError(f"shipped exits {folder}: {path.name} does not match its SHA256 ({h.hexdigest()[:12]} != {digest[:12]})")


def shipped_exits_dir(draft_ref: str) -> Path | None:
    """The adapters shipped for this draft (by pack name), verified; None if none ship, or
    (with a warning) if the shipped files do not match their sums."""
    folder = SHIPPED / _draft_name(draft_ref)
    if not (folder / MANIFEST).is_file():
        return None
    try:
        verify_shipped(folder)
    except ValueError as exc:
        log.warning("%s; not using them", exc)
        return None
    return folder


def find_trained_exits(draft_ref: str) -> Path | None:
    """The adapter folder of a draft: what training wrote to the default place, else the
    shipped one; None when there is neither."""
    folder = default_exits_dir(draft_ref)
    if (folder / MANIFEST).is_file():
        return folder
    return shipped_exits_dir(draft_ref)
