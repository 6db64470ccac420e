"""The Redis tier on a real 3-master Redis Cluster (``?cluster=1``): batches across hash slots, prefix
isolation, scans of every master, and a master killed mid-run. No mocks: the cluster is made of
redis-server processes on free loopback ports (see ``RedisClusterServers`` in tests/conftest.py);
the tests skip when redis-server / redis-cli are not installed. The StorageTier contract itself runs
on the cluster too (test_store_conformance.py, ``[redis-cluster]``)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kdn_hf.errors import StoreError
from kdn_hf.store import KVStore, open_store

FP = "fp-test"


def key(i: int) -> str:
    return f"{i:032x}"


def tier_of(url: str):
    return open_store(url).tiers[0]


def masters_holding(tier, names) -> set[str]:
    return {tier.client.get_node_from_key(n).name for n in names}


def node_dbsize(port: int) -> int:
    import redis

    return redis.Redis(port=port).dbsize()


def test_batches_span_every_master_and_round_trip(redis_cluster, make_chunk):
    redis_cluster.flush()
    tier = tier_of(redis_cluster.url(prefix="batch:"))
    items = [(key(i), bytes([i % 251]) * (100 + i)) for i in range(64)]
    assert len(masters_holding(tier, ["batch:" + k for k, _ in items])) == 3  # one batch, every master
    assert len({tier.client.keyslot("batch:" + k) for k, _ in items}) == 64
    tier.put_many(items)
    got = tier.get_many([k for k, _ in items] + [key(999)])
    assert got == [v for _, v in items] + [None]
    assert all(node_dbsize(p) > 0 for p in redis_cluster.ports)
    s = tier.stats()
    assert (s.hits, s.misses, s.puts, s.errors) == (64, 1, 64, 0)

    store = KVStore([tier])  # whole entries, through the chain: checksums verified on the way out
    chunks = [make_chunk(tokens=7, seed=i) for i in range(6)]
    for i, c in enumerate(chunks):
        store.put(key(100 + i), c, FP)
    hits = store.get_many([key(100 + i) for i in range(6)] + [key(200)], FP)
    assert [h.tier for h in hits] == ["redis"] * 6 + [None]
    assert all(torch.equal(h.chunk.kv, c.kv) for h, c in zip(hits, chunks))


def test_prefix_isolation(redis_cluster):
    redis_cluster.flush()
    a, b = tier_of(redis_cluster.url(prefix="a:")), tier_of(redis_cluster.url(prefix="b:"))
    a.put_many((key(i), b"A" * 10) for i in range(20))
    b.put_many((key(i), b"B" * 20) for i in range(5))
    assert a.get(key(3)) == b"A" * 10 and b.get(key(3)) == b"B" * 20
    assert b.get(key(10)) is None
    assert sorted(a.keys()) == [key(i) for i in range(20)] and sorted(b.keys()) == [key(i) for i in range(5)]
    assert (a.stats().entries, a.stats().bytes_used) == (20, 200)
    assert (b.stats().entries, b.stats().bytes_used) == (5, 100)
    assert b.delete(key(3)) and a.contains(key(3)) and not b.contains(key(3))
    odd = tier_of(redis_cluster.url(prefix="x*[?]:"))  # glob characters in the prefix are escaped in SCAN
    odd.put(key(1), b"x")
    assert list(odd.keys()) == [key(1)] and a.stats().entries == 20


def test_stats_and_keys_scan_every_master(redis_cluster):
    redis_cluster.flush()
    tier = tier_of(redis_cluster.url(prefix="scan:"))
    n = 2500  # more than one SCAN page (count=1000) on some master
    tier.put_many((key(i), b"v" * (i % 7 + 1)) for i in range(n))
    assert sorted(tier.keys()) == [key(i) for i in range(n)]
    assert sum(node_dbsize(p) for p in redis_cluster.ports) == n
    assert all(node_dbsize(p) > n // 5 for p in redis_cluster.ports)
    s = tier.stats()
    assert (s.entries, s.bytes_used) == (n, sum(i % 7 + 1 for i in range(n)))


def test_evictions_are_summed_over_masters(redis_cluster):
    import redis

    redis_cluster.flush()
    nodes = [redis.Redis(port=p) for p in redis_cluster.ports]
    before = sum(int(r.info("stats")["evicted_keys"]) for r in nodes)
    try:
        for r in nodes:
            r.config_set("maxmemory", "4mb")
        tier = tier_of(redis_cluster.url(prefix="evict:", timeout=2))
        for i in range(0, 120, 10):
            tier.put_many((key(i + j), bytes([j]) * 200_000) for j in range(10))
        per_node = [int(r.info("stats")["evicted_keys"]) for r in nodes]
        s = tier.stats()
        assert s.errors == 0
        assert sum(1 for n in per_node if n) >= 2  # evictions on several masters ...
        assert s.evictions == sum(per_node) > before  # ... and the tier reports their sum
        assert s.entries < 120
    finally:
        for r in nodes:
            r.config_set("maxmemory", "0")
        redis_cluster.flush()


def test_cluster_url_errors_and_unreachable_cluster():
    pytest.importorskip("redis")
    with pytest.raises(StoreError, match="only db 0"):
        open_store("redis://127.0.0.1:6379/2?cluster=1")
    # nothing listens on port 1: opening succeeds (the cluster is discovered on first use), calls miss
    tier = tier_of("redis://127.0.0.1:1/0?cluster=1&timeout=0.2&breaker=30")
    t0 = time.monotonic()
    assert tier.get(key(1)) is None and tier.get_many([key(1), key(2)]) == [None, None]
    tier.put(key(1), b"x")
    assert not tier.contains(key(1)) and list(tier.keys()) == [] and tier.stats().entries == 0
    assert time.monotonic() - t0 < 2.0
    assert tier.stats().errors == 1 and not tier.available
    tier.close()


def test_master_killed_mid_run_is_a_bounded_miss_then_recovers(own_redis_cluster, make_chunk):
    cluster = own_redis_cluster
    tier = tier_of(cluster.url(prefix="kill:", timeout=0.2, breaker=0.3))
    store = KVStore([tier])
    keys = [key(i) for i in range(24)]
    chunks = [make_chunk(tokens=4, seed=i) for i in range(len(keys))]
    assert len(masters_holding(tier, ["kill:" + k for k in keys])) == 3
    for k, c in zip(keys, chunks):
        store.put(k, c, FP)
    assert all(h.tier == "redis" for h in store.get_many(keys, FP))

    killer = threading.Timer(0.3, cluster.kill, args=(1,))
    killer.start()
    hits = misses = 0
    slowest = 0.0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.0:  # before, during and after the kill; the cluster then fails
        for i, k in enumerate(keys):
            c0 = time.monotonic()
            hit = store.get(k, FP)
            batch = store.get_many(keys[:6], FP)
            store.put(k, chunks[i], FP)
            tier.stats()
            slowest = max(slowest, time.monotonic() - c0)
            if hit.chunk is None:
                misses += 1
            else:
                hits += 1
                assert torch.equal(hit.chunk.kv, chunks[i].kv)
            assert len(batch) == 6
    killer.join()
    assert hits > 0 and misses > 0
    assert slowest < 1.0, f"one round of calls took {slowest:.2f} s with a master down"
    errors = tier.stats().errors
    assert 1 <= errors <= 2.0 / 0.3 + 3  # about one per breaker period, not one per call

    cluster.restart(1)  # the master comes back (empty) with its slots; the client finds it by itself
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        store.put(keys[0], chunks[0], FP)
        if store.get(keys[0], FP).tier == "redis" and cluster.state_ok():
            break
        time.sleep(0.2)
    assert store.get(keys[0], FP).tier == "redis"
    tier.put_many((k, b"again") for k in keys)
    assert tier.get_many(keys) == [b"again"] * len(keys)
