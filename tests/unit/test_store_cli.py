"""``kdn store stats|ls|verify|gc|rm`` on a store filled without a model."""

from __future__ import annotations

import json

from kdn_hf.cli import main
from kdn_hf.store import DiskTier, KVStore, encode_entry

FP = "fp-test"


def key(i: int) -> str:
    return f"{i:032x}"


def fill(root, make_chunk, n=5):
    store = KVStore([DiskTier(root, 1 << 24)])
    for i in range(n):
        store.put(key(i), make_chunk(seed=i, tokens=16), FP, codec=["none", "int4"][i % 2])
    return store


def test_ls_verify_gc_rm(tmp_path, make_chunk, capsys):
    root = tmp_path / "s"
    store = fill(root, make_chunk)
    disk = store.tiers[0]
    disk.put(key(9), b"not an entry")
    disk.put(key(8), encode_entry(key(7), make_chunk(), FP))
    s = ["--store", str(root)]

    assert main(["store", "ls", "--json", *s]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 7 and {r["codec"] for r in rows} == {"none", "int4", "?"}
    assert main(["store", "ls", *s]) == 0 and key(0) in capsys.readouterr().out

    assert main(["store", "verify", "--keep", *s]) == 1
    out = capsys.readouterr()
    assert "kept" in out.out and "2 bad" in out.err and disk.contains(key(9))
    assert main(["store", "verify", *s]) == 1
    assert main(["store", "verify", *s]) == 0
    assert "checked 5 entries: 0 bad" in capsys.readouterr().err
    assert main(["store", "stats", "--json", *s]) == 0
    assert json.loads(capsys.readouterr().out)["disk"]["entries"] == 5

    size = max(len(disk.peek(k)) for k in disk.keys())
    assert main(["store", "gc", "--budget", str(3 * size), *s]) == 0
    assert DiskTier(root, 1 << 24).stats().entries <= 3
    capsys.readouterr()

    left = sorted(DiskTier(root, 1 << 24).keys())
    assert main(["store", "rm", left[0], *s]) == 0
    assert "removed 1 of 1" in capsys.readouterr().out
    assert main(["store", "rm", "--all", *s]) == 0
    assert list(DiskTier(root, 1 << 24).keys()) == []
