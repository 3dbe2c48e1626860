"""Where the lab keeps its state on the machine running it (keys, known_hosts, config, boot logs)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGES = Path(__file__).resolve().parent / "images"


def state_dir() -> Path:
    """The lab's state directory: $QRMFS_LAB_DIR, else `.lab/` in the checkout."""
    d = Path(os.environ.get("QRMFS_LAB_DIR", REPO / ".lab"))
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    return d
