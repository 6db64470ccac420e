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

The marker names the layout, and opening decides from it (every entry is
verified on read anyway, so the marker only guards against taking over the
wrong directory or misreading a future layout):

- missing, in an empty directory: written (a new store);
- ``kdn_hf store format 1``: opened;
- missing or damaged (unreadable text, a format that never existed) in a
  directory that holds only this layout (the marker, ``.lock``, two-hex-digit
  shard directories of ``*.kdn`` entries and temp files): rewritten, with a
  warning and a counted repair (``stats().repairs``); the entries are served;
- a newer format (``kdn_hf store format N``, N > 1): opened as all-miss with
  one warning and never written (gets and contains miss, puts are dropped and
  counted as rejected, delete/evict/gc do nothing); ``unreadable`` says why;
- anything else in a directory with other files: StoreError, the directory is
  not a store and is left alone.
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
MARKER_TEXT = f"kdn_hf store format {STORE_FORMAT}\n"
SUFFIX = ".kdn"
#: a temp file older than this is left over from a crashed writer
STALE_TEMP_SECONDS = 15 * 60

_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_ENTRY_RE = re.compile(r"([0-9a-f]{2,128})\.kdn")
_TEMP_RE = re.compile(r"\.([0-9a-f]{2,128})\.\d+\.[0-9a-f]+\.tmp")
_MARKER_RE = re.compile(rb"kdn_hf store format (\d{1,9})\s*")


class _File(NamedTuple):
    mtime_ns: int
    key: str
    size: int
    path: str


class DiskTier(StorageTier):
    """Entries as files under ``root`` (created if missing), at most ``byte_budget`` bytes in all.

    Raises StoreError when ``root`` is a file, cannot be created, is not
    writable, or is a non-empty directory that is not a kdn_hf store. A
    damaged marker is repaired; a store of a newer format is opened all-miss
    (see the module docstring).
    """

    name = "disk"

    def __init__(self, root: Path | str, byte_budget: int) -> None:
        self.byte_budget = check_budget(byte_budget, "disk")
        self.root = _prepare_root(Path(root).expanduser().absolute())
        self._stats = TierStats(name=self.name, byte_budget=self.byte_budget)
        self._stats_lock = threading.Lock()
        self.unreadable: str | None = None
        # Before taking the lock: even .lock is not ours to create in a newer store or a foreign directory.
        marker = self._read_marker()
        if self._newer_format(marker):
            return
        if not _is_readable_marker(marker):
            self._refuse_if_foreign(marker)
        with self._locked():
            self._check_marker()
            if self.unreadable:  # a newer kdn_hf wrote its marker since the first look
                return
            self._remove_stale_temps()
            self._stats.evictions = self._evict(keep=None)  # the budget may be smaller than at the last open

    # -- StorageTier -------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        path = self._path(check_key(key))
        if self.unreadable:
            self._count(misses=1)
            return None
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
        if self.unreadable:
            self._count(rejected_puts=1)
            return
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
        return self._path(check_key(key)).is_file() and not self.unreadable

    def delete(self, key: str) -> bool:
        path = self._path(check_key(key))
        if self.unreadable:
            return False
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
        if self.unreadable:
            return None
        try:
            with open(self._path(check_key(key)), "rb") as f:
                return f.read()
        except OSError:
            return None

    def trim(self) -> int:
        """Remove stale temp files and evict down to the budget now; returns entries evicted."""
        if self.unreadable:
            return 0
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
        """Every entry file now on disk (temp files excluded); none in a store this version cannot read."""
        files: list[_File] = []
        if self.unreadable:
            return files
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

    def _read_marker(self) -> bytes | None:
        """The marker's bytes, None if there is none."""
        marker = self.root / MARKER
        try:
            return marker.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot read the store marker {marker}: {e}") from e

    def _newer_format(self, marker: bytes | None) -> bool:
        """If ``marker`` names a newer format: go all-miss, warn once, return True."""
        m = _MARKER_RE.fullmatch(marker or b"")
        if m is None or int(m.group(1)) <= int(STORE_FORMAT):
            return False
        self.unreadable = (
            f"{self.root} holds a kdn_hf store of format {int(m.group(1))}, written by a newer kdn_hf; this "
            f"version reads format {STORE_FORMAT}"
        )
        logger.warning("disk tier: %s. It is opened as all-miss and never written: every chunk is computed "
                       "and nothing is stored. Upgrade kdn_hf, or use another store directory", self.unreadable)
        return True

    def _check_marker(self) -> None:
        """Recognise, create (empty directory) or repair (damaged, store layout only) the marker. Lock held."""
        text = self._read_marker()
        if _is_readable_marker(text) or self._newer_format(text):
            return
        self._refuse_if_foreign(text)
        has_entries = any(_SHARD_RE.fullmatch(n) for n in os.listdir(self.root))
        if text is not None or has_entries:
            logger.warning(
                "disk tier %s: the store marker %s is %s (%r); the directory holds only a kdn_hf store's files, so "
                "the marker was rewritten (format %s) and the entries are served (each is verified on read)",
                self.root, MARKER, "missing" if text is None else "damaged", (text or b"")[:40], STORE_FORMAT,
            )
            self._count(repairs=1)
        marker = self.root / MARKER
        tmp = self.root / f".{MARKER}.{os.getpid()}.tmp"
        try:
            tmp.write_text(MARKER_TEXT)
            os.replace(tmp, marker)
        except OSError as e:
            raise StoreError(f"cannot write the store marker {marker}: {e}") from e

    def _refuse_if_foreign(self, text: bytes | None) -> None:
        """Raise StoreError if the directory holds files a store does not (the marker is missing or damaged)."""
        foreign = _foreign_files(self.root)
        if not foreign:
            return
        found = f"found {foreign[:5]}" + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        if text is None:
            raise StoreError(f"{self.root} is not empty and is not a kdn_hf store (no {MARKER} file; {found}); "
                             "pass a new or empty directory for the store")
        raise StoreError(
            f"{self.root} has a {MARKER} file that is not a kdn_hf store marker ({text[:40]!r}) and holds files "
            f"a kdn_hf store does not ({found}); it is not taken over. Pass a new or empty directory for the "
            "store, or, if it is one, remove the other files so that the marker can be repaired"
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


def _is_readable_marker(text: bytes | None) -> bool:
    """A well-formed marker of this version's format. Format 1 is the first: a lower number was never
    written, so it counts as damage (a future version that reads older formats lists them here)."""
    m = _MARKER_RE.fullmatch(text or b"")
    return m is not None and int(m.group(1)) == int(STORE_FORMAT)


def _foreign_files(root: Path) -> list[str]:
    """Paths under ``root`` (relative) that a disk store does not create: anything but the marker,
    ``.lock``, marker temp files, and two-hex-digit shard directories of entries and entry temp files."""
    foreign = []
    for item in _scandir(root):
        name = item.name
        if name in (MARKER, ".lock") or (name.startswith(f".{MARKER}.") and name.endswith(".tmp")):
            continue
        if not (_SHARD_RE.fullmatch(name) and item.is_dir(follow_symlinks=False)):
            foreign.append(name)
            continue
        for entry in _scandir(item.path):
            m = _ENTRY_RE.fullmatch(entry.name) or _TEMP_RE.fullmatch(entry.name)
            if m is None or m.group(1)[:2] != name or not entry.is_file(follow_symlinks=False):
                foreign.append(f"{name}/{entry.name}")
    return sorted(foreign)


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
