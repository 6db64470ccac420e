"""Stage 2, resolve: every distinct unit of a plan gets a source of KV, a verified store hit or computed now.

    resolution = resolve(units, loader, geometry, compute)
    resolution.sources[key]      # Source: layers(start, stop), positions, tier (None: computed here)
    resolution.computed          # [(key, ChunkKV)] this request computed: the store-back stage writes them

One check decides whether a stored entry holds what its key promises
(:func:`entry_mismatch`): its token ids, the positions it was computed at, and
the model's geometry (layers, kv heads, head dim, dtype). An entry that fails it
is counted corrupt in the store, removed, and recomputed: never served.

Nothing here edits statistics; :mod:`kdn_hf.ledger` derives them from the
typed results once the request's KV is complete.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from kdn_hf.kv import ChunkKV
from kdn_hf.plan import Unit

log = logging.getLogger("kdn_hf")


@dataclass(frozen=True)
class Geometry:
    """The shape every entry of a model must have: kv [num_layers, 2, kv_heads, tokens, head_dim] of ``dtype``."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model) -> "Geometry":
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(cfg.num_hidden_layers, kv_heads, head_dim, next(model.parameters()).dtype)


def entry_mismatch(entry, ids: Sequence[int], positions: torch.Tensor, geometry: Geometry) -> str | None:
    """Why ``entry`` (a ChunkKV or an OpenEntry) does not hold ``ids`` at ``positions`` [tokens] in
    ``geometry``, or None when it does. The one check for "the entry holds what its key promises"."""
    shape = tuple(entry.kv.shape) if isinstance(entry, ChunkKV) else tuple(entry.shape)
    dtype = entry.kv.dtype if isinstance(entry, ChunkKV) else entry.dtype
    want = (geometry.num_layers, 2, geometry.kv_heads, len(ids), geometry.head_dim)
    if shape != want or dtype != geometry.dtype:
        return f"kv is {dtype} {shape}, the model needs {geometry.dtype} {want}"
    if entry.token_ids.tolist() != list(ids):
        return "its token ids are not the ones its key was made from"
    if not torch.equal(entry.positions.cpu(), positions.cpu()):
        return f"it was computed at positions {int(entry.positions[0])}.., its key promises {int(positions[0])}.."
    return None


@dataclass(frozen=True)
class Source:
    """Where one distinct unit's KV comes from.

    unit:      the (first) unit with this key.
    layers:    ``layers(start, stop)`` -> kv[start:stop], [n, 2, kv_heads, tokens, head_dim].
    positions: [tokens] int64, the positions its K was computed at.
    tier:      the store tier that served it, or None when this request computed it.
    nbytes:    bytes of its decoded kv.
    entry:     the undecoded OpenEntry behind ``layers`` (a layer-wise hit), else None.
    """

    unit: Unit
    layers: Callable[[int, int], torch.Tensor]
    positions: torch.Tensor
    tier: str | None
    nbytes: int
    entry: object | None = None

    @property
    def stored(self) -> bool:
        return self.tier is not None


def computed_source(unit: Unit, chunk: ChunkKV) -> Source:
    """The source of a unit this request computed (``chunk``: its KV)."""
    kv = chunk.kv
    return Source(unit, lambda start, stop: kv[start:stop], chunk.positions, None, chunk.nbytes)


def expected_positions(unit: Unit) -> torch.Tensor:
    """[tokens] int64: the positions a unit's stored KV was computed at (right after its context)."""
    return torch.arange(unit.context_start, unit.context_start + len(unit.ids))


@dataclass
class Resolution:
    """The sources of a prompt's distinct units, in prompt order, and what this request computed.

    sources:  key -> Source.
    computed: [(key, ChunkKV)] computed by this request (misses, and hits that failed while composing),
              in the order computed; the store-back stage writes them.
    """

    sources: dict[str, Source] = field(default_factory=dict)
    computed: list[tuple[str, ChunkKV]] = field(default_factory=list)

    def recompute(self, key: str, compute: Callable[[Unit], ChunkKV]) -> Source:
        """The stored entry under ``key`` failed while composing: compute its unit afresh (a miss after
        all) and make that its source."""
        chunk = compute(self.sources[key].unit)
        self.computed.append((key, chunk))
        self.sources[key] = computed_source(self.sources[key].unit, chunk)
        return self.sources[key]


def resolve(units: Sequence[Unit], get, geometry: Geometry, compute: Callable[[Unit], ChunkKV],
            note_corrupt: Callable[[str], None], into: Resolution | None = None,
            compute_many: Callable[[Sequence[Unit]], list[ChunkKV]] | None = None) -> Resolution:
    """A source for every distinct unit of ``units``.

    get:          ``get(key) -> StoreHit`` (a ``ChunkLoader``'s, or the store's): an entry or a miss.
    compute:      computes a unit's KV on its own, after its context (a miss).
    note_corrupt: called with the key of an entry that does not hold what its key promises.
    into:         the Resolution to fill (returned), so a caller keeps what was computed before an error.
    compute_many: computes the KV of several missed units at once, each as ``compute`` would (e.g. in
                  batched forwards): ``compute_many(units) -> [ChunkKV]`` in their order. Without it the
                  misses are computed one by one. Misses are computed after every lookup, all together.
    """
    out = Resolution() if into is None else into
    found: dict[str, tuple[Unit, Source | None]] = {}  # key -> (its first unit, its stored source or None)
    for unit in units:
        if unit.key in out.sources or unit.key in found:  # the same chunk again in this prompt
            continue
        entry, tier = get(unit.key)
        if entry is not None:
            why = entry_mismatch(entry, unit.ids, expected_positions(unit), geometry)
            if why is not None:
                log.warning("entry %s does not hold what its key promises (%s); recomputing", unit.key, why)
                note_corrupt(unit.key)
                entry = None
        if entry is None:
            found[unit.key] = (unit, None)
        elif isinstance(entry, ChunkKV):  # decoded whole
            found[unit.key] = (unit, Source(unit, lambda start, stop, kv=entry.kv: kv[start:stop], entry.positions,
                                            tier, entry.nbytes))
        else:  # an OpenEntry: its layers decode on demand
            found[unit.key] = (unit, Source(unit, entry.layers, entry.positions, tier, entry.nbytes, entry))
    missing = [unit for unit, src in found.values() if src is None]
    if compute_many is not None and len(missing) > 1:
        out.computed.extend(zip((u.key for u in missing), compute_many(missing)))
    else:
        for unit in missing:  # each kept as soon as it is computed
            out.computed.append((unit.key, compute(unit)))
    computed = dict(out.computed[len(out.computed) - len(missing):])
    for key, (unit, src) in found.items():
        out.sources[key] = src if src is not None else computed_source(unit, computed[key])
    return out


def resolve_prefix(units: Sequence[Unit], get, geometry: Geometry, note_corrupt: Callable[[str], None]
                   ) -> list[Source]:
    """The stored sources of the leading units of a ``prefix`` plan, up to the first miss (a prefix
    entry is valid only after every unit before it)."""
    hits: list[Source] = []
    for unit in units:
        entry, tier = get(unit.key)
        if entry is None:
            break
        why = entry_mismatch(entry, unit.ids, expected_positions(unit), geometry)
        if why is not None:
            log.warning("prefix entry %s does not hold what its key promises (%s); recomputing", unit.key, why)
            note_corrupt(unit.key)
            break
        chunk = entry if isinstance(entry, ChunkKV) else entry.decode()
        hits.append(dataclasses.replace(computed_source(unit, chunk), tier=tier))
    return hits
