"""KVStore beyond write-through: write-back, verify, trim, note_corrupt, and chains with Redis."""

from __future__ import annotations

import pytest
import torch

from kdn_hf.errors import ConfigError, StoreError
from kdn_hf.store import DiskTier, KVStore, MemoryTier, encode_entry, open_store

FP = "fp-test"


def key(i: int) -> str:
    return f"{i:032x}"


class SlowTier(MemoryTier):
    """A memory tier whose puts wait on an event (to watch write-back happen later)."""

    def __init__(self, budget: int) -> None:
        super().__init__(budget)
        import threading

        self.gate = threading.Event()

    def put(self, key, value):
        self.gate.wait(10)
        super().put(key, value)


def test_write_back_puts_fast_tier_now_and_lower_tiers_later(make_chunk):
    slow = SlowTier(1 << 20)
    store = KVStore([MemoryTier(1 << 20), slow], write="back")
    chunk = make_chunk()
    store.put(key(1), chunk, FP)  # returns although the slow tier is blocked
    assert store.tiers[0].contains(key(1)) and not slow.contains(key(1))
    store.tiers[0].delete(key(1))
    got = store.get(key(1), FP)  # a pending write is visible
    assert torch.equal(got.chunk.kv, chunk.kv)
    slow.gate.set()
    store.flush()
    assert slow.contains(key(1))
    store.close()


def test_write_back_delete_wins_over_pending_write(make_chunk):
    slow = SlowTier(1 << 20)
    store = KVStore([MemoryTier(1 << 20), slow], write="back")
    store.put(key(1), make_chunk(), FP)
    assert store.delete(key(1)) is True
    slow.gate.set()
    store.flush()
    assert not store.contains(key(1))
    store.close()


def test_write_back_close_flushes_and_queue_overflow_writes_inline(tmp_path, make_chunk):
    store = KVStore([MemoryTier(1 << 24), DiskTier(tmp_path / "d", 1 << 24)], write="back", queue_size=1)
    for i in range(20):
        store.put(key(i), make_chunk(seed=i), FP)
    store.close()
    disk = DiskTier(tmp_path / "d", 1 << 24)
    assert sorted(disk.keys()) == [key(i) for i in range(20)]


def test_write_policy_validated(tmp_path):
    with pytest.raises(ConfigError, match="write policy"):
        KVStore([MemoryTier(10)], write="sideways")
    with pytest.raises(StoreError, match="write policy"):
        open_store("memory://", write="sideways")
    assert open_store(["memory://", tmp_path / "d"], write="back").write == "back"


def test_per_tier_budgets_and_stats(tmp_path, make_chunk):
    chunk = make_chunk(tokens=16)
    size = len(encode_entry(key(0), chunk, FP))
    store = open_store([f"memory://?budget={2 * size}", f"file://{tmp_path}/d?budget={4 * size}"])
    for i in range(6):
        store.put(key(i), make_chunk(tokens=16, seed=i), FP)
    s = store.stats()
    assert s["memory"].entries == 2 and s["memory"].evictions == 4
    assert s["disk"].entries == 4 and s["disk"].evictions == 2
    assert s["disk"].bytes_used <= 4 * size
    hit = store.get(key(2), FP)
    assert hit.tier == "disk" and store.stats()["disk"].hits == 1 and store.stats()["memory"].misses >= 1


def test_verify_reports_and_removes_bad_entries(tmp_path, make_chunk):
    store = KVStore([MemoryTier(1 << 20), DiskTier(tmp_path / "d", 1 << 20)])
    for i in range(4):
        store.put(key(i), make_chunk(seed=i), FP, codec=["none", "int4", "int8", "fp16"][i])
    memory, disk = store.tiers
    disk.put(key(5), b"junk")
    disk.put(key(6), encode_entry(key(7), make_chunk(), FP))  # another key's entry
    disk.put(key(8), encode_entry(key(8), make_chunk(), "other-model"))
    report = store.verify(fingerprint=None, remove=False)
    assert report.checked == 11 and sorted(k for _, k, _ in report.bad) == [key(5), key(6)]
    report = store.verify(fingerprint=FP)
    assert sorted(k for _, k, _ in report.bad) == [key(5), key(6), key(8)]
    assert disk.stats().corrupt == 3 and not disk.contains(key(5)) and disk.contains(key(3))


def test_trim_evicts_down_to_a_smaller_budget(tmp_path, make_chunk):
    big = DiskTier(tmp_path / "d", 1 << 20)
    for i in range(8):
        big.put(key(i), encode_entry(key(i), make_chunk(seed=i), FP))
    size = big.stats().bytes_used // 8
    small = DiskTier.__new__(DiskTier)  # trim a store opened with a smaller budget, without the open's own evict
    small.__dict__.update(big.__dict__, byte_budget=3 * size)
    assert KVStore([small]).trim() == 5
    assert big.stats().entries == 3


def test_note_corrupt_counts_in_every_tier_holding_it(tmp_path, make_chunk):
    store = KVStore([MemoryTier(1 << 20), DiskTier(tmp_path / "d", 1 << 20)])
    store.put(key(1), make_chunk(), FP)
    store.note_corrupt(key(1))
    assert not store.contains(key(1))
    assert [s.corrupt for s in store.stats().values()] == [1, 1]


def test_redis_in_a_chain_promotes_and_serves_other_processes(redis_server, tmp_path, make_chunk):
    redis_server.flush()
    url = redis_server.url(prefix="chain:")
    a = open_store(["memory://", url])
    b = open_store(["memory://", tmp_path / "b", url])  # another engine sharing the redis tier
    chunk = make_chunk(tokens=9, dtype=torch.bfloat16)
    a.put(key(1), chunk, FP, codec="int8")
    hit = b.get(key(1), FP)
    assert hit.tier == "redis" and hit.chunk.kv.dtype == torch.bfloat16
    assert b.tiers[0].contains(key(1)) and b.tiers[1].contains(key(1))  # promoted into both faster tiers
    assert b.get(key(1), FP).tier == "memory"
    hits = b.get_many([key(1), key(2)], FP)
    assert [h.tier for h in hits] == ["memory", None]
    redis_tier = a.tiers[1]
    assert redis_tier.stats().entries == 1 and redis_tier.stats().bytes_used > 0
    redis_tier.client.set("chain:" + key(3), b"garbage")
    assert a.get(key(3), FP) == (None, None) and redis_tier.stats().corrupt == 1
    assert not redis_tier.contains(key(3))


def test_redis_ttl_and_prefix_isolation(redis_server, make_chunk):
    redis_server.flush()
    a = open_store(redis_server.url(prefix="a:", ttl=100))
    b = open_store(redis_server.url(prefix="b:"))
    a.put(key(1), make_chunk(), FP)
    assert b.get(key(1), FP) == (None, None) and list(b.tiers[0].keys()) == []
    assert 0 < a.tiers[0].client.ttl("a:" + key(1)) <= 100
    assert list(a.tiers[0].keys()) == [key(1)]


@pytest.mark.parametrize("codec", ["none", "fp16", "bf16", "int8", "int4", "int4-g32", "entropy"])
@pytest.mark.parametrize("tier", ["memory", "disk", "redis"])
def test_every_codec_through_every_tier(request, tmp_path, make_chunk, codec, tier):
    if codec == "entropy":
        pytest.importorskip("zstandard")
    spec = {"memory": "memory://", "disk": tmp_path / "d"}.get(tier)
    if tier == "redis":
        spec = request.getfixturevalue("redis_server").url(prefix=f"codec-{codec}:")
    store = open_store(spec)
    chunk = make_chunk(tokens=33, head_dim=16, dtype=torch.bfloat16, seed=3)
    store.put(key(1), chunk, FP, codec=codec)
    got = store.get(key(1), FP).chunk
    assert got.kv.dtype == torch.bfloat16 and got.kv.shape == chunk.kv.shape
    err = (got.kv.float() - chunk.kv.float()).abs().max().item()
    limit = {"none": 0, "bf16": 0, "fp16": 0.01, "int8": 0.05}.get(codec, 0.6)
    assert err <= limit, f"{codec} via {tier}: max error {err}"
