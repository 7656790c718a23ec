"""Where the proxy's files are: the repository, its state directory, and a family's own directory name."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
STATE = Path(os.path.abspath(os.environ.get("DATALAB_STATE") or ROOT / ".state"))  # (as scripts/setup.sh's)


def family_name(prefix: str) -> str:
    """A directory name for one proxy family's files (its key prefix, made a safe name): families
    sharing a directory never see, nor remove, each other's."""
    return hashlib.sha256(prefix.encode()).hexdigest()[:16]
