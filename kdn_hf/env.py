"""Environment variables, read in one place.

``KDN_HOME``: where kdn_hf keeps converted models and the default disk store
(default ``~/.cache/kdn_hf``).
"""

from __future__ import annotations

import os
from pathlib import Path


def kdn_home() -> Path:
    """The kdn_hf cache root: ``$KDN_HOME`` or ``~/.cache/kdn_hf``."""
    return Path(os.environ.get("KDN_HOME") or Path.home() / ".cache" / "kdn_hf").expanduser()


def default_store_path() -> Path:
    """The embedded default store: a disk tier under ``KDN_HOME/store``."""
    return kdn_home() / "store"
