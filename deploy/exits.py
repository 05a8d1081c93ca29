"""Where a draft's trained exits are found: the folder `tandem train-exits` writes by
default ($TANDEM_CACHE/exits/<draft>). Light on purpose: serving imports this, never the
trainer (training/train_exits.py).
"""

from __future__ import annotations

import os
from pathlib import Path

MANIFEST = "exit_adapters.json"  # = actors.exit_adapters.MANIFEST (not imported: that pulls torch)


def default_exits_dir(draft_ref: str) -> Path:
    """$TANDEM_CACHE/exits/<pack name, or the last part of a local path>."""
    from tandem.deploy.packs import cache_root

    name = Path(draft_ref.rstrip("/")).name if ("/" in draft_ref or os.sep in draft_ref) else draft_ref
    return cache_root() / "exits" / name


def find_trained_exits(draft_ref: str) -> Path | None:
    """The default adapter folder of a draft if training has written one, else None."""
    folder = default_exits_dir(draft_ref)
    return folder if (folder / MANIFEST).is_file() else None
