"""Fault injection on the store, no model: damaged and colliding entries, many processes, a full disk,
a Redis that dies or stalls. Every case must end as a counted, removed miss, never an exception
and never wrong KV. Scale it up with ``--faults N`` (or KDN_TEST_FAULTS=N)."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import subprocess
import time

import pytest
import torch

from kdn_hf.keys import make_key
from kdn_hf.kv import ChunkKV
from kdn_hf.store import DiskTier, KVStore, MemoryTier, encode_entry
from kdn_hf.store.disk import SUFFIX

FP = "fp-model-a"
CODECS = ["none", "fp16", "int8", "int4"]


def chunk_for(i: int, tokens: int = 8, dtype=torch.float32) -> ChunkKV:
    """Deterministic content per i, so any reader can check what any writer stored."""
    g = torch.Generator().manual_seed(i)
    kv = torch.randn(2, 2, 2, tokens, 8, generator=g).to(dtype)
    return ChunkKV(kv, torch.arange(tokens), torch.arange(i, i + tokens))


def key_for(i: int, codec: str = "none", namespace: str = "ns", fp: str = FP) -> str:
    return make_key(fingerprint=fp, codec=codec, namespace=namespace, token_ids=list(range(i, i + 8)))


def damage(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["flip", "flips", "truncate", "extend", "zero-header", "swap-bytes"])
    b = bytearray(data)
    if kind == "flip":
        pos = rng.randrange(len(b))
        b[pos] ^= 1 << rng.randrange(8)
    elif kind == "flips":
        for _ in range(rng.randint(2, 50)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        b = b[: rng.randrange(len(b))]
    elif kind == "extend":
        b += os.urandom(rng.randint(1, 64))
    elif kind == "zero-header":
        b[:8] = b"\0" * 8
    else:
        i, j = sorted(rng.sample(range(len(b)), 2))
        if b[i] == b[j]:
            b[i] ^= 0xFF
        else:
            b[i], b[j] = b[j], b[i]
    return kind, bytes(b)


def test_damaged_entries_are_counted_removed_misses(tmp_path, fault_count):
    rng = random.Random(0)
    store = KVStore([MemoryTier(1 << 24), DiskTier(tmp_path / "s", 1 << 24)])
    memory, disk = store.tiers
    for n in range(fault_count):
        codec = CODECS[n % len(CODECS)]
        key, chunk = key_for(n, codec), chunk_for(n)
        store.put(key, chunk, FP, codec=codec)
        memory.delete(key)  # serve from disk
        path = disk.root / key[:2] / f"{key}{SUFFIX}"
        kind, bad = damage(path.read_bytes(), rng)
        path.write_bytes(bad)
        assert store.get(key, FP) == (None, None), kind
        assert not path.exists() and not store.contains(key)
        assert disk.stats().corrupt == n + 1
        store.put(key, chunk, FP, codec=codec)  # the recompute path stores it again: served fine
        got = store.get(key, FP).chunk
        assert got is not None and torch.equal(got.token_ids, chunk.token_ids)


@pytest.mark.parametrize("other", ["model", "dtype", "namespace", "codec", "key"])
def test_colliding_entries_from_elsewhere_are_misses(tmp_path, other, fault_count):
    store = KVStore([DiskTier(tmp_path / "s", 1 << 24)])
    disk = store.tiers[0]
    for n in range(max(1, fault_count // 5)):
        mine = key_for(n)
        if other == "model":
            data = encode_entry(mine, chunk_for(n), "fp-model-b")
        elif other == "dtype":  # same model name, other dtype: the fingerprint differs
            data = encode_entry(mine, chunk_for(n, dtype=torch.bfloat16), FP.replace("a", "a-bf16"))
        elif other == "namespace":
            theirs = key_for(n, namespace="other-tenant")
            data = encode_entry(theirs, chunk_for(n), FP)
        elif other == "codec":
            theirs = key_for(n, codec="int4")
            data = encode_entry(theirs, chunk_for(n), FP, codec="int4")
        else:
            data = encode_entry(key_for(n + 1000), chunk_for(n + 1000), FP)
        disk.put(mine, data)  # under my file name
        assert store.get(mine, FP) == (None, None)
        assert not disk.contains(mine)
    assert disk.stats().corrupt == max(1, fault_count // 5)


def _worker(root: str, budget: int, seed: int, rounds: int, q) -> None:
    """Writes and reads overlapping keys; reports (bad reads, exceptions)."""
    import random as _random

    rng = _random.Random(seed)
    bad = errors = 0
    try:
        store = KVStore([DiskTier(root, budget)])
        for _ in range(rounds):
            i = rng.randrange(24)
            codec = CODECS[i % len(CODECS)]
            key = key_for(i, codec)
            if rng.random() < 0.5:
                store.put(key, chunk_for(i), FP, codec=codec)
            else:
                got = store.get(key, FP).chunk
                if got is not None and not torch.equal(got.token_ids, chunk_for(i).token_ids):
                    bad += 1
            if rng.random() < 0.05:
                store.delete(key_for(rng.randrange(24), CODECS[0]))
        corrupt = store.stats()["disk"].corrupt
    except Exception as e:  # reported to the parent, which fails the test
        errors += 1
        corrupt = repr(e)
    q.put((bad, errors, corrupt))


def test_concurrent_processes_share_a_disk_tier_within_budget(tmp_path, fault_count):
    root = tmp_path / "shared"
    entry = len(encode_entry(key_for(0), chunk_for(0), FP))
    budget = 6 * entry  # far fewer than the 24 keys: constant eviction under contention
    DiskTier(root, budget)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(root), budget, s, 10 + 3 * fault_count, q)) for s in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(r[:2] == (0, 0) and r[2] == 0 for r in results), results
    tier = DiskTier(root, budget)  # a restart: accounting is recomputed from the files
    s = tier.stats()
    assert s.bytes_used <= budget
    assert not [p for p in root.rglob("*.tmp")]
    for key in tier.keys():
        assert KVStore([tier]).get(key, FP).chunk is not None


@pytest.fixture
def tiny_fs(tmp_path):
    """A 512 KiB tmpfs (root only); skips where mounting is not permitted."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_a_counted_error_not_an_exception(tiny_fs, caplog):
    store = KVStore([MemoryTier(1 << 26), DiskTier(tiny_fs / "s", 1 << 30)])  # budget above the fs size
    memory, disk = store.tiers
    stored = []
    for i in range(40):
        chunk = chunk_for(i, tokens=256)  # ~65 KiB entries: the 512 KiB fs fills after a few
        store.put(key_for(i), chunk, FP)
        stored.append(i)
    s = disk.stats()
    assert s.errors > 0 and s.puts + s.errors == 40
    assert not list(tiny_fs.rglob("*.tmp"))  # no partial entries left behind
    for i in stored:  # every put is readable from memory; disk holds whole entries or none
        got = store.get(key_for(i), FP).chunk
        assert got is not None and torch.equal(got.kv, chunk_for(i, tokens=256).kv)
    memory.close()
    for key in disk.keys():
        assert store.get(key, FP).chunk is not None
    assert "cannot write entry" in caplog.text


# -- Redis killed or stalled --------------------------------------------------


def test_redis_killed_mid_request_degrades_and_recovers(own_redis, tmp_path, fault_count):
    import threading

    from kdn_hf.store.redis import RedisTier

    redis_tier = RedisTier.from_url(own_redis.url(timeout=0.2, breaker=0.5))
    store = KVStore([redis_tier])
    keys = [key_for(i) for i in range(max(8, fault_count))]
    for i, k in enumerate(keys):
        store.put(k, chunk_for(i), FP)
    killer = threading.Timer(0.1, lambda: os.kill(own_redis.proc.pid, signal.SIGKILL))
    killer.start()
    hits = misses = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0:  # requests before, during and after the kill
        for i, k in enumerate(keys):
            hit = store.get(k, FP)
            if hit.chunk is None:
                misses += 1
            else:
                hits += 1
                assert torch.equal(hit.chunk.kv, chunk_for(i).kv)
    killer.join()
    assert hits > 0 and misses > 0 and redis_tier.stats().errors >= 1
    assert redis_tier.stats().errors <= 4  # one per breaker period (0.5 s), not one per request

    own_redis.proc.wait()
    own_redis.proc = subprocess.Popen(
        ["redis-server", "--port", str(own_redis.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # no reconnect call: the tier comes back by itself
        store.put(keys[0], chunk_for(0), FP)
        if store.get(keys[0], FP).tier == "redis":
            break
        time.sleep(0.1)
    assert store.get(keys[0], FP).tier == "redis"
    assert store.get(keys[1], FP) == (None, None)  # the restarted server lost the rest: a clean miss


def test_stalled_redis_costs_a_bounded_delay(own_redis):
    from kdn_hf.store.redis import RedisTier

    tier = RedisTier.from_url(own_redis.url(timeout=0.2, breaker=30))
    store = KVStore([tier])
    store.put(key_for(1), chunk_for(1), FP)
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        for i in range(20):
            assert store.get(key_for(1), FP) == (None, None)
            store.put(key_for(i), chunk_for(i), FP)
        elapsed = time.monotonic() - t0
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    assert elapsed < 1.0, f"40 calls on a stalled redis took {elapsed:.2f} s (breaker should skip it)"
    assert tier.stats().errors == 1 and not tier.available
