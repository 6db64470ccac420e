"""A disk store heals a damaged marker instead of failing, refuses directories that are not stores, and
opens a store of a newer format as all-miss without writing to it. Real files in tmp_path."""

from __future__ import annotations

import logging
import os
import random

import pytest

from kdn_hf.cli import main
from kdn_hf.errors import StoreError
from kdn_hf.store import DiskTier, KVStore, encode_entry, open_store
from kdn_hf.store.disk import MARKER, MARKER_TEXT

FP = "fp-test"
BUDGET = 1 << 24


def key(i: int) -> str:
    return f"{i:032x}"


def snapshot(root) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (directories too) with its size and mtime: what 'nothing written' compares."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def filled(tmp_path, make_chunk):
    """A disk store holding two entries (one with a temp file beside it) and the chunk of the first."""
    root = tmp_path / "store"
    chunk = make_chunk(seed=1, tokens=8)
    with KVStore([DiskTier(root, BUDGET)]) as store:
        store.put(key(1), chunk, FP)
        store.put(key(0x200), make_chunk(seed=2), FP)
    (root / "00" / f".{key(3)}.123.abcd1234.tmp").write_bytes(b"a write in progress")
    return root, chunk


def damaged_markers(seed: int = 0, n: int = 12) -> list[bytes]:
    rng = random.Random(seed)
    good = MARKER_TEXT.encode()
    out = [b"", b"\0" * len(good), good[:7], b"kdn_hf store format stor\n", b"kdn_hf store format 0\n",
           bytes(rng.randrange(256) for _ in range(40))]
    while len(out) < n:
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len("kdn_hf store format"))  # flips in the text, not the number
            b[pos] ^= 1 << rng.randrange(8)
        out.append(bytes(b))
    return out


@pytest.mark.parametrize("bad", damaged_markers(), ids=lambda b: repr(b[:12]))
def test_a_damaged_marker_is_rewritten_and_the_entries_still_served(filled, bad, caplog):
    root, chunk = filled
    (root / MARKER).write_bytes(bad)
    with caplog.at_level(logging.WARNING, logger="kdn_hf.store"):
        store = open_store(root)
    tier = store.tiers[0]
    assert (root / MARKER).read_text() == MARKER_TEXT
    assert tier.stats().repairs == 1 and tier.unreadable is None
    assert [r.getMessage() for r in caplog.records if "marker" in r.getMessage() and "rewritten" in r.getMessage()]
    hit = store.get(key(1), FP)
    assert hit.tier == "disk" and hit.chunk.kv.equal(chunk.kv)
    store.put(key(4), chunk, FP)  # and it is a working store again
    assert DiskTier(root, BUDGET).stats().repairs == 0  # the repair holds: the next open has nothing to do


def test_a_missing_marker_beside_store_files_is_rewritten(filled):
    root, chunk = filled
    (root / MARKER).unlink()
    tier = DiskTier(root, BUDGET)
    assert tier.stats().repairs == 1 and (root / MARKER).read_text() == MARKER_TEXT
    assert sorted(tier.keys()) == [key(1), key(0x200)]


def test_a_fresh_directory_is_not_a_repair(tmp_path):
    assert DiskTier(tmp_path / "new", BUDGET).stats().repairs == 0
    assert DiskTier(tmp_path / "new", BUDGET).stats().repairs == 0


@pytest.mark.parametrize("intruder", ["notes.txt", "00/readme.md", "zz/", "01/" + key(0x300) + ".kdn", "ab/x.kdn"])
def test_a_directory_with_other_files_is_refused_and_left_alone(filled, intruder):
    root, _ = filled
    path = root / intruder
    if intruder.endswith("/"):
        path.mkdir()
    else:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"someone else's")
    (root / MARKER).write_bytes(b"kdn_hf store format stor\n")
    before = snapshot(root)
    with pytest.raises(StoreError, match="not a kdn_hf store marker.*not taken over") as err:
        DiskTier(root, BUDGET)
    assert intruder.rstrip("/") in str(err.value)
    assert snapshot(root) == before  # the marker is not rewritten


def test_a_non_store_directory_without_marker_is_still_refused(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a kdn_hf store"):
        DiskTier(tmp_path / "docs", BUDGET)
    assert sorted(os.listdir(tmp_path / "docs")) == ["notes.txt"]


def test_a_newer_format_is_all_miss_never_written_and_warned_once(filled, make_chunk, caplog):
    root, chunk = filled
    (root / MARKER).write_text("kdn_hf store format 2\n")
    (root / ".lock").unlink()
    before = snapshot(root)
    with caplog.at_level(logging.WARNING, logger="kdn_hf.store"):
        store = open_store(root)
        tier = store.tiers[0]
        assert "format 2" in tier.unreadable and "newer" in tier.unreadable
        assert store.get(key(1), FP).chunk is None
        assert not tier.contains(key(1)) and not store.contains(key(1)) and tier.peek(key(1)) is None
        store.put(key(5), make_chunk(seed=5), FP)
        tier.put(key(6), b"bytes")
        assert not tier.delete(key(1)) and not store.delete(key(0x200))
        assert tier.trim() == 0 and store.trim() == 0
        assert list(tier.keys()) == []
        stats = tier.stats()
        assert (stats.hits, stats.misses, stats.rejected_puts, stats.entries, stats.repairs) == (0, 1, 2, 0, 0)
        assert store.verify(FP).unreadable == [("disk", tier.unreadable)]
        store.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "newer kdn_hf" in warnings[0].getMessage()
    assert "never written" in warnings[0].getMessage()
    assert snapshot(root) == before  # not even .lock


def test_store_verify_and_stats_report_repairs_and_unreadable_stores(filled, tmp_path, capsys):
    root, _ = filled
    (root / MARKER).write_bytes(b"kdn_hf st\xefre format 1\n")
    assert main(["store", "verify", "--store", str(root)]) == 0
    out = capsys.readouterr()
    assert "repaired on open: 1" in out.out and "checked 2 entries: 0 bad, 1 repair(s)" in out.err
    (root / MARKER).write_bytes(b"\x00\x01")
    assert main(["store", "stats", "--store", str(root)]) == 0
    assert "1 repair(s) on open" in capsys.readouterr().out

    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / MARKER).write_text("kdn_hf store format 7\n")
    assert main(["store", "verify", "--store", str(newer)]) == 1
    out = capsys.readouterr()
    assert "NOT READABLE by this version" in out.out and "format 7" in out.out
    assert "1 tier(s) not readable" in out.err
    assert main(["store", "stats", "--store", str(newer)]) == 0
    assert "NOT READABLE" in capsys.readouterr().out
    assert sorted(os.listdir(newer)) == [MARKER]


def test_a_chain_with_a_newer_disk_tier_still_serves_from_memory(tmp_path, make_chunk):
    root = tmp_path / "newer"
    root.mkdir()
    (root / MARKER).write_text("kdn_hf store format 3\n")
    store = open_store(["memory://", str(root)])
    chunk = make_chunk(seed=9)
    store.put(key(9), chunk, FP)
    assert store.get(key(9), FP).tier == "memory"
    assert sorted(os.listdir(root)) == [MARKER]
    assert encode_entry  # the entry format is unchanged by any of this
