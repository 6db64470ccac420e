"""The layer-wise composer's fused path for int8 / int4 entries (``decode_rerotate_scatter``, taken
where the Triton kernels run) against its codec path (the codec's per-layer decoder + ``rerotate``):
the same bytes, the fused call really made, and a forged entry still the entry's fault. On CPU the
fused path is forced (``fused=True``); its torch backend is what CUDA's kernel is checked against."""

from __future__ import annotations

import pytest
import torch

import kdn_hf.delivery as delivery
from kdn_hf.delivery import ComposeError, LayerSource, LayerwiseComposer
from kdn_hf.kv import ChunkKV
from kdn_hf.rope import RopeFrequencies, RopeSpec
from kdn_hf.store.entry import OpenEntry, encode_entry, open_entry

L, H, D = 4, 2, 10
NO_ROPE_LAYER = 2


def _spec(layout: str) -> RopeSpec:
    w = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)  # partial rotary: 8 of 10 dims
    return RopeSpec((RopeFrequencies(w, "default"),), tuple(-1 if i == NO_ROPE_LAYER else 0 for i in range(L)),
                    8, D, layout)


def _entry(key: str, codec: str, dtype: torch.dtype, positions: torch.Tensor, seed: int) -> OpenEntry:
    g = torch.Generator().manual_seed(seed)
    T = positions.numel()
    kv = (torch.randn(L, 2, H, T, D, generator=g) * 2 + 0.5).to(dtype)
    chunk = ChunkKV(kv=kv, positions=positions, token_ids=torch.arange(T), meta={})
    return open_entry(encode_entry(key, chunk, "fp", codec), key=key, fingerprint="fp")


def _sources(codec: str, dtype: torch.dtype) -> tuple[list[LayerSource], int]:
    """A prompt of four places: a chunk at its own positions (a copy), one moved by a constant delta,
    one computed at gapped positions (a delta per token), and the first chunk again further on."""
    a = _entry("a", codec, dtype, torch.arange(9), 0)
    b = _entry("b", codec, dtype, torch.arange(30, 47), 1)  # 17 tokens: an odd int4 code run
    c = _entry("c", codec, dtype, torch.cat([torch.arange(5), torch.arange(20, 26)]), 2)
    srcs = [LayerSource("a", a.layers, a.positions, 0, entry=a), LayerSource("b", b.layers, b.positions, 9, entry=b),
            LayerSource("c", c.layers, c.positions, 26, entry=c), LayerSource("a", a.layers, a.positions, 37, entry=a)]
    return srcs, 46


def _compose(srcs, total, spec, dtype, fused):
    out = torch.full((L, 2, H, total, D), float("nan"), dtype=dtype)
    with LayerwiseComposer(out, srcs, spec, fused=fused) as c:
        c.wait_all()
    return out


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = delivery.decode_rerotate_scatter

    def spy(*args, **kw):
        calls.append(kw["layers"])
        return real(*args, **kw)

    monkeypatch.setattr(delivery, "decode_rerotate_scatter", spy)
    return calls


@pytest.mark.parametrize("codec", ["int8", "int4", "int4-g8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_fused_path_writes_the_codec_paths_bytes(codec, dtype, layout, fused_calls):
    spec = _spec(layout)
    srcs, total = _sources(codec, dtype)
    want = _compose(srcs, total, spec, dtype, fused=False)
    assert not fused_calls
    got = _compose(srcs, total, spec, dtype, fused=True)
    assert len(fused_calls) == L * len(srcs)  # every place of every layer went through the fused call
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert not torch.isnan(want.float()).any()
    assert torch.equal(got.view(bits), want.view(bits))


def test_auto_takes_the_codec_path_on_cpu_and_fused_only_reads_int_codecs(fused_calls):
    spec = _spec("half")
    srcs, total = _sources("int4", torch.float32)
    _compose(srcs, total, spec, torch.float32, fused=None)
    assert not fused_calls  # CPU: no Triton, the codec path
    srcs, total = _sources("fp16", torch.float32)
    _compose(srcs, total, spec, torch.float32, fused=True)
    assert not fused_calls  # a codec the fused decoder does not read keeps the codec path


@pytest.mark.parametrize("fused", [False, True])
def test_forged_int_entry_is_the_entrys_fault_on_both_paths(fused):
    spec = _spec("half")
    srcs, total = _sources("int4", torch.float32)
    good = srcs[1].layers.__self__
    tensors = good.codec_tensors()
    tensors["kv.k.q"] = tensors["kv.k.q"][:-3]  # fewer codes than the shape needs
    forged = OpenEntry(key="b", codec="int4", dtype=good.dtype, shape=good.shape, tensors=tensors,
                       positions=good.positions, token_ids=good.token_ids, meta={}, device="cpu")
    srcs[1] = LayerSource("b", forged.layers, forged.positions, 9, entry=forged)
    out = torch.empty(L, 2, H, total, D)
    with LayerwiseComposer(out, srcs, spec, fused=fused) as c:
        with pytest.raises(ComposeError) as info:
            c.wait_all()
    assert info.value.key == "b" and info.value.stored and info.value.layer == 0


def test_resolve_and_compose_hand_the_open_entry_to_the_composer():
    """The stages pass a layer-wise hit's OpenEntry down to the composer (what the fused path reads);
    computed chunks carry none."""
    from kdn_hf.compose import compose
    from kdn_hf.plan import Unit
    from kdn_hf.resolve import Geometry, resolve
    from kdn_hf.store import StoreHit

    stored = _entry("k0", "int4", torch.float32, torch.arange(1, 10), 0)
    units = [Unit(tuple(range(9)), (7,), "k0", 0, False), Unit(tuple(range(5)), (7,), "k1", 9, False)]
    computed = ChunkKV(torch.randn(L, 2, H, 5, D), torch.arange(1, 6), torch.arange(5))
    geometry = Geometry(L, H, D, torch.float32)
    get = lambda key: StoreHit(stored, "memory") if key == "k0" else StoreHit(None, None)
    res = resolve(units, get, geometry, lambda u: computed, lambda key: None)
    comp = compose(units, res, _spec("half"), geometry, "cpu", compute=lambda u: computed,
                   note_corrupt=lambda key: None)
    assert [s.entry for s in comp.sources] == [stored, None]
