"""open_store: build a KVStore from URLs, paths, or nothing (the default).

Accepted specs, one or a list of them (a tier chain, fastest first)::

    None                          the disk tier at kdn_hf.env.default_store_path()
    "memory://"                   a MemoryTier      (memory://?budget=512MiB)
    "/abs/dir", "rel/dir", "~/x"  a DiskTier        (Path objects too)
    "file:///abs/dir"             a DiskTier        (file:///abs/dir?budget=20GiB)
    "redis://host:port/db"        a RedisTier (pip install kdn-hf[redis]); also rediss:// (TLS) and
                                  ?prefix=kdn:&ttl=S&timeout=S&breaker=S&budget=SIZE&cluster=1
                                  (see kdn_hf.store.redis), from REMOTE_TIERS (lazy import)
    a KVStore                     returned as is

Sizes are ints (bytes) or strings such as "512MiB", "2GiB", "1.5GB", "4096".
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qs, unquote, urlsplit

from kdn_hf import env
from kdn_hf.errors import ConfigError, StoreError
from kdn_hf.store.base import StorageTier
from kdn_hf.store.chain import KVStore
from kdn_hf.store.disk import DiskTier
from kdn_hf.store.memory import MemoryTier

DEFAULT_MEMORY_BUDGET = 2 * 1024**3
DEFAULT_DISK_BUDGET = 20 * 1024**3

#: scheme -> ("module:Class", pip extra). The class provides ``from_url(url: str) -> StorageTier``.
REMOTE_TIERS: dict[str, tuple[str, str]] = {
    "redis": ("kdn_hf.store.redis:RedisTier", "redis"),
    "rediss": ("kdn_hf.store.redis:RedisTier", "redis"),
}
SCHEMES = ("file", "memory", *REMOTE_TIERS)

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}  # fmt: skip
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")

StoreSpec = str | Path


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "512MiB", "2GiB", "1.5GB", "4096" (K/M/G/T alone are binary)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    elif isinstance(size, str) and (m := _SIZE_RE.fullmatch(size)) and m.group(2).lower() in _UNITS:
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise ConfigError(f"cannot read size {size!r}: use bytes (int) or a number with a unit, e.g. '512MiB', '2GiB'")
    if n <= 0:
        raise ConfigError(f"size must be positive, got {size!r}")
    return n


def open_store(
    spec: StoreSpec | Sequence[StoreSpec] | KVStore | None = None,
    *,
    memory_budget: int | str = DEFAULT_MEMORY_BUDGET,
    disk_budget: int | str = DEFAULT_DISK_BUDGET,
    write: str = "through",
) -> KVStore:
    """Open the tier chain ``spec`` describes (see the module docstring).

    ``memory_budget`` / ``disk_budget`` apply to tiers whose URL has no
    ``?budget=``; ``write`` is the chain's write policy ("through" or "back",
    see KVStore). Raises StoreError for an unknown scheme, a missing optional
    tier, or a path that cannot be a store directory.
    """
    if isinstance(spec, KVStore):
        return spec
    if spec is None:  # $KDN_STORE, else the embedded disk store under KDN_HOME
        specs: list[StoreSpec] = env.store_spec() or [env.default_store_path()]
    elif isinstance(spec, (str, Path)):
        specs = [spec]
    elif isinstance(spec, Sequence) and all(isinstance(s, (str, Path)) for s in spec):
        specs = list(spec)
    else:
        raise StoreError(f"cannot open a store from {spec!r}: pass a URL, a path, a list of them, a KVStore or None")
    if not specs:
        raise StoreError("cannot open a store from an empty list: pass at least one URL or path")
    try:
        budgets = {"memory": parse_size(memory_budget), "disk": parse_size(disk_budget)}
    except ConfigError as e:
        raise StoreError(f"bad store budget: {e}") from e
    tiers: list[StorageTier] = []
    try:
        for s in specs:
            if spec is not None:
                _check_parent_exists(s)
            tiers.append(_open_tier(s, budgets))
    except BaseException:
        for t in tiers:
            t.close()
        raise
    try:
        return KVStore(tiers, write=write)
    except ConfigError as e:
        for t in tiers:
            t.close()
        raise StoreError(str(e)) from e


def _check_parent_exists(spec: StoreSpec) -> None:
    """A store directory named by the caller is created if missing, but its parent must exist:
    a typo in a path should fail loudly, not scatter a new tree over the disk. (The default
    store under KDN_HOME is created with its parents.)"""
    if isinstance(spec, str) and "://" in spec:
        if not spec.lower().startswith("file://"):
            return
        path = Path(urlsplit(spec).path)
    else:
        path = Path(spec).expanduser()
    if not path.exists() and not path.parent.is_dir():
        raise StoreError(
            f"store path {str(path)!r} does not exist and neither does its parent {str(path.parent)!r}; "
            f"check the path for typos, or create the parent first (mkdir -p {path.parent})"
        )


def _open_tier(spec: StoreSpec, budgets: dict[str, int]) -> StorageTier:
    if isinstance(spec, Path) or "://" not in spec:
        return DiskTier(Path(spec).expanduser(), budgets["disk"])
    url = urlsplit(spec)
    scheme = url.scheme.lower()
    if scheme in REMOTE_TIERS:
        return _open_remote(scheme, spec)
    if scheme not in ("file", "memory"):
        raise StoreError(
            f"unknown store scheme {url.scheme!r} in {spec!r}; allowed: "
            + ", ".join(f"{s}://" for s in SCHEMES)
            + ", or a directory path"
        )
    budget = _query_budget(spec, url.query, budgets[scheme if scheme == "memory" else "disk"])
    if scheme == "memory":
        if url.netloc or url.path:
            raise StoreError(
                f"memory store URLs take no host or path, got {spec!r}; use 'memory://' or 'memory://?budget=2GiB'"
            )
        return MemoryTier(budget)
    if url.netloc not in ("", "localhost") or not url.path.startswith("/"):
        raise StoreError(f"file store URLs need an absolute local path, as in 'file:///abs/dir'; got {spec!r}")
    return DiskTier(Path(unquote(url.path)), budget)


def _query_budget(spec: str, query: str, default: int) -> int:
    params = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    unknown = set(params) - {"budget"}
    if unknown:
        raise StoreError(f"unknown store URL parameter(s) {sorted(unknown)} in {spec!r}; allowed: budget")
    if "budget" not in params:
        return default
    try:
        return parse_size(params["budget"][-1])
    except ConfigError as e:
        raise StoreError(f"bad budget in store URL {spec!r}: {e}") from e


def _open_remote(scheme: str, spec: str) -> StorageTier:
    target, extra = REMOTE_TIERS[scheme]
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise StoreError(
            f"{spec!r} needs the {extra} tier (pip install kdn-hf[{extra}]); coming in a later version"
        ) from None
    return getattr(module, cls_name).from_url(spec)
