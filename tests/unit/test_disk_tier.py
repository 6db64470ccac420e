"""DiskTier specifics: shared budget across objects, processes and restarts; atomic writes; paths."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import time

import pytest

from kdn_hf.errors import InputError, StoreError
from kdn_hf.store import DiskTier, decode_entry, encode_entry
from kdn_hf.store import disk as disk_module

SIZE = 100
FP = "fp-test"


def key(i: int) -> str:
    return f"{i:032x}"


def value(i: int, size: int = SIZE) -> bytes:
    return bytes([i % 251]) * size


def files_under(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_layout_and_marker(tmp_path):
    tier = DiskTier(tmp_path / "s", 10 * SIZE)
    tier.put(key(0xAB), value(1))
    assert (tmp_path / "s" / "KDN_STORE").read_text().startswith("kdn_hf store format ")
    assert (tmp_path / "s" / "00" / f"{key(0xAB)}.kdn").read_bytes() == value(1)
    assert files_under(tmp_path / "s") == [".lock", f"00/{key(0xAB)}.kdn", "KDN_STORE"]


def test_get_refreshes_mtime(tmp_path):
    tier = DiskTier(tmp_path, 10 * SIZE)
    tier.put(key(1), value(1))
    path = tmp_path / "00" / f"{key(1)}.kdn"
    os.utime(path, (1_000_000, 1_000_000))
    tier.contains(key(1))
    assert path.stat().st_mtime == 1_000_000
    tier.get(key(1))
    assert path.stat().st_mtime > time.time() - 60


def test_budget_holds_across_two_tiers_on_one_root(tmp_path):
    budget = 3 * SIZE + SIZE // 2
    a, b = DiskTier(tmp_path, budget), DiskTier(tmp_path, budget)
    a.put(key(0), value(0))
    b.put(key(1), value(1))
    a.put(key(2), value(2))
    assert b.get(key(0)) == value(0)  # a hit through b refreshes the entry for a's eviction too
    a.put(key(3), value(3))
    assert sorted(b.keys()) == [key(0), key(2), key(3)]
    b.put(key(4), value(4))
    assert sorted(a.keys()) == [key(0), key(3), key(4)]
    assert a.stats().bytes_used == b.stats().bytes_used == 3 * SIZE
    assert a.stats().evictions == 1 and b.stats().evictions == 1


def test_budget_holds_across_reopen(tmp_path):
    tier = DiskTier(tmp_path, 5 * SIZE)
    for i in range(5):
        tier.put(key(i), value(i))
    tier.get(key(0))
    tier.close()
    again = DiskTier(tmp_path, 5 * SIZE)
    assert again.get(key(3)) == value(3) and again.stats().entries == 5
    smaller = DiskTier(tmp_path, 2 * SIZE)  # a smaller budget is enforced at open, LRU first
    assert sorted(smaller.keys()) == [key(0), key(3)]
    assert smaller.stats().evictions == 3
    smaller.put(key(9), value(9))
    assert sorted(smaller.keys()) == [key(3), key(9)]


def test_accounting_is_derived_from_files(tmp_path):
    tier = DiskTier(tmp_path, 3 * SIZE)
    for i in range(3):
        tier.put(key(i), value(i))
    (tmp_path / "00" / f"{key(0)}.kdn").unlink()  # removed behind the tier's back (another tool, a user)
    assert tier.stats().bytes_used == 2 * SIZE
    tier.put(key(3), value(3))
    assert sorted(tier.keys()) == [key(1), key(2), key(3)] and tier.stats().evictions == 0


def test_failed_write_is_logged_counted_and_leaves_nothing(tmp_path, monkeypatch, caplog):
    tier = DiskTier(tmp_path, 10 * SIZE)
    tier.put(key(1), value(1))

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_module.os, "fsync", disk_full)
    with caplog.at_level(logging.ERROR, logger="kdn_hf.store"):
        tier.put(key(2), value(2))
    assert "No space left" in caplog.text
    monkeypatch.undo()

    def denied(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(disk_module.os, "replace", denied)
    tier.put(key(1), value(7))
    monkeypatch.undo()
    assert tier.get(key(2)) is None and tier.get(key(1)) == value(1)
    assert tier.stats().errors == 2 and tier.stats().puts == 1
    assert files_under(tmp_path) == [".lock", f"00/{key(1)}.kdn", "KDN_STORE"]  # no temp file left


def test_crash_leftovers_are_invisible_and_cleaned_when_stale(tmp_path):
    tier = DiskTier(tmp_path, 10 * SIZE)
    tier.put(key(1), value(1))
    shard = tmp_path / "00"
    stale, fresh = shard / f".{key(2)}.1.aaaa.tmp", shard / f".{key(3)}.2.bbbb.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"in progress")
    old = time.time() - disk_module.STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    assert tier.get(key(2)) is None and sorted(tier.keys()) == [key(1)]
    assert tier.stats().bytes_used == SIZE
    DiskTier(tmp_path, 10 * SIZE)
    assert not stale.exists() and fresh.exists()


def test_creates_missing_directories(tmp_path):
    root = tmp_path / "a" / "b" / "c"
    DiskTier(root, SIZE).put(key(1), value(1))
    assert (root / "KDN_STORE").is_file()


def test_bad_roots(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        DiskTier(afile, SIZE)
    with pytest.raises(StoreError, match="cannot create"):
        DiskTier(afile / "sub", SIZE)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a kdn_hf store"):
        DiskTier(tmp_path / "docs", SIZE)
    monkeypatch.setattr(disk_module.os, "access", lambda path, mode: False)
    with pytest.raises(StoreError, match="not writable"):
        DiskTier(tmp_path / "ro", SIZE)


def test_path_traversal_keys_rejected(tmp_path):
    tier = DiskTier(tmp_path / "s", 10 * SIZE)
    for bad in ("../" + key(1), "/etc/passwd", key(1) + "/..", "..", key(0xAB).upper()):
        with pytest.raises(InputError, match="lowercase hex"):
            tier.put(bad, value(1))
    assert files_under(tmp_path) == ["s/.lock", "s/KDN_STORE"]


# A worker process loads only the disk tier: registering the two packages
# without running their __init__ keeps torch and transformers out of the
# child, which makes spawning four of them fast. A read must be a whole entry.
_WORKER = """
import random, sys, types
for name, path in (("kdn_hf", pkg_dir), ("kdn_hf.store", pkg_dir + "/store")):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = [path]
from kdn_hf.store.disk import DiskTier

tier = DiskTier(root, budget)
rng = random.Random(seed)
keys = sorted(entries)
for _ in range(40):
    k = rng.choice(keys)
    if rng.random() < 0.5:
        tier.put(k, entries[k])
    else:
        got = tier.get(k)
        if got is not None and got != entries[k]:
            raise SystemExit(f"torn or foreign read for {k}")
if tier.stats().errors:
    raise SystemExit("write errors")
"""


def test_budget_holds_across_processes(tmp_path, make_chunk):
    entries = {key(i): encode_entry(key(i), make_chunk(tokens=8, seed=i), FP) for i in range(12)}
    budget = 5 * max(len(v) for v in entries.values())
    root = str(tmp_path / "shared")
    DiskTier(root, budget)
    pkg_dir = os.path.dirname(os.path.dirname(disk_module.__file__))
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=exec, args=(_WORKER, {"pkg_dir": pkg_dir, "root": root, "budget": budget,
                                                 "entries": entries, "seed": seed}))
        for seed in range(4)
    ]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    tier = DiskTier(root, budget)
    assert 0 < tier.stats().bytes_used <= budget
    for k in tier.keys():
        assert decode_entry(tier.get(k), key=k, fingerprint=FP).num_tokens == 8
    assert not [f for f in files_under(root) if f.endswith(".tmp")]
