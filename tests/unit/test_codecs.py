"""Every codec round-trips through the entry format: lossless bit-exact, lossy within its documented bound."""

from __future__ import annotations

import re

import pytest
import torch

from kdn_hf.codec import CODECS, check_codec, get_codec
from kdn_hf.codec.quant import kv_groups, quantize_groups
from kdn_hf.errors import ConfigError, CorruptEntryError
from kdn_hf.keys import make_key
from kdn_hf.store.entry import decode_entry, encode_entry

KEY = "ab" * 16
FP = "fp-test"
LOSSY = ["fp16", "bf16", "int8", "int4", "int4-g32", "int4-g16", "entropy"]
ALL = ["none", *LOSSY]


@pytest.fixture(autouse=True)
def _zstd_for_entropy(request):
    if "entropy" in request.node.name:
        pytest.importorskip("zstandard", reason="the entropy codec needs zstandard (pip install kdn-hf[codecs])")


def realistic_kv(tokens: int = 37, dtype=torch.float32, seed: int = 0, head_dim: int = 16) -> torch.Tensor:
    """[L=3, 2, H=2, T, D]: smooth-ish K with outlier channels (as real K has), noisy V."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(3, 2, 2, tokens, head_dim, generator=g)
    kv[:, 0, :, :, 3] *= 20  # an outlier channel in K
    kv[:, 0] += torch.linspace(-1, 1, tokens)[None, None, :, None]  # drift along tokens
    return kv.to(dtype)


def roundtrip(codec: str, kv: torch.Tensor, make_chunk) -> torch.Tensor:
    chunk = make_chunk(tokens=kv.shape[3], layers=kv.shape[0], kv_heads=kv.shape[2], head_dim=kv.shape[4])
    chunk.kv = kv
    got = decode_entry(encode_entry(KEY, chunk, FP, codec=codec), key=KEY, fingerprint=FP)
    assert got.kv.dtype == kv.dtype and got.kv.shape == kv.shape
    return got.kv


def step_bound(codec: str, kv: torch.Tensor) -> torch.Tensor:
    """Per-element bound the codec documents: half the stored step of the element's group."""
    bits, group = (8, None) if codec == "int8" else (4, int(codec.split("-g")[1]) if "-g" in codec else 64)
    k, v, (gk, gv) = kv_groups(kv, group)
    T, D = kv.shape[3], kv.shape[4]
    _, sk, _ = quantize_groups(k, bits)
    _, sv, _ = quantize_groups(v, bits)
    bk = sk.float()[..., None].expand(*sk.shape, gk).reshape(*sk.shape[:-1], -1)[..., :T].transpose(-1, -2)
    bv = sv.float()[..., None].expand(*sv.shape, gv).reshape(*sv.shape[:-1], -1)[..., :D]
    return torch.stack([bk, bv], dim=1) / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_none_is_bit_exact(make_chunk, dtype):
    kv = realistic_kv(dtype=dtype)
    kv[0, 0, 0, 0, 0] = float("nan")
    got = roundtrip("none", kv, make_chunk)
    assert torch.equal(got.contiguous().view(-1).view(torch.uint8), kv.contiguous().view(-1).view(torch.uint8))


@pytest.mark.parametrize("codec, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_cast_codecs_lossless_in_their_own_dtype(make_chunk, codec, dtype):
    kv = realistic_kv(dtype=dtype)
    assert torch.equal(roundtrip(codec, kv, make_chunk), kv)


@pytest.mark.parametrize("codec, rel", [("fp16", 2**-11), ("bf16", 2**-8)])
def test_cast_codecs_error(make_chunk, codec, rel):
    kv = realistic_kv()
    err = (roundtrip(codec, kv, make_chunk) - kv).abs()
    assert (err <= kv.abs() * rel * 1.0001).all()


@pytest.mark.parametrize("codec", ["int8", "int4", "int4-g32", "int4-g16", "entropy"])
@pytest.mark.parametrize("tokens", [1, 2, 37, 64, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantizing_codecs_within_documented_bound(make_chunk, codec, tokens, dtype):
    kv = realistic_kv(tokens, dtype, seed=tokens)
    got = roundtrip(codec, kv, make_chunk).float()
    ref = kv.float()
    bound = step_bound(codec, ref) * (1 + 1e-5) + ref.abs() * {torch.float32: 2**-23, torch.float16: 2**-10,
                                                                 torch.bfloat16: 2**-7}[dtype] + 1e-6
    err = (got - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}; max err {err.max().item():.3g}"


def test_quantizing_codecs_error_is_small_relative(make_chunk):
    """A sanity check on the bound: the relative RMS error of each codec on realistic KV."""
    kv = realistic_kv(200)
    rms = {c: ((roundtrip(c, kv, make_chunk) - kv).pow(2).mean() / kv.pow(2).mean()).sqrt().item()
           for c in ["int8", "int4", "entropy"]}  # fmt: skip
    assert rms["int8"] < 0.01 and rms["int4"] < 0.1 and rms["entropy"] < 0.1, rms


def test_entropy_reconstructs_exactly_like_int4(make_chunk):
    kv = realistic_kv(150, head_dim=64)
    assert torch.equal(roundtrip("entropy", kv, make_chunk), roundtrip("int4", kv, make_chunk))


def test_sizes_order(make_chunk):
    import importlib.util

    kv = realistic_kv(256, head_dim=64)
    size = {}
    has_zstd = importlib.util.find_spec("zstandard") is not None
    for c in ["none", "fp16", "int8", "int4"] + (["entropy"] if has_zstd else []):
        size[c] = sum(t.numel() * t.element_size() for t in get_codec(c).encode(kv).values())
    assert size["none"] == 2 * size["fp16"]
    assert size["fp16"] > 1.8 * size["int8"]
    assert size["fp16"] >= 3.5 * size["int4"]
    assert not has_zstd or size["entropy"] < size["int4"]


@pytest.mark.parametrize("codec", ALL)
def test_empty_and_constant_chunks(make_chunk, codec):
    assert roundtrip(codec, torch.zeros(2, 2, 1, 0, 8), make_chunk).shape == (2, 2, 1, 0, 8)
    const = torch.full((2, 2, 1, 9, 8), 3.25)
    assert torch.equal(roundtrip(codec, const, make_chunk), const)


def test_registry_and_families():
    assert set(ALL) - {"int4-g32", "int4-g16"} <= set(CODECS)
    assert get_codec("int4-g128") is CODECS["int4-g128"]
    assert get_codec("int4-g1") is None and get_codec("int5") is None
    assert check_codec("int4") == "int4"
    with pytest.raises(ConfigError, match="available"):
        check_codec("zip")
    assert not CODECS["int4"].lossless and CODECS["none"].lossless


def test_codec_is_in_key_and_entry(make_chunk):
    keys = {c: make_key(fingerprint=FP, codec=c, namespace="ns", token_ids=[1, 2, 3]) for c in ALL}
    assert len(set(keys.values())) == len(ALL)
    chunk = make_chunk()
    data = encode_entry(KEY, chunk, FP, codec="int4")
    assert b'"codec":"int4"' in data[:2000]


def test_forged_quantized_entry_is_corrupt(make_chunk):
    """Tensors with a valid checksum that cannot make the shape are a CorruptEntryError, not a crash."""
    import safetensors.torch

    from kdn_hf.store import entry

    chunk = make_chunk(tokens=8)
    data = encode_entry(KEY, chunk, FP, codec="int4")
    tensors = safetensors.torch.load(data)
    meta = entry.read_metadata(data)
    tensors["kv.k.q"] = tensors["kv.k.q"][:-1]
    meta["checksum"] = entry._checksum(tensors, meta)
    with pytest.raises(CorruptEntryError):
        decode_entry(safetensors.torch.save(tensors, meta), key=KEY, fingerprint=FP)


def test_no_pickle_on_any_read_path():
    """Entries are safetensors + zstd + torch arithmetic: nothing that can execute stored bytes."""
    from pathlib import Path

    import kdn_hf

    root = Path(kdn_hf.__file__).parent
    files = [*root.glob("store/*.py"), *root.glob("codec/*.py"), root / "delivery.py"]
    banned = re.compile(r"import pickle|pickle\.loads?|(?<![\w.])torch\.load\(|import marshal|(?<![\w.])eval\(")
    for f in files:
        assert not banned.search(f.read_text()), f"{f.name}: {banned.search(f.read_text()).group(0)}"


# ------------------------------------------------------------------------------ per-layer decode


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def _odd_kv(dtype=torch.float32) -> torch.Tensor:
    """[L=5, 2, H=1, T=7, D=5]: 35 codes per layer and part, so int4 layers start mid-byte."""
    g = torch.Generator().manual_seed(7)
    kv = torch.randn(5, 2, 1, 7, 5, generator=g)
    kv[:, 0, :, :, 1] *= 30
    return kv.to(dtype)


LAYER_CASES = [
    pytest.param(lambda dt: realistic_kv(37, dt, seed=3), id="realistic-T37"),
    pytest.param(lambda dt: realistic_kv(130, dt, seed=4, head_dim=64), id="realistic-T130-D64"),
    pytest.param(_odd_kv, id="odd-codes-per-layer"),
    pytest.param(lambda dt: torch.zeros(3, 2, 2, 0, 8, dtype=dt), id="empty"),
]


@pytest.mark.parametrize("codec", ALL)
@pytest.mark.parametrize("make", LAYER_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_decode_is_whole_decode_sliced(codec, make, dtype):
    """Codec.layers(range) == decode()[range], bit for bit, for every layer, several ranges, every codec."""
    from kdn_hf.codec import layer_decoder

    kv = make(dtype)
    c = get_codec(codec)
    assert c.layers is not None, f"{codec} has no per-layer decode"
    tensors = {k: t.contiguous() for k, t in c.encode(kv).items()}
    shape = tuple(kv.shape)
    whole = c.decode(tensors, dtype, shape)
    decode_range = layer_decoder(c, tensors, dtype, shape)
    L = shape[0]
    for start, stop in [*((l, l + 1) for l in range(L)), (0, L), (1, L), (1, 3), (2, 2), (L, L)]:
        got = decode_range(start, stop)
        assert _same_bits(got, whole[start:stop]), (codec, start, stop)
    with pytest.raises(IndexError):
        decode_range(0, L + 1)


@pytest.mark.parametrize("codec", ALL)
def test_open_entry_layers_match_decode_entry(make_chunk, codec):
    from kdn_hf.store.entry import open_entry

    kv = realistic_kv(37, seed=5)
    chunk = make_chunk(tokens=37, layers=3, kv_heads=2, head_dim=16)
    chunk.kv = kv
    data = encode_entry(KEY, chunk, FP, codec=codec)
    ref = decode_entry(data, key=KEY, fingerprint=FP)
    entry = open_entry(data, key=KEY, fingerprint=FP)
    assert entry.shape == tuple(kv.shape) and entry.dtype == kv.dtype and entry.nbytes == ref.nbytes
    assert torch.equal(entry.positions, ref.positions) and torch.equal(entry.token_ids, ref.token_ids)
    for l in range(3):
        assert _same_bits(entry.layers(l, l + 1), ref.kv[l : l + 1])
    assert _same_bits(entry.decode().kv, ref.kv)


def test_layer_decoder_falls_back_to_one_whole_decode(monkeypatch):
    """A codec without Codec.layers: the whole entry is decoded once, on the first range, then sliced."""
    from kdn_hf.codec import Codec, layer_decoder

    calls = []

    def dec(tensors, dtype, shape):
        calls.append(1)
        return tensors["kv"].to(dtype)

    toy = Codec(lambda kv: {"kv": kv}, dec)
    kv = realistic_kv(9)
    decode_range = layer_decoder(toy, {"kv": kv}, kv.dtype, tuple(kv.shape))
    assert not calls  # nothing decoded before it is asked for
    assert torch.equal(decode_range(1, 2), kv[1:2]) and torch.equal(decode_range(0, 3), kv)
    assert len(calls) == 1


@pytest.mark.parametrize("codec", ["int4", "int8", "none", "entropy"])
def test_forged_entry_fails_per_layer_setup(make_chunk, codec):
    """Tensors that cannot make the shape fail when the per-layer decoder is built (on the fetch thread)."""
    import safetensors.torch

    from kdn_hf.store import entry

    chunk = make_chunk(tokens=8)
    data = encode_entry(KEY, chunk, FP, codec=codec)
    tensors = safetensors.torch.load(data)
    meta = entry.read_metadata(data)
    name = {"int4": "kv.k.q", "int8": "kv.v.step", "none": "kv", "entropy": "kv.k.z"}[codec]
    tensors[name] = tensors[name][:-1]
    meta["checksum"] = entry._checksum(tensors, meta)
    opened = entry.open_entry(safetensors.torch.save(tensors, meta), key=KEY, fingerprint=FP)
    with pytest.raises(CorruptEntryError):
        opened.prepare_layers()
    with pytest.raises(CorruptEntryError):
        opened.layers(0, 1)
