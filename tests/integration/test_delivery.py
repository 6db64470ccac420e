"""Layer-wise delivery on the real model: the KV composed layer by layer in the background (while
blending reads it) is bit-identical to the whole-chunk path's, stats included; an entry that fails
to decode mid-way gives the answer a miss would have given; other errors are raised, never hung on."""

from __future__ import annotations

import threading

import pytest
import torch

from kdn_hf import KDN
from kdn_hf.delivery import ComposeError
from kdn_hf.errors import CorruptEntryError
from kdn_hf.store.entry import OpenEntry

pytestmark = pytest.mark.timeout(600)

Q = "Question: Who won two Nobel Prizes? Answer:"


@pytest.fixture
def stored(smol, tmp_path, docs, request):
    """A KDN on a disk store of codec ``request.param`` holding docs 0, 2, 3 (doc 1 stays a miss)."""
    model, tok = smol
    kdn = KDN(model, tok, store=tmp_path / "store", codec=request.param)
    kdn.ingest([d + "\n\n" for d in (docs[0], docs[2], docs[3])])
    return kdn


def _layout(docs) -> list[str]:
    """Reordered hits, a repeated chunk, a miss in the middle; doc 3 first sits where it was computed
    (positions 0..n-1: a plain copy), the others move."""
    d = [x + "\n\n" for x in docs]
    return [d[3], d[0], d[1], d[2], d[0]]


def _miss_key(kdn, docs) -> str:
    ids = kdn.tokenizer(docs[1] + "\n\n", add_special_tokens=False)["input_ids"]
    return kdn.key_for(ids)


def _kv(cache) -> torch.Tensor:
    return torch.stack([torch.stack([l.keys[0], l.values[0]]) for l in cache.layers])


def _stats(cache) -> dict:
    s = cache.stats
    return {k: getattr(s, k) for k in ("hits", "misses", "bytes_loaded", "tokens_reused", "tokens_computed",
                                       "tokens_recomputed", "tokens_total")}


_TWINS: dict = {}


def _on_path(kdn, layerwise: bool):
    """``kdn`` itself, or a KDN over the same model and store composing the other way (``layerwise``)."""
    if kdn.layerwise == layerwise:
        return kdn
    key = (id(kdn), layerwise)
    if key not in _TWINS or _TWINS[key][0] is not kdn:
        twin = KDN(kdn.model, kdn.tokenizer, store=kdn.store, codec=kdn.codec, layerwise=layerwise)
        _TWINS[key] = (kdn, twin)
    return _TWINS[key][1]


def _prepare(kdn, chunks, layerwise: bool, miss_key: str | None, **kw):
    """prepare() on a given path, with ``miss_key`` deleted first so both paths see the same store."""
    if miss_key is not None:
        kdn.store.delete(miss_key)
    return _on_path(kdn, layerwise).prepare(chunks, **kw)


def _no_composer_left() -> bool:
    return not any(t.name == "kdn-compose" and t.is_alive() for t in threading.enumerate())


MODES = [pytest.param(dict(mode="reuse"), id="reuse"), pytest.param(dict(mode="blend", recompute_ratio=0.15), id="blend")]


@pytest.mark.parametrize("stored", ["none", "int4"], indirect=True)
@pytest.mark.parametrize("kw", MODES)
def test_layerwise_compose_equals_whole_chunk_compose(stored, docs, kw):
    kdn, chunks, miss = stored, _layout(docs), _miss_key(stored, docs)
    old = _prepare(kdn, chunks, False, miss, **kw)
    new = _prepare(kdn, chunks, True, miss, **kw)
    assert torch.equal(_kv(new).view(torch.int32), _kv(old).view(torch.int32))  # bit for bit
    assert _stats(new) == _stats(old)
    assert new.stats.misses == 1 and new.stats.hit_count == 3 and set(new.stats.hits) == {"disk"}
    if kw["mode"] == "blend":
        assert new.stats.tokens_recomputed > 0
    again = _prepare(kdn, chunks, True, None, **kw)  # all hits now, the miss was stored
    assert again.stats.misses == 0 and again.stats.hit_count == 4
    assert _no_composer_left()


@pytest.mark.parametrize("stored", ["int4"], indirect=True)
def test_layerwise_generate_answers_like_whole_chunk(stored, docs):
    d = _layout(docs)
    chunks = [d[0], d[1], d[3], Q]  # hits only: the store is the same for both paths
    kdn = stored
    for kw in (dict(mode="reuse"), dict(mode="blend", recompute_ratio=0.15)):
        old = _on_path(kdn, False).generate(chunks, max_new_tokens=6, **kw)
        new = _on_path(kdn, True).generate(chunks, max_new_tokens=6, **kw)
        assert new.token_ids == old.token_ids
        assert (new.stats.hits, new.stats.bytes_loaded, new.stats.tokens_reused) == (
            old.stats.hits, old.stats.bytes_loaded, old.stats.tokens_reused)


@pytest.mark.parametrize("stored", ["none", "int4"], indirect=True)
@pytest.mark.parametrize("kw", MODES)
@pytest.mark.parametrize("bad_layer", [1, 17])
def test_entry_failing_mid_compose_answers_like_a_miss(stored, docs, kw, bad_layer, monkeypatch):
    """Layer ``bad_layer`` of doc 0's entry does not decode (after blending has read earlier layers, for
    17): the chunk is recomputed, the composition and the blend run again, and the KV and stats are
    those of the path where that entry was a miss from the start."""
    kdn, chunks, miss = stored, _layout(docs), _miss_key(stored, docs)
    ids0 = kdn.tokenizer(docs[0] + "\n\n", add_special_tokens=False)["input_ids"]
    victim = kdn.key_for(ids0)
    # the reference: the victim (and doc 1) missing, so both are computed afresh, whole-chunk path
    kdn.store.delete(victim)
    want = _prepare(kdn, chunks, False, miss, **kw)
    assert want.stats.misses == 2
    kdn.ingest([docs[0] + "\n\n"])  # stored again, fine on disk; it fails only when decoded layer-wise

    real = OpenEntry.layers
    seen = []

    def failing(self, start, stop):
        if self.key == victim and stop > bad_layer:
            seen.append(start)
            raise CorruptEntryError("injected: this layer does not decode")
        return real(self, start, stop)

    monkeypatch.setattr(OpenEntry, "layers", failing)
    got = _prepare(kdn, chunks, True, miss, **kw)
    assert seen, "the injected failure did not fire"
    # the reference computed its two misses in one batched forward, the failed entry is recomputed alone:
    # the same values up to float rounding (bit-identical before misses were batched)
    assert (_kv(got) - _kv(want)).abs().max().item() < 1e-4
    assert _stats(got) == _stats(want)
    assert kdn.store.contains(victim)  # removed as corrupt, then stored back recomputed
    assert kdn.store.stats()["disk"].corrupt == 1
    assert _no_composer_left()


@pytest.mark.parametrize("stored", ["none"], indirect=True)
@pytest.mark.parametrize("kw", MODES)
def test_error_that_is_no_entrys_fault_is_raised_not_hung(stored, docs, kw, monkeypatch):
    import kdn_hf.delivery as delivery

    real = delivery.rerotate
    calls = []

    def broken(k, delta, inv_freq, **options):
        calls.append(1)
        if len(calls) > 5:  # a few layers in
            raise RuntimeError("injected re-rotation failure")
        return real(k, delta, inv_freq, **options)

    monkeypatch.setattr(delivery, "rerotate", broken)
    with pytest.raises(ComposeError, match=r"layer \d+") as info:
        _prepare(stored, _layout(docs), True, None, **kw)
    assert info.value.layer is not None and not info.value.stored
    assert isinstance(info.value.__cause__, RuntimeError)
    assert _no_composer_left()
    monkeypatch.undo()
    ok = _prepare(stored, _layout(docs), True, None, **kw)  # the engine is still usable
    assert ok.get_seq_length() > 0


def test_prepare_inside_inference_mode_and_outside(kdn, docs):
    """The background composer writes into a buffer created inside or outside torch.inference_mode()."""
    chunks = [d + "\n\n" for d in docs[:2]]
    kdn.ingest(chunks, progress=False)
    plain = kdn.prepare(chunks, mode="reuse")
    with torch.inference_mode():
        inside = kdn.prepare(chunks, mode="reuse")
    assert torch.equal(inside.layers[3].keys, plain.layers[3].keys)
