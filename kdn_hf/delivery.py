"""Delivery: load a request's chunks from the store and compose them layer by layer while the model runs.

Two stages, each overlapping the next:

1. **Fetch, per entry.** As soon as a request's chunk list is known,
   :func:`start_loading` starts one fetch per distinct key on a small thread
   pool, in prompt order: tier reads (file, Redis), checksum and metadata
   checks, and the codec's per-layer decoder setup (entropy: zstd). The kv
   stays encoded (``KVStore.open`` gives an :class:`~kdn_hf.store.entry.OpenEntry`);
   ``decode=True`` decodes whole entries instead (``KVStore.get``).
2. **Compose, per layer.** Once every chunk of the prompt has a source (a
   fetched entry, or a miss the engine computed), a :class:`LayerwiseComposer`
   thread walks the layers: for layer l it decodes layer l of every distinct
   chunk, re-rotates its K to the chunk's prompt positions
   (``kdn_hf.kernels.rerotate``: Triton on CUDA, torch otherwise), writes it into ``out[l]`` and marks layer l
   ready. Where the Triton kernels run (CUDA), an int8 / int4 entry's layer is
   instead decoded, re-rotated and written in one
   ``kdn_hf.kernels.decode_rerotate_scatter`` call per place. On CPU the codec's
   decoder serves: the fused torch path gives the same bytes but no speed there,
   and is slower for a chunk placed twice (it decodes once per place, the codec
   path once per layer). The consumer reads layer l only after ``wait(l)``: selective
   recompute (``kdn_hf.blend.recompute(..., wait_layer=wait)``) runs layer l
   while layers l+1, l+2, ... are still being decoded and re-rotated; a
   reuse-only request waits for the last layer.

The unit of overlap is one layer of the whole prompt (every chunk's slice of
it). Decoding, re-rotation and the model's kernels are torch ops, file reads,
Redis round trips and zstd release the GIL, so the stages run in parallel and a
disk or Redis store costs little more than a memory store.

Errors: a failed fetch (any tier error, a corrupt entry) is a miss, as
everywhere in the store (``ChunkLoader.get`` returns ``StoreHit(None, None)``)
and the engine recomputes the chunk. An error while composing (an entry whose
layer k does not decode) stops the composer; ``wait`` raises it as a
:class:`ComposeError` naming the entry and the layer, and :meth:`Composition.run`
has the engine recompute that chunk, then composes again from scratch (the
consumer runs again too), so the answer is the one a miss would have given.
An error that is no entry's fault is raised to the caller. The composer thread
is always joined; ``wait`` never blocks on a thread that has stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence

import torch

from kdn_hf.errors import InputError
from kdn_hf.kernels import QuantKV, decode_rerotate_scatter, rerotate, resolve
from kdn_hf.kernels.dequant import bits_of
from kdn_hf.rope import RopeSpec
from kdn_hf.store import KVStore, StoreHit
from kdn_hf.store.entry import OpenEntry

log = logging.getLogger("kdn_hf")

DEFAULT_WORKERS = 2
_MISS = StoreHit(None, None)


class ChunkLoader:
    """Fetches of ``keys`` in flight; ``get(key)`` waits for one. Close it (or use ``with``) when done.

    decode: True, a hit is a decoded ChunkKV (``KVStore.get``); False, a verified
    OpenEntry whose layers are decoded on demand (``KVStore.open``).
    """

    def __init__(self, store: KVStore, keys: Sequence[str], fingerprint: str,
                 device: str | torch.device = "cpu", workers: int = DEFAULT_WORKERS, *, decode: bool = True) -> None:
        self.store = store
        self.fingerprint = fingerprint
        self.device = device
        self.decode = decode
        distinct = list(dict.fromkeys(keys))
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(distinct))), thread_name_prefix="kdn-load")
        self._futures: dict[str, Future] = {k: self._pool.submit(self._load, k) for k in distinct}

    def _load(self, key: str) -> StoreHit:
        read = self.store.get if self.decode else self.store.open
        return read(key, self.fingerprint, self.device)

    def get(self, key: str) -> StoreHit:
        """The verified chunk (or OpenEntry) under ``key`` (waiting for its fetch), or a miss."""
        fut = self._futures.get(key)
        try:
            return self._load(key) if fut is None else fut.result()  # not announced: fetch now
        except Exception:  # a tier broke the never-raise contract: degrade to a miss, loudly
            log.exception("loading store entry %s failed; recomputing it", key)
            return _MISS

    def close(self) -> None:
        for fut in self._futures.values():
            fut.cancel()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ChunkLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_loading(store: KVStore, keys: Sequence[str], fingerprint: str, device: str | torch.device = "cpu",
                  workers: int = DEFAULT_WORKERS, *, decode: bool = True) -> ChunkLoader:
    """Start fetching ``keys`` (in order, duplicates once) in the background; see ChunkLoader."""
    return ChunkLoader(store, keys, fingerprint, device, workers, decode=decode)


# ---------------------------------------------------------------------------------------------- compose


@dataclasses.dataclass(frozen=True, eq=False)
class LayerSource:
    """One chunk's place in the prompt.

    key:       its store key; places with the same key share one decode per layer.
    layers:    ``layers(start, stop)`` -> its kv[start:stop], [n, 2, kv_heads, tokens, head_dim]
               (``OpenEntry.layers``, or a slice of a computed ChunkKV).
    positions: [tokens] int64, the positions its K was computed at.
    at:        its first slot in the prompt; it fills slots at .. at + tokens - 1.
    stored:    True when ``layers`` decodes a store entry (an error in it is the entry's fault).
    entry:     the OpenEntry ``layers`` decodes, when known (the fused int8 / int4 path reads its
               codec tensors itself); None for computed chunks.
    """

    key: str
    layers: Callable[[int, int], torch.Tensor]
    positions: torch.Tensor
    at: int
    stored: bool = True
    entry: OpenEntry | None = None


class ComposeError(RuntimeError):
    """Composing layer ``layer`` failed, at the chunk under ``key`` (None: not at a chunk).
    ``stored``: decoding that chunk's stored entry failed (the entry's fault: recompute the chunk).
    ``__cause__`` is the original exception."""

    def __init__(self, key: str | None, stored: bool, layer: int | None, cause: BaseException | None) -> None:
        where = f"chunk {key}" if key is not None else "the composer"
        super().__init__(f"composing layer {layer} failed in {where}: {cause!r}")
        self.key, self.stored, self.layer = key, stored, layer
        self.__cause__ = cause


class _SourceFailed(Exception):
    """A chunk's ``layers`` raised (its ``__cause__``)."""


class _Group:
    """Every place of one key: decode once per layer, write it at each (at, n, delta) place.

    entry: the int8 / int4 OpenEntry behind ``layers`` (None for other codecs and computed chunks),
    which the fused path decodes itself; quant: its QuantKV, made on the first layer composed."""

    def __init__(self, src: LayerSource) -> None:
        self.key, self.layers, self.stored = src.key, src.layers, src.stored
        self.places: list[tuple[int, int, int | torch.Tensor | None]] = []
        self.entry = _quantized_entry(src)
        self.quant: QuantKV | None = None


def _quantized_entry(src: LayerSource) -> OpenEntry | None:
    """The OpenEntry ``src`` decodes, when its codec is int8 / int4[-g<N>]; else None."""
    entry = src.entry
    if not src.stored or not isinstance(entry, OpenEntry):
        return None
    try:
        bits_of(entry.codec)
    except InputError:  # a codec the fused decoder does not read
        return None
    return entry


def _delta(positions: torch.Tensor, at: int, spec: RopeSpec) -> int | torch.Tensor | None:
    """None when the chunk already sits at ``at`` (a plain copy); else the shift, as ``kdn_hf.rope.rerotate`` makes it."""
    target = torch.arange(at, at + positions.numel())
    if torch.equal(positions, target):
        return None
    spec.check_positions(int(torch.maximum(positions.max(), target.max())))
    delta = target - positions
    first = int(delta[0])
    return first if bool((delta == first).all()) else delta


class LayerwiseComposer:
    """A thread filling ``out[first_layer:]`` ([layers, 2, kv_heads, tokens, head_dim]) from ``sources``,
    one layer of the whole prompt at a time; ``wait(l)`` returns once ``out[l]`` is written.

    Layers below ``first_layer`` are not written (blending overwrites them without reading them).
    ``fused``: decode int8 / int4 entries with ``decode_rerotate_scatter`` (None: where the Triton
    kernels run on ``out``, see the module docstring; True / False force it, for tests and benchmarks).
    Close it (or use ``with``): ``close`` stops the thread after its current chunk and joins it.
    """

    def __init__(self, out: torch.Tensor, sources: Sequence[LayerSource], spec: RopeSpec, first_layer: int = 0,
                 *, fused: bool | None = None) -> None:
        self.out = out
        self.spec = spec
        self.num_layers = out.shape[0]
        self.first_layer = max(0, first_layer)
        groups: dict[str, _Group] = {}
        for src in sources:
            g = groups.setdefault(src.key, _Group(src))
            g.places.append((src.at, src.positions.numel(), _delta(src.positions, src.at, spec)))
        self._groups = list(groups.values())
        self._fused = resolve("auto", out) == "triton" if fused is None else fused
        self._cond = threading.Condition()
        self._ready = self.first_layer  # layers < _ready are written
        self._finished = False
        self._error: ComposeError | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="kdn-compose", daemon=True)
        self._thread.start()

    def _compose_layer(self, layer: int, g: _Group) -> None:
        if self._fused and g.entry is not None and g.entry.dtype == self.out.dtype:
            self._compose_quant_layer(layer, g)
            return
        try:
            kv = g.layers(layer, layer + 1)[0]  # [2, kv_heads, tokens, head_dim]
        except Exception as e:  # the chunk's own fault (an entry that does not decode)
            raise _SourceFailed from e
        kv = kv.to(self.out.device)
        w = self.spec.inv_freq(layer)  # None: a layer without RoPE
        for at, n, delta in g.places:
            dst = self.out[layer, :, :, at : at + n]
            if delta is None or w is None:
                dst.copy_(kv)
            else:
                rerotate(kv[0], delta, w, layout=self.spec.layout, out=dst[0])
                dst[1].copy_(kv[1])

    def _compose_quant_layer(self, layer: int, g: _Group) -> None:
        """Layer ``layer`` of an int8 / int4 entry decoded, its K re-rotated and written at every
        place in one ``decode_rerotate_scatter`` call per place."""
        if g.quant is None:
            try:  # checks every codec tensor against the entry's shape: the decode below cannot fail on them
                g.quant = QuantKV.from_tensors(g.entry.codec_tensors(self.out.device), g.entry.codec,
                                               g.entry.dtype, g.entry.shape)
            except Exception as e:  # the chunk's own fault (an entry that does not decode)
                raise _SourceFailed from e
        w = self.spec.inv_freq(layer)  # None: a layer without RoPE
        k_dst, v_dst = self.out[layer : layer + 1, 0], self.out[layer : layer + 1, 1]  # [1, kv_heads, T, head_dim]
        for at, _, delta in g.places:
            decode_rerotate_scatter(g.quant, k_dst, v_dst, layers=(layer, layer + 1), rows=at,
                                    delta=None if w is None else delta, inv_freq=w, layout=self.spec.layout)

    def _run(self) -> None:
        layer, g = None, None
        try:
            with torch.inference_mode():  # writes into buffers made in or out of inference mode
                for layer in range(self.first_layer, self.num_layers):
                    for g in self._groups:
                        if self._stop:
                            return
                        self._compose_layer(layer, g)
                    g = None
                    with self._cond:
                        self._ready = layer + 1
                        self._cond.notify_all()
        except BaseException as e:  # handed to the waiting thread
            if isinstance(e, _SourceFailed):  # decoding the chunk failed: blame it (a stored entry: a miss)
                err = ComposeError(g.key, g.stored, layer, e.__cause__)
            else:  # writing it failed (re-rotation, device, memory): no entry's fault
                err = ComposeError(g.key if g else None, False, layer, e)
            with self._cond:
                self._error = err
        finally:
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def wait(self, layer: int) -> None:
        """Return once layer ``layer`` is written; raise ComposeError if the composer failed before it."""
        with self._cond:
            while self._ready <= layer and not self._finished:
                self._cond.wait()
            if self._ready > layer:
                return
            if self._error is not None:
                raise self._error
            raise ComposeError(None, False, layer, RuntimeError("the composer was closed before this layer"))

    def wait_all(self) -> None:
        """Return once every layer is written (raise as ``wait``)."""
        self.wait(self.num_layers - 1)

    def close(self) -> None:
        self._stop = True
        self._thread.join()

    def __enter__(self) -> LayerwiseComposer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: consume(kv, wait_layer): reads the composed kv, calling wait_layer(l) (None: nothing to wait for)
#: before it reads layer l; it may overwrite layers (blending does, in place)
Consumer = Callable[[torch.Tensor, Callable[[int], None] | None], None]


class Composition:
    """A prompt's KV buffer ``kv`` [layers, 2, kv_heads, tokens, head_dim] and how it gets filled.

    Made complete (``sources`` None: the whole-chunk path), or from ``sources`` that ``run`` composes
    layer by layer from ``first_layer`` on. ``replace(key)`` is called when the stored chunk under
    ``key`` fails while composing: it returns ``(layers, positions)`` of that chunk computed afresh.
    """

    def __init__(self, kv: torch.Tensor, sources: Sequence[LayerSource] | None = None, spec: RopeSpec | None = None,
                 first_layer: int = 0,
                 replace: Callable[[str], tuple[Callable[[int, int], torch.Tensor], torch.Tensor]] | None = None
                 ) -> None:
        self.kv = kv
        self.sources = None if sources is None else list(sources)
        self.spec = spec
        self.first_layer = first_layer
        self.replace = replace

    def run(self, consume: Consumer | None = None) -> torch.Tensor:
        """Fill ``kv`` (every layer from ``first_layer`` on) while ``consume`` runs; returns ``kv``.

        A stored chunk that fails is replaced (``replace``) and the whole composition, ``consume``
        included, runs again; each key is replaced at most once. Other errors are raised.
        """
        if self.sources is None:
            if consume is not None:
                consume(self.kv, None)
            return self.kv
        replaced: set[str] = set()
        while True:
            composer = LayerwiseComposer(self.kv, self.sources, self.spec, self.first_layer)
            try:
                if consume is not None:
                    consume(self.kv, composer.wait)
                composer.wait_all()
                return self.kv
            except ComposeError as e:
                if not e.stored or e.key in replaced or self.replace is None:
                    raise
                failed = e
            finally:
                composer.close()
            log.warning("store entry %s failed at layer %s while composing (%r); recomputing it",
                        failed.key, failed.layer, failed.__cause__)
            replaced.add(failed.key)
            layers, positions = self.replace(failed.key)
            self.sources = [dataclasses.replace(s, layers=layers, positions=positions, stored=False, entry=None)
                            if s.key == failed.key else s for s in self.sources]
