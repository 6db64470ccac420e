"""Stage 3, compose: every unit's KV re-rotated to its prompt position, written once into one buffer.

    composition = compose(units, resolution, spec, geometry, device, first_layer=0, extra=0, layerwise=True)
    composition.run(consume)     # fills composition.kv; consume(kv, wait_layer) may read layer l after wait_layer(l)

Two ways, same bytes:

- layer-wise (default): ``run`` composes layers ``first_layer`` and up on a
  background thread (:class:`kdn_hf.delivery.LayerwiseComposer`: decode layer l
  of every distinct chunk, re-rotate K, write it) while ``consume`` (the blend)
  reads the layers already written. A stored entry that fails to decode
  part-way is recomputed (``Resolution.recompute``) and the composition, and
  ``consume``, run again.
- whole-chunk: each source's every layer at once, in prompt order, complete
  before ``run`` calls ``consume``.

The buffer has ``extra`` spare slots after the prompt (question + reserve), left unwritten.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from kdn_hf.delivery import Composition, LayerSource
from kdn_hf.kv import ChunkKV
from kdn_hf.plan import Unit
from kdn_hf.resolve import Geometry, Resolution
from kdn_hf.kernels import rerotate
from kdn_hf.rope import RopeSpec


def compose(units: Sequence[Unit], resolution: Resolution, spec: RopeSpec, geometry: Geometry, device, *,
            compute: Callable[[Unit], ChunkKV], note_corrupt: Callable[[str], None], first_layer: int = 0,
            extra: int = 0, layerwise: bool = True) -> Composition | None:
    """The prompt's KV [layers, 2, kv_heads, tokens + extra, head_dim] as a Composition; None for no units.

    units:      the plan's units in prompt order (repeats included: each place is written).
    resolution: a source for every distinct key (``kdn_hf.resolve``).
    compute:    computes a unit afresh when its stored entry fails while composing (a miss after all,
                as ``KVStore.get`` makes an entry that does not decode: ``note_corrupt`` is told its key).
    first_layer: layers below it are left unwritten (blending overwrites them without reading them).
    """
    if not units:
        return None
    total = units[-1].end - units[0].start
    out = torch.empty(geometry.num_layers, 2, geometry.kv_heads, total + extra, geometry.head_dim,
                      dtype=geometry.dtype, device=device)
    if not layerwise:
        _compose_whole(units, resolution, spec, out)
        return Composition(out)
    sources = []
    for u in units:
        src = resolution.sources[u.key]
        sources.append(LayerSource(u.key, src.layers, src.positions, u.start, src.stored, src.entry))

    def replace(key: str):
        note_corrupt(key)
        src = resolution.recompute(key, compute)
        return src.layers, src.positions

    return Composition(out, sources, spec, first_layer, replace)


def _compose_whole(units: Sequence[Unit], resolution: Resolution, spec: RopeSpec, out: torch.Tensor) -> None:
    """Every layer of every unit into ``out``, in prompt order: K re-rotated where the unit moved."""
    for unit in units:
        src = resolution.sources[unit.key]
        kv = src.layers(0, out.shape[0]).to(out.device)
        target = torch.arange(unit.start, unit.end)
        dst = out[:, :, :, unit.start:unit.end]
        positions = src.positions.cpu()
        if torch.equal(positions, target):
            dst.copy_(kv)
            continue
        spec.check_positions(int(torch.maximum(positions.max(), target.max())))
        delta = target - positions
        shift = int(delta[0]) if bool((delta == delta[0]).all()) else delta
        for layer in range(out.shape[0]):  # the same op, layer by layer, as the layer-wise composer
            w = spec.inv_freq(layer)
            if w is None:
                dst[layer].copy_(kv[layer])
            else:
                rerotate(kv[layer, 0], shift, w, layout=spec.layout, out=dst[layer, 0])
                dst[layer, 1].copy_(kv[layer, 1])
