"""Fault injection with the real model: whatever happens to the store, the answer equals the
recompute path's, no exception reaches the user, and the bad entry is counted and removed.
Also: codecs end to end (``KDN(codec=...)``). Scale with ``--faults N`` / KDN_TEST_FAULTS."""

from __future__ import annotations

import os
import random
import signal
import subprocess

import pytest
import torch

from kdn_hf import KDN
from kdn_hf.compute import prefill
from kdn_hf.store import encode_entry
from kdn_hf.store.disk import SUFFIX

Q = "Question: Who won two Nobel Prizes? Answer:"
N_NEW = 4


@pytest.fixture
def chunks(docs):
    return [docs[0] + "\n\n", docs[1] + "\n\n", docs[3] + "\n\n", Q]


@pytest.fixture
def reference(smol, chunks):
    """The recompute path: a cold store, every chunk computed on its own."""
    model, tok = smol
    return KDN(model, tok, store="memory://").generate(chunks, max_new_tokens=N_NEW, mode="reuse").token_ids


def _entry_files(kdn) -> list:
    return sorted(kdn.store.tiers[0].root.rglob(f"*{SUFFIX}"))


def test_damaged_entries_answer_like_recompute(kdn, chunks, reference, fault_count):
    rng = random.Random(1)
    kdn.ingest(chunks[:-1])
    disk = kdn.store.tiers[0]
    n = max(3, fault_count // 5)
    for i in range(n):
        path = rng.choice(_entry_files(kdn))
        data = bytearray(path.read_bytes())
        kind = ("flip", "truncate", "extend")[i % 3]
        if kind == "flip":
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            data = data[: rng.randrange(len(data))]
        else:
            data += b"\x00junk"
        path.write_bytes(bytes(data))
        res = kdn.generate(chunks, max_new_tokens=N_NEW, mode="reuse")
        assert res.token_ids == reference, kind
        assert res.stats.misses == 1 and disk.stats().corrupt == i + 1
        assert path.exists()  # recomputed and stored back, whole
    assert kdn.generate(chunks, max_new_tokens=N_NEW, mode="reuse").stats.misses == 0


def test_colliding_entries_answer_like_recompute(kdn, smol, chunks, reference):
    model, tok = smol
    disk = kdn.store.tiers[0]
    kdn.ingest(chunks[:-1])
    mine = sorted(disk.keys())
    other_ns = KDN(model, tok, store=disk.root, namespace="other-tenant")
    theirs = sorted(set(other_ns.ingest(chunks[:-1])))
    assert not set(mine) & set(theirs)  # a namespace is part of the key
    # under my file names: another namespace's entry, another model's, and one in another dtype
    for k, t in zip(mine, theirs):
        disk.put(k, disk.peek(t))
    res = kdn.generate(chunks, max_new_tokens=N_NEW, mode="reuse")
    assert res.token_ids == reference and res.stats.hit_count == 0
    assert disk.stats().corrupt == len(mine)
    chunk0, chunk1 = (kdn.store.get(k, kdn.fingerprint.digest).chunk for k in mine[:2])
    disk.put(mine[0], encode_entry(mine[0], chunk0, "fingerprint-of-another-model"))
    bf16 = type(chunk1)(chunk1.kv.to(torch.bfloat16), chunk1.positions, chunk1.token_ids)
    disk.put(mine[1], encode_entry(mine[1], bf16, kdn.fingerprint.digest))  # right model id, wrong dtype
    res = kdn.generate(chunks, max_new_tokens=N_NEW, mode="reuse")
    assert res.token_ids == reference
    assert disk.stats().corrupt == len(mine) + 2 and res.stats.misses == 2


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_answers_like_recompute(smol, chunks, reference, tiny_fs):
    model, tok = smol
    kdn = KDN(model, tok, store=tiny_fs / "store")  # fp32 entries of ~1.5 MiB: the 2 MiB fs fills at once
    for _ in range(2):
        res = kdn.generate(chunks, max_new_tokens=N_NEW, mode="reuse")
        assert res.token_ids == reference
    s = kdn.store.stats()["disk"]
    assert s.errors > 0 and s.corrupt == 0
    assert not list(tiny_fs.rglob("*.tmp"))


def test_redis_killed_answers_like_recompute(smol, chunks, reference, own_redis):
    model, tok = smol
    kdn = KDN(model, tok, store=own_redis.url(timeout=0.2, breaker=1))
    kdn.ingest(chunks[:-1])
    warm = kdn.generate(chunks, max_new_tokens=N_NEW, mode="reuse")
    assert warm.token_ids == reference and warm.stats.hits == {"redis": 3 + (1 if kdn.opener else 0)}
    os.kill(own_redis.proc.pid, signal.SIGKILL)
    own_redis.proc.wait()
    res = kdn.generate(chunks, max_new_tokens=N_NEW, mode="reuse")
    assert res.token_ids == reference and res.stats.hit_count == 0
    assert kdn.store.stats()["redis"].errors >= 1


@pytest.mark.parametrize("codec", ["fp16", "int8", "int4", "entropy"])
def test_codecs_end_to_end(smol, chunks, codec):
    if codec == "entropy":
        pytest.importorskip("zstandard")
    model, tok = smol
    ref = KDN(model, tok, store="memory://")
    kdn = KDN(model, tok, store="memory://", codec=codec)
    kdn.ingest(chunks[:-1])
    res = kdn.generate(chunks, max_new_tokens=N_NEW, mode="reuse")
    assert res.stats.misses == 0 and res.stats.hit_count >= 3
    entry = next(iter(kdn.store.tiers[0]._data.values()))
    assert f'"codec":"{codec}"'.encode() in entry[:4000]

    def first_token_logprobs(k: KDN):
        cache = k.prepare(chunks[:-1], mode="reuse")
        q = torch.tensor(tok(Q, add_special_tokens=False)["input_ids"])
        n = cache.get_seq_length()
        with torch.inference_mode():
            _, logits = prefill(model, q, torch.arange(n, n + len(q)), cache=cache)
        return torch.log_softmax(logits.float(), -1)

    p, q = first_token_logprobs(ref), first_token_logprobs(kdn)
    kl = torch.sum(p.exp() * (p - q)).item()
    assert kl < 0.02, f"{codec}: first-token KL {kl:.4f} vs uncompressed"
    assert p.argmax() == q.argmax()


def test_a_damaged_store_marker_is_healed_and_the_request_answered(smol, tmp_path, chunks, reference):
    """Bit flips in the disk store's marker used to make KDN(...) raise; now the marker is rewritten
    (a counted repair) and the stored chunks are hits."""
    model, tok = smol
    root = tmp_path / "store"
    KDN(model, tok, store=root).ingest(chunks[:-1])
    marker = root / "KDN_STORE"
    data = bytearray(marker.read_bytes())
    for pos in (0, 3, 9, 14):  # "kdn_hf store format" -> garbage, as a disk fault would leave it
        data[pos] ^= 0x44
    marker.write_bytes(bytes(data))
    kdn = KDN(model, tok, store=root)
    assert kdn.store.tiers[0].stats().repairs == 1
    res = kdn.generate(chunks, max_new_tokens=N_NEW, mode="reuse")
    assert res.token_ids == reference
    assert res.stats.hits == {"disk": len(chunks) - 1} and res.stats.misses == 0  # every document from the store
    assert marker.read_text().startswith("kdn_hf store format 1")
