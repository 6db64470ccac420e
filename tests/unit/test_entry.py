"""The entry format: round trips bit-exact, and every damage is a CorruptEntryError."""

from __future__ import annotations

import struct

import pytest
import safetensors.torch
import torch

from kdn_hf.errors import ConfigError, CorruptEntryError, InputError
from kdn_hf.store import entry
from kdn_hf.store.entry import decode_entry, encode_entry

KEY = "0123456789abcdef" * 2
FP = "fp-test"


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a tensor, to compare bit-exactly (NaN and -0.0 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def header_len(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_bit_exact(make_chunk, dtype):
    chunk = make_chunk(tokens=7, dtype=dtype, start=40, meta={"text": "héllo, world", "source": "doc:1"})
    chunk.kv[0, 0, 0, 0, 0] = float("nan")
    chunk.kv[0, 1, 0, 0, 0] = -0.0
    got = decode_entry(encode_entry(KEY, chunk, FP), key=KEY, fingerprint=FP)
    assert got.kv.dtype == dtype and got.kv.shape == chunk.kv.shape
    assert torch.equal(bits(got.kv), bits(chunk.kv))
    assert torch.equal(got.positions, chunk.positions) and got.positions.dtype == torch.int64
    assert torch.equal(got.token_ids, chunk.token_ids)
    assert got.meta == chunk.meta


def test_non_contiguous_and_empty_chunks(make_chunk):
    chunk = make_chunk(tokens=6)
    view = type(chunk)(chunk.kv[:, :, :, ::2], chunk.positions[::2], chunk.token_ids[::2])
    got = decode_entry(encode_entry(KEY, view, FP), key=KEY, fingerprint=FP)
    assert torch.equal(bits(got.kv), bits(view.kv))
    empty = make_chunk(tokens=0)
    assert decode_entry(encode_entry(KEY, empty, FP), key=KEY, fingerprint=FP).num_tokens == 0


def test_accepts_bytearray_and_memoryview(make_chunk):
    data = encode_entry(KEY, make_chunk(), FP)
    for buf in (bytearray(data), memoryview(data)):
        assert decode_entry(buf, key=KEY, fingerprint=FP).num_tokens == 5


def test_every_single_bit_flip_is_detected(make_chunk):
    data = encode_entry(KEY, make_chunk(tokens=3, layers=1, kv_heads=1, head_dim=2, meta={"m": "v"}), FP)
    n_header = header_len(data)
    assert n_header < len(data)  # both regions (header, tensor data) are covered below
    for pos in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[pos] ^= 1 << bit
            with pytest.raises(CorruptEntryError):
                decode_entry(bytes(bad), key=KEY, fingerprint=FP)


def test_bit_flips_in_tensor_data_are_checksum_failures(make_chunk):
    data = encode_entry(KEY, make_chunk(tokens=16, dtype=torch.bfloat16), FP)
    for pos in range(header_len(data), len(data), 7):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(CorruptEntryError, match="checksum"):
            decode_entry(bytes(bad), key=KEY, fingerprint=FP)


def test_every_truncation_and_extension_is_detected(make_chunk):
    data = encode_entry(KEY, make_chunk(tokens=3), FP)
    for n in range(len(data)):
        with pytest.raises(CorruptEntryError):
            decode_entry(data[:n], key=KEY, fingerprint=FP)
    with pytest.raises(CorruptEntryError):
        decode_entry(data + b"\0", key=KEY, fingerprint=FP)


@pytest.mark.parametrize("junk", [b"", b"\x00" * 8, b"not an entry at all", b"\xff" * 64])
def test_garbage_is_unparsable(junk):
    with pytest.raises(CorruptEntryError):
        decode_entry(junk, key=KEY, fingerprint=FP)


def test_wrong_key_and_fingerprint(make_chunk):
    data = encode_entry(KEY, make_chunk(), FP)
    with pytest.raises(CorruptEntryError, match="key"):
        decode_entry(data, key="ff" * 16, fingerprint=FP)
    with pytest.raises(CorruptEntryError, match="fingerprint"):
        decode_entry(data, key=KEY, fingerprint="another-model")


def test_plain_safetensors_file_is_not_an_entry():
    data = safetensors.torch.save({"kv": torch.zeros(1, 2, 1, 1, 1)})
    with pytest.raises(CorruptEntryError, match="__metadata__"):
        decode_entry(data, key=KEY, fingerprint=FP)


def _forge(tensors: dict[str, torch.Tensor], **meta_changes: str) -> bytes:
    """A well-formed entry with a valid checksum whose metadata says ``meta_changes``."""
    meta = {
        "format": entry.FORMAT, "version": entry.FORMAT_VERSION, "key": KEY, "fingerprint": FP,
        "codec": "none", "dtype": "float16", "shape": "1,2,1,3,2", "num_tokens": "3",
    }  # fmt: skip
    meta.update(meta_changes)
    meta["checksum"] = entry._checksum(tensors, meta)
    return safetensors.torch.save(tensors, meta)


@pytest.fixture
def good_tensors():
    return {
        "kv": torch.zeros(1, 2, 1, 3, 2, dtype=torch.float16),
        "positions": torch.arange(3),
        "token_ids": torch.arange(3),
    }


def test_forged_entry_baseline_decodes(good_tensors):
    assert decode_entry(_forge(good_tensors), key=KEY, fingerprint=FP).num_tokens == 3


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dtype": "float32"}, "metadata says"),
        ({"dtype": "int8"}, "dtype"),
        ({"shape": "1,2,1,4,2", "num_tokens": "4"}, "metadata says|int64"),
        ({"shape": "1,2,1,3"}, "shape"),
        ({"shape": "a,b"}, "shape"),
        ({"num_tokens": "4"}, "num_tokens"),
        ({"codec": "int3"}, "codec"),
        ({"version": "99"}, "version"),
        ({"format": "other"}, "format"),
    ],
)
def test_metadata_inconsistent_with_tensors(good_tensors, changes, message):
    with pytest.raises(CorruptEntryError, match=message):
        decode_entry(_forge(good_tensors, **changes), key=KEY, fingerprint=FP)


@pytest.mark.parametrize(
    "name, bad",
    [("positions", torch.arange(3, dtype=torch.int32)), ("token_ids", torch.arange(4)), ("kv", None)],
)
def test_tensors_inconsistent(good_tensors, name, bad):
    if bad is None:
        del good_tensors[name]
    else:
        good_tensors[name] = bad
    with pytest.raises(CorruptEntryError):
        decode_entry(_forge(good_tensors), key=KEY, fingerprint=FP)


def test_codec_registry_hook(make_chunk, monkeypatch):
    """A codec is a pair of functions in CODECS; an entry of a codec this build lacks is corrupt."""

    def enc(kv):
        return {"kv.data": kv.float(), "kv.scale": torch.ones(1)}

    def dec(tensors, dtype, shape):
        return tensors["kv.data"].to(dtype)

    monkeypatch.setitem(entry.CODECS, "toy", entry.Codec(enc, dec))
    chunk = make_chunk(dtype=torch.bfloat16)
    data = encode_entry(KEY, chunk, FP, codec="toy")
    assert torch.equal(decode_entry(data, key=KEY, fingerprint=FP).kv, chunk.kv)
    monkeypatch.delitem(entry.CODECS, "toy")
    with pytest.raises(CorruptEntryError, match="codec 'toy' is unknown"):
        decode_entry(data, key=KEY, fingerprint=FP)


def test_encode_rejects_bad_input(make_chunk):
    with pytest.raises(ConfigError, match="unknown codec"):
        encode_entry(KEY, make_chunk(), FP, codec="int3")
    with pytest.raises(ConfigError, match="dtype"):
        encode_entry(KEY, make_chunk(dtype=torch.int8), FP)
    with pytest.raises(InputError, match="meta"):
        encode_entry(KEY, make_chunk(meta={"n": 1}), FP)
