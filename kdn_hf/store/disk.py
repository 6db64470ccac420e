"""DiskTier: the embedded default store, one file per entry under a directory.

Layout::

    root/KDN_STORE             marker: "kdn_hf store format <N>"
    root/.lock                 flock(2) target serialising writers and eviction
    root/<key[:2]>/<key>.kdn   one encoded entry (safetensors bytes)
    root/<key[:2]>/.<key>.<pid>.<rand>.tmp   a write in progress

Writes are atomic: the bytes go to a temp file in the entry's directory, are
fsynced, then ``os.replace``d over the entry, so a reader sees the old entry,
the new one, or none, never a partial file; a crash leaves at most a temp
file, which is not an entry and is removed by a later open once stale.

Eviction is LRU by file mtime (a hit sets it to now) under a byte budget that
holds across processes and restarts: no usage counter is kept (it could
drift); under an exclusive lock on ``root/.lock`` each put scans the entry
files for their sizes and mtimes and unlinks the oldest until the total fits.
Any removal (delete, eviction, a corrupt entry, a user's ``rm``) is therefore
accounted for. A scan costs one stat per entry (a few ms for thousands of
multi-MB entries); budgets count file sizes, not disk blocks.

Failed writes (disk full, permissions) are logged on "kdn_hf.store" and
counted in ``stats().errors``; they never raise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Iterator, NamedTuple

from kdn_hf.errors import StoreError
from kdn_hf.store.base import StorageTier, TierStats, check_budget, check_key, check_value

logger = logging.getLogger("kdn_hf.store")

MARKER = "KDN_STORE"
STORE_FORMAT = "1"
SUFFIX = ".kdn"
#: a temp file older than this is left over from a crashed writer
STALE_TEMP_SECONDS = 15 * 60

_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_ENTRY_RE = re.compile(r"([0-9a-f]{2,128})\.kdn")


class _File(NamedTuple):
    mtime_ns: int
    key: str
    size: int
    path: str


class DiskTier(StorageTier):
    """Entries as files under ``root`` (created if missing), at most ``byte_budget`` bytes in all.

    Raises StoreError when ``root`` is a file, cannot be created, is not
    writable, or is a non-empty directory that is not a kdn_hf store.
    """

    name = "disk"

    def __init__(self, root: Path | str, byte_budget: int) -> None:
        self.byte_budget = check_budget(byte_budget, "disk")
        self.root = _prepare_root(Path(root).expanduser().absolute())
        self._stats = TierStats(name=self.name, byte_budget=self.byte_budget)
        self._stats_lock = threading.Lock()
        with self._locked():
            self._check_marker()
            self._remove_stale_temps()
            self._stats.evictions = self._evict(keep=None)  # the budget may be smaller than at the last open

    # -- StorageTier -------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        path = self._path(check_key(key))
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self._count(misses=1)
            return None
        except OSError as e:
            logger.warning("disk tier %s: cannot read %s: %s", self.root, path, e)
            self._count(misses=1, errors=1)
            return None
        try:
            now = time.time_ns()
            os.utime(path, ns=(now, now))
        except FileNotFoundError:
            pass  # evicted between read and touch: the bytes read are still a whole entry
        except OSError as e:
            logger.warning("disk tier %s: cannot refresh recency of %s: %s", self.root, path, e)
            self._count(errors=1)
        self._count(hits=1, bytes_read=len(data))
        return data

    def put(self, key: str, value: bytes) -> None:
        path = self._path(check_key(key))
        value = check_value(value)
        if len(value) > self.byte_budget:
            self._count(rejected_puts=1)
            self.delete(key)  # a stale older value must not outlive a newer put
            return
        tmp: str | None = None
        try:
            path.parent.mkdir(exist_ok=True)
            tmp = str(path.parent / f".{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(value)
                f.flush()
                os.fsync(f.fileno())
            now = time.time_ns()  # ns-precise mtime: the kernel's file clock is too coarse to order puts
            os.utime(tmp, ns=(now, now))
            with self._locked():
                os.replace(tmp, path)
                tmp = None
                evicted = self._evict(keep=key)
            self._count(puts=1, bytes_written=len(value), evictions=evicted)
        except OSError as e:
            logger.error("disk tier %s: cannot write entry %s (%s); the entry is not stored", self.root, key, e)
            self._count(errors=1)
        finally:
            if tmp is not None:
                self._unlink_quietly(tmp)

    def contains(self, key: str) -> bool:
        return self._path(check_key(key)).is_file()

    def delete(self, key: str) -> bool:
        path = self._path(check_key(key))
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            logger.error("disk tier %s: cannot delete %s: %s", self.root, path, e)
            self._count(errors=1)
            return False

    def note_corrupt(self, key: str) -> None:
        self._count(corrupt=1)
        self.delete(key)

    def peek(self, key: str) -> bytes | None:
        try:
            with open(self._path(check_key(key)), "rb") as f:
                return f.read()
        except OSError:
            return None

    def trim(self) -> int:
        """Remove stale temp files and evict down to the budget now; returns entries evicted."""
        with self._locked():
            self._remove_stale_temps()
            evicted = self._evict(keep=None)
        self._count(evictions=evicted)
        return evicted

    def keys(self) -> Iterator[str]:
        for f in self._scan():
            yield f.key

    def stats(self) -> TierStats:
        files = self._scan()
        with self._stats_lock:
            return dataclasses.replace(self._stats, bytes_used=sum(f.size for f in files), entries=len(files))

    # -- internals ---------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{SUFFIX}"

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for field, n in deltas.items():
                setattr(self._stats, field, getattr(self._stats, field) + n)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive flock on root/.lock; a fresh fd each time so threads exclude each other too."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _scan(self) -> list[_File]:
        """Every entry file now on disk (temp files excluded)."""
        files = []
        for shard in _scandir(self.root):
            if not (_SHARD_RE.fullmatch(shard.name) and shard.is_dir()):
                continue
            for entry in _scandir(shard.path):
                m = _ENTRY_RE.fullmatch(entry.name)
                if m is None or m.group(1)[:2] != shard.name:
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # removed by another process since the listing
                files.append(_File(st.st_mtime_ns, m.group(1), st.st_size, entry.path))
        return files

    def _evict(self, keep: str | None) -> int:
        """Unlink least recently used entries (never ``keep``) until within budget. Lock held."""
        files = self._scan()
        used = sum(f.size for f in files)
        evicted = 0
        for f in sorted(files):
            if used <= self.byte_budget:
                break
            if f.key == keep:
                continue
            try:
                os.unlink(f.path)
                evicted += 1
            except FileNotFoundError:
                pass  # deleted by someone else: its bytes are gone all the same
            except OSError as e:
                logger.error("disk tier %s: cannot evict %s: %s", self.root, f.path, e)
                self._count(errors=1)
                continue
            used -= f.size
        return evicted

    def _check_marker(self) -> None:
        """Recognise (or, in an empty directory, create) the store marker. Lock held."""
        marker = self.root / MARKER
        try:
            text = marker.read_text() if marker.exists() else None
            if text is None:
                others = [n for n in os.listdir(self.root) if n != ".lock" and not n.startswith(f".{MARKER}.")]
                if not others:
                    tmp = self.root / f".{MARKER}.{os.getpid()}.tmp"
                    tmp.write_text(f"kdn_hf store format {STORE_FORMAT}\n")
                    os.replace(tmp, marker)
                    return
        except OSError as e:
            raise StoreError(f"cannot read or create the store marker {marker}: {e}") from e
        if text is None:
            raise StoreError(
                f"{self.root} is not empty and is not a kdn_hf store (no {MARKER} file; found "
                f"{sorted(others)[:5]}); pass a new or empty directory for the store"
            )
        found = text.strip().rsplit(" ", 1)[-1]
        if not text.startswith("kdn_hf store format ") or found != STORE_FORMAT:
            raise StoreError(
                f"{self.root} holds a kdn_hf store of format {found!r}; this version reads format "
                f"{STORE_FORMAT!r}. Use another directory (or delete this one to start over)"
            )

    def _remove_stale_temps(self) -> None:
        cutoff = time.time() - STALE_TEMP_SECONDS
        for shard in _scandir(self.root):
            if not (_SHARD_RE.fullmatch(shard.name) and shard.is_dir()):
                continue
            for entry in _scandir(shard.path):
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat().st_mtime < cutoff:
                            self._unlink_quietly(entry.path)

    def _unlink_quietly(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning("disk tier %s: cannot remove temp file %s: %s", self.root, path, e)


def _scandir(path: str | Path) -> list[os.DirEntry]:
    """Directory listing that treats a directory removed meanwhile as empty."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []


def _prepare_root(root: Path) -> Path:
    if root.exists() and not root.is_dir():
        raise StoreError(f"store path {root} exists and is a file, not a directory; pass a directory path")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(
            f"cannot create store directory {root}: {e.strerror or e}; choose a path whose parent "
            "exists and is writable (or set KDN_HOME)"
        ) from e
    if not os.access(root, os.W_OK | os.X_OK):
        raise StoreError(
            f"store directory {root} is not writable by this user; fix its permissions "
            "(e.g. chmod u+rwx) or choose another path"
        )
    return root
