"""Environment variables, read in one place.

``KDN_HOME``: where kdn_hf keeps converted models and the default disk store
(default ``~/.cache/kdn_hf``).

``KDN_STORE``: the store to use when none is named: one URL or path, or several
separated by commas (a tier chain, fastest first), e.g.
``memory://,redis://cache:6379/0``. Unset: the disk store under ``KDN_HOME``.

``KDN_NAMESPACE``: the tenant namespace when none is named (default ``default``).

``KDN_CODEC``: the stored KV codec when none is named (default ``none``).

``KDN_SGLANG_REUSE``: ``1`` lets the SGLang backend load stored chunks at new
positions, re-rotated (approximate; see the README). Default ``0``: exact
entries only.

``KDN(...)``, ``open_store(None)``, the CLI and the SGLang backend (which has no
flags of its own) take their defaults from these, so that an SGLang server and ``kdn ingest`` started in the
same environment share entries.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdn_hf.errors import ConfigError


def kdn_home() -> Path:
    """The kdn_hf cache root: ``$KDN_HOME`` or ``~/.cache/kdn_hf``."""
    return Path(os.environ.get("KDN_HOME") or Path.home() / ".cache" / "kdn_hf").expanduser()


def default_store_path() -> Path:
    """The embedded default store: a disk tier under ``KDN_HOME/store``."""
    return kdn_home() / "store"


def store_spec() -> list[str] | None:
    """``$KDN_STORE`` as a list of store URLs / paths (fastest first), or None when unset or empty
    (then ``open_store(None)`` opens the default disk store)."""
    raw = os.environ.get("KDN_STORE", "").strip()
    if not raw:
        return None
    specs = [s.strip() for s in raw.split(",")]
    if not all(specs):
        raise ConfigError(f"KDN_STORE={raw!r} has an empty entry; separate store URLs with single commas")
    return specs


def namespace() -> str:
    """``$KDN_NAMESPACE``, or ``"default"`` when unset or empty."""
    return os.environ.get("KDN_NAMESPACE", "").strip() or "default"


def codec() -> str:
    """``$KDN_CODEC``, or ``"none"`` when unset or empty (checked where the codec is used)."""
    return os.environ.get("KDN_CODEC", "").strip() or "none"


def sglang_reuse() -> bool:
    """``$KDN_SGLANG_REUSE``: "1"/"true" on, "0"/"false"/unset off; anything else is a ConfigError."""
    raw = os.environ.get("KDN_SGLANG_REUSE", "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"KDN_SGLANG_REUSE must be 1 or 0, got {raw!r}")
