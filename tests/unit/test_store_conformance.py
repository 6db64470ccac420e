"""The StorageTier contract, run over every tier; then KVStore and open_store."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from kdn_hf.errors import ConfigError, InputError, StoreError
from kdn_hf.store.base import check_budget
from kdn_hf.store import DiskTier, KVStore, MemoryTier, StorageTier, encode_entry, open_store, parse_size

FP = "fp-test"
SIZE = 100  # bytes per test value


def key(i: int) -> str:
    return f"{i:032x}"


def value(i: int, size: int = SIZE) -> bytes:
    return bytes([i % 251]) * size


@pytest.fixture(params=["memory", "disk", "redis", "redis-cluster"])
def make_tier(request, tmp_path):
    """Factory ``make_tier(byte_budget) -> StorageTier`` of the parametrized kind
    (``redis-cluster``: a real 3-master Redis Cluster, ``?cluster=1``)."""
    if request.param == "redis":
        request.getfixturevalue("redis_url")
    if request.param == "redis-cluster":
        request.getfixturevalue("redis_cluster").flush()

    def make(byte_budget: int = 10_000) -> StorageTier:
        if request.param == "memory":
            return MemoryTier(byte_budget)
        if request.param.startswith("redis"):
            from kdn_hf.store.redis import RedisTier

            server = request.getfixturevalue("redis_server" if request.param == "redis" else "redis_cluster")
            return RedisTier.from_url(server.url(prefix="test:", budget=check_budget(byte_budget, "redis")))
        return DiskTier(tmp_path / "store", byte_budget)

    return make


def needs_exact_budget(tier: StorageTier) -> None:
    if not tier.exact_budget:
        pytest.skip(f"the {tier.name} tier's eviction is its server's (maxmemory), not an exact per-tier LRU")


# -- the StorageTier contract -----------------------------------------------


def test_miss_is_none(make_tier):
    tier = make_tier()
    assert tier.get(key(1)) is None
    assert not tier.contains(key(1))
    assert tier.stats().misses == 1


def test_put_get_round_trip_bit_exact(make_tier, make_chunk):
    tier = make_tier(1_000_000)
    for i, dtype in enumerate([torch.float32, torch.float16, torch.bfloat16]):
        data = encode_entry(key(i), make_chunk(dtype=dtype, seed=i), FP)
        tier.put(key(i), data)
        assert tier.get(key(i)) == data
    tier.put(key(9), bytearray(b"\x00\xff" * 8))
    assert tier.get(key(9)) == b"\x00\xff" * 8


def test_overwrite(make_tier):
    tier = make_tier()
    tier.put(key(1), value(1))
    tier.put(key(1), value(2, SIZE + 10))
    assert tier.get(key(1)) == value(2, SIZE + 10)
    s = tier.stats()
    assert (s.entries, s.bytes_used) == (1, SIZE + 10)


def test_delete_and_contains(make_tier):
    tier = make_tier()
    tier.put(key(1), value(1))
    assert tier.contains(key(1))
    assert tier.delete(key(1)) is True
    assert not tier.contains(key(1)) and tier.get(key(1)) is None
    assert tier.delete(key(1)) is False
    assert tier.stats().bytes_used == 0


def test_lru_eviction_order(make_tier):
    tier = make_tier(3 * SIZE + SIZE // 2)
    needs_exact_budget(tier)
    for i in range(3):
        tier.put(key(i), value(i))
    assert tier.get(key(0)) is not None  # 0 is now the most recent: 1 is the LRU
    tier.put(key(3), value(3))
    assert sorted(tier.keys()) == [key(0), key(2), key(3)]
    tier.put(key(4), value(4))
    assert sorted(tier.keys()) == [key(0), key(3), key(4)]
    s = tier.stats()
    assert s.evictions == 2 and s.bytes_used == 3 * SIZE <= s.byte_budget


def test_contains_does_not_refresh_recency(make_tier):
    tier = make_tier(2 * SIZE)
    needs_exact_budget(tier)
    tier.put(key(0), value(0))
    tier.put(key(1), value(1))
    assert tier.contains(key(0))
    tier.put(key(2), value(2))
    assert not tier.contains(key(0)) and tier.contains(key(1))


def test_oversize_put_rejected(make_tier):
    tier = make_tier(SIZE)
    tier.put(key(1), value(1))
    tier.put(key(1), value(1, SIZE + 1))
    assert tier.get(key(1)) is None  # the older value does not outlive the rejected newer one
    s = tier.stats()
    assert (s.rejected_puts, s.puts, s.entries, s.bytes_used) == (1, 1, 0, 0)


def test_stats_counters(make_tier):
    tier = make_tier(10 * SIZE)
    tier.put(key(1), value(1))
    tier.put(key(2), value(2))
    tier.get(key(1))
    tier.get(key(1))
    tier.get(key(3))
    tier.note_corrupt(key(2))
    s = tier.stats()
    assert s.name == tier.name
    assert (s.hits, s.misses, s.puts, s.corrupt, s.errors) == (2, 1, 2, 1, 0)
    assert (s.bytes_written, s.bytes_read) == (2 * SIZE, 2 * SIZE)
    assert (s.entries, s.bytes_used, s.byte_budget) == (1, SIZE, 10 * SIZE)
    assert set(s.as_dict()) >= {"name", "hits", "misses", "bytes_used"}


def test_get_many_put_many_keys(make_tier):
    tier = make_tier()
    tier.put_many((key(i), value(i)) for i in range(4))
    assert tier.get_many([key(3), key(9), key(0)]) == [value(3), None, value(0)]
    assert sorted(tier.keys()) == [key(i) for i in range(4)]


@pytest.mark.parametrize("bad", ["", "a", "../../etc/passwd", "ABCDEF01", "ab/cd", "g" * 32, "a" * 129, 12])
def test_bad_keys_raise(make_tier, bad):
    tier = make_tier()
    for call in (tier.get, tier.contains, tier.delete, lambda k: tier.put(k, b"x")):
        with pytest.raises(InputError, match="hex"):
            call(bad)


def test_bad_value_and_budget(make_tier):
    with pytest.raises(InputError, match="bytes"):
        make_tier().put(key(1), "not bytes")
    for budget in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="byte_budget"):
            make_tier(budget)


def test_close_is_idempotent(make_tier):
    tier = make_tier()
    tier.close()
    tier.close()


# -- KVStore ----------------------------------------------------------------


@pytest.fixture
def chain(tmp_path):
    return KVStore([MemoryTier(1 << 20), DiskTier(tmp_path / "store", 1 << 20)])


def test_kvstore_miss_put_get(chain, make_chunk):
    assert chain.get(key(1), FP) == (None, None)
    chunk = make_chunk(dtype=torch.bfloat16, meta={"text": "x"})
    chain.put(key(1), chunk, FP)
    got, tier = chain.get(key(1), FP)
    assert tier == "memory" and torch.equal(got.kv, chunk.kv) and got.meta == {"text": "x"}
    assert all(t.contains(key(1)) for t in chain.tiers)  # write-through


def test_kvstore_promotes_from_disk_to_memory(chain, make_chunk):
    memory, disk = chain.tiers
    chunk = make_chunk()
    disk.put(key(1), encode_entry(key(1), chunk, FP))
    got, tier = chain.get(key(1), FP)
    assert tier == "disk" and torch.equal(got.kv, chunk.kv)
    assert memory.contains(key(1))
    assert chain.get(key(1), FP).tier == "memory"


def test_kvstore_corrupt_disk_file_is_a_removed_counted_miss(chain, make_chunk, caplog):
    memory, disk = chain.tiers
    disk.put(key(1), encode_entry(key(1), make_chunk(), FP))
    path = disk.root / key(1)[:2] / f"{key(1)}.kdn"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="kdn_hf.store"):
        assert chain.get(key(1), FP) == (None, None)
    assert "checksum" in caplog.text
    assert not path.exists() and not memory.contains(key(1))
    assert chain.stats()["disk"].corrupt == 1


def test_kvstore_corrupt_fast_tier_falls_through(chain, make_chunk):
    memory, disk = chain.tiers
    chunk = make_chunk()
    chain.put(key(1), chunk, FP)
    memory.put(key(1), b"garbage")
    got, tier = chain.get(key(1), FP)
    assert tier == "disk" and torch.equal(got.kv, chunk.kv)
    assert chain.stats()["memory"].corrupt == 1
    assert chain.get(key(1), FP).tier == "memory"  # promoted again, the good bytes this time


def test_kvstore_colliding_entry_is_a_miss(chain, make_chunk):
    _, disk = chain.tiers
    disk.put(key(1), encode_entry(key(2), make_chunk(), FP))  # another key's entry under key(1)'s file name
    assert chain.get(key(1), FP) == (None, None)
    assert not disk.contains(key(1))
    chain.put(key(3), make_chunk(), "another-model")
    assert chain.get(key(3), FP) == (None, None)
    assert chain.stats()["disk"].corrupt == 2 and chain.stats()["memory"].corrupt == 1


def test_kvstore_get_many(chain, make_chunk):
    memory, disk = chain.tiers
    chunks = [make_chunk(seed=i) for i in range(3)]
    chain.put(key(0), chunks[0], FP)
    disk.put(key(1), encode_entry(key(1), chunks[1], FP))
    disk.put(key(2), b"garbage")
    hits = chain.get_many([key(0), key(1), key(2), key(3)], FP)
    assert [h.tier for h in hits] == ["memory", "disk", None, None]
    assert torch.equal(hits[1].chunk.kv, chunks[1].kv) and hits[2].chunk is None
    assert memory.contains(key(1)) and not disk.contains(key(2))


def test_kvstore_contains_delete_stats_close(tmp_path, make_chunk):
    store = KVStore([MemoryTier(1 << 20), DiskTier(tmp_path / "a", 1 << 20), DiskTier(tmp_path / "b", 1 << 20)])
    assert list(store.stats()) == ["memory", "disk", "disk#2"]
    store.put(key(1), make_chunk(), FP)
    assert store.contains(key(1))
    assert store.delete(key(1)) is True and not store.contains(key(1))
    assert store.delete(key(1)) is False
    with store:
        pass
    store.close()
    with pytest.raises(ConfigError):
        KVStore([])


# -- open_store ---------------------------------------------------------------


def test_parse_size():
    assert parse_size(4096) == 4096
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("10k") == 10 * 1024
    for bad in ("", "2 parsecs", "-1", 0, "GiB", None):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_open_store_specs(tmp_path, monkeypatch):
    monkeypatch.setenv("KDN_HOME", str(tmp_path / "home"))
    default = open_store(None)
    assert [type(t) for t in default.tiers] == [DiskTier]
    assert default.tiers[0].root == tmp_path / "home" / "store"
    assert default.tiers[0].byte_budget == 20 * 2**30
    mem = open_store("memory://?budget=512MiB").tiers[0]
    assert isinstance(mem, MemoryTier) and mem.byte_budget == 512 * 2**20
    assert open_store("memory://", memory_budget="1MiB").tiers[0].byte_budget == 2**20
    assert open_store(f"file://{tmp_path}/f?budget=3GiB").tiers[0].byte_budget == 3 * 2**30
    assert open_store(tmp_path / "p").tiers[0].root == tmp_path / "p"
    assert open_store(str(tmp_path / "s"), disk_budget=1000).tiers[0].byte_budget == 1000
    chain = open_store(["memory://", tmp_path / "c"])
    assert list(chain.stats()) == ["memory", "disk"]
    assert open_store(chain) is chain


def test_open_store_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert open_store("~/kdn").tiers[0].root == tmp_path / "kdn"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("s3://bucket/x", "allowed: file://, memory://, redis://"),
        ("memory://host", "memory store URLs"),
        ("memory://?size=1", "unknown store URL parameter"),
        ("memory://?budget=lots", "bad budget"),
        ("file://relative/dir", "absolute"),
        ([], "empty list"),
        (42, "cannot open a store"),
    ],
)
def test_open_store_errors(spec, message):
    with pytest.raises(StoreError, match=message):
        open_store(spec)


def test_open_store_bad_paths(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        open_store(afile)
    with pytest.raises(StoreError, match="does not exist"):
        open_store(afile / "sub")
    with pytest.raises(StoreError, match="mkdir -p"):
        open_store(tmp_path / "no-such-dir" / "store")
    with pytest.raises(StoreError, match="does not exist"):
        open_store(f"file://{tmp_path}/missing/store")
    assert not (tmp_path / "no-such-dir").exists()
    open_store(tmp_path / "new-store")  # a missing store under an existing parent is created
    assert (tmp_path / "new-store" / "KDN_STORE").is_file()
    with pytest.raises(StoreError, match="bad store budget"):
        open_store(tmp_path / "ok", disk_budget="-3")
    assert not os.path.exists(tmp_path / "ok")


def test_open_store_imports_remote_tiers_lazily():
    """The redis tier is looked up lazily: nothing is imported for other schemes."""

    code = "import sys; from kdn_hf.store import open_store; open_store('memory://'); print('kdn_hf.store.redis' in sys.modules, 'redis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_open_store_redis_url_params(redis_server):
    tier = open_store(redis_server.url(3, prefix="app:", ttl=60, timeout=0.5, breaker=2, budget="1MiB")).tiers[0]
    assert (tier.name, tier.prefix, tier.ttl_s, tier.breaker_s, tier.byte_budget) == ("redis", "app:", 60, 2.0, 2**20)
    assert tier.client.connection_pool.connection_kwargs["db"] == 3
    for bad in ("timeout=0", "ttl=x", "budget=lots"):
        with pytest.raises(StoreError):
            open_store(redis_server.url() + "?" + bad)
