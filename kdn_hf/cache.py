"""KDNCache: a transformers ``DynamicCache`` pre-filled with composed chunk KV.

    cache = KDNCache(kdn, chunks=[system, doc_a, doc_b])      # prepared from the store (= kdn.prepare)
    model.generate(ids, past_key_values=cache, max_new_tokens=64)   # `cache=` on transformers >= 5.24

``KDNCache(kdn, chunks, **options)`` and ``KDN.prepare(chunks, **options)`` build
the same cache; pass it to stock ``model.generate`` (under
``past_key_values=``, or ``cache=`` on transformers >= 5.24) together with
prompt ids that *extend* the ids it covers: generate then prefills only the
uncovered tail, at the right positions, because ``get_seq_length()`` reports
exactly the number of cached tokens (never fewer: SDPA would silently drop
keys).

Each layer is a :class:`KDNLayer`, a ``DynamicLayer`` that also records the
position of every cached token, taken from the ``position_ids`` the model
passes to ``update``. Two traps of stock generate are handled here:

- A cache that covers *every* input id makes generate feed the whole input
  again, at positions already cached, with a mask that puts those tokens
  after the cache: attention would be silently wrong. The layer sees fed
  positions below its length (transformers >= 5.24 passes them to
  ``update``; with older versions layer 0 recognises the re-fed tokens by
  their layer-0 V, which depends on the token alone) and raises
  KDNCacheError before anything is computed, saying to leave at least one
  token uncached.
- ``num_return_sequences`` / beam search run with batch > 1 but never expand
  a user-supplied cache: a layer holding batch 1 expands itself to the batch
  of the first update that asks for more.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from kdn_hf.errors import KDNCacheError

log = logging.getLogger("kdn_hf.cache")


def _positions_from_update_args(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """position_ids [q] of the tokens being appended, from whichever form this
    transformers version passes: ``kwargs=`` dict (>= 5.24) or a positional
    ``cache_kwargs`` dict (older)."""
    sources: list[Any] = [kwargs.get("kwargs"), kwargs.get("cache_kwargs"), kwargs]
    sources += [a for a in args if isinstance(a, dict)]
    for src in sources:
        if not isinstance(src, dict):
            continue
        for name in ("position_ids", "cache_position"):
            p = src.get(name)
            if isinstance(p, torch.Tensor):
                if p.dim() == 3:  # multimodal (3, B, q): text position is the first row
                    p = p[0]
                return p[0] if p.dim() == 2 else p
    return None


class KDNLayer(DynamicLayer):
    """A DynamicLayer that knows the position of every cached token.

    keys/values: [batch, kv_heads, tokens, head_dim]; positions: [tokens] int64.
    """

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None, spare: tuple[torch.Tensor, torch.Tensor] | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.positions = torch.zeros(0, dtype=torch.long)
        #: set on layer 0 by KDNCache: detect a re-fed input by its layer-0 V when positions are not passed
        self.detect_refeed = False
        #: (keys, values) [batch, kv_heads, capacity, head_dim] buffers that keys/values are the first slots
        #: of: appended tokens are written into them in place (no copy of the whole cache per step)
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None
        if keys is not None:
            if values is None or positions is None:
                raise ValueError("KDNLayer needs keys, values and positions together")
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values
            self.positions = positions.to(torch.long).cpu()
            self._spare = spare

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        cached = self.get_seq_length()
        known = _positions_from_update_args(args, kwargs)
        pos = torch.arange(cached, cached + q) if known is None else known.detach().to("cpu", torch.long)
        if known is None and self.detect_refeed and cached and q == cached and self._same_values(value_states):
            # transformers < 5.24 passes no positions to update; a forward that feeds exactly as many
            # tokens as are cached, whose layer-0 V (a function of the token alone) equals the cached V,
            # is generate re-feeding the input the cache already covers
            pos = self.positions.clone()
        if cached and q and int(pos[0]) < cached:
            raise KDNCacheError(
                f"the model fed {q} tokens at positions {int(pos[0])}..{int(pos[-1])}, but this cache already "
                f"holds {cached} tokens there. Stock generate re-feeds the whole input when the cache covers "
                f"every input id, and that forward would attend to the wrong positions. Pass prompt ids with "
                f"at least one token more than cache.token_ids, e.g. cache = kdn.prepare(chunks[:-1]) and "
                f"the question as the last chunk."
            )
        if cached and self.keys.shape[0] == 1 and key_states.shape[0] > 1:
            # num_return_sequences / beams: generate never expands a cache it did not create
            b = key_states.shape[0]
            self.keys = self.keys.expand(b, *self.keys.shape[1:]).contiguous()
            self.values = self.values.expand(b, *self.values.shape[1:]).contiguous()
        if self._fits(key_states, value_states):
            bk, bv = self._spare
            bk[..., cached:cached + q, :].copy_(key_states)
            bv[..., cached:cached + q, :].copy_(value_states)
            self.keys, self.values = bk[..., :cached + q, :], bv[..., :cached + q, :]
        else:
            self._spare = None  # outgrown, reordered, expanded or cast: plain DynamicLayer growth from here
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, pos])
        return self.keys, self.values

    def _fits(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Whether the new rows go into the spare buffers: keys/values are still their first slots
        (not replaced by a crop-and-copy, a beam reorder or a batch expand) and there is room."""
        if self._spare is None:
            return False
        bk, bv = self._spare
        n = self.keys.shape[-2] + key_states.shape[-2]
        return (n <= bk.shape[-2] and self.keys.data_ptr() == bk.data_ptr() and self.values.data_ptr() == bv.data_ptr()
                and self.keys.stride() == bk.stride() and self.values.stride() == bv.stride()
                and key_states.shape[:2] == bk.shape[:2] and key_states.shape[-1] == bk.shape[-1]
                and value_states.shape[:2] == bv.shape[:2] and value_states.shape[-1] == bv.shape[-1]
                and key_states.dtype == bk.dtype and value_states.dtype == bv.dtype
                and key_states.device == bk.device and value_states.device == bv.device)

    def _same_values(self, value_states: torch.Tensor) -> bool:
        fed, held = value_states[:1].float(), self.values[:1].float()
        return fed.shape == held.shape and torch.allclose(fed, held, rtol=1e-3, atol=1e-4)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.positions = self.positions[: self.get_seq_length()]

    def reset(self) -> None:
        super().reset()
        self._spare = None
        self.positions = torch.zeros(0, dtype=torch.long)


class KDNCache(DynamicCache):
    """The composed KV of a prompt's chunks, usable wherever transformers takes a Cache.

    ``KDNCache(kdn, chunks, **options)``: prepared from ``kdn``'s store, exactly as
    ``kdn.prepare(chunks, **options)`` (``mode``, ``recompute_ratio``, ``selection``, ``query``,
    ``reserve``). The other form takes the KV itself:

    kv:          [layers, 2, kv_heads, tokens, head_dim] (batch 1), model dtype and device.
    positions:   [tokens] int64, the position each K is rotated to (0..tokens-1 for a prompt).
    token_ids:   [tokens] int64, the ids the cache was prepared from.
    chunk_spans: ``(start, end)`` token slots of each chunk, in prompt order.
    stats:       what preparing it cost (hits, misses, tokens computed), or None.

    capacity:    optional [layers, 2, kv_heads, slots, head_dim] buffer that ``kv`` is the first
                 ``tokens`` slots of (``kv = capacity[:, :, :, :tokens]``): tokens that generate appends
                 are written into its spare slots in place, where a DynamicCache copies every layer's
                 whole K/V per step; past its end (or after a beam reorder) the layers grow as usual.

    ``token_ids`` and ``chunk_spans`` describe the prepared prefix; tokens that
    generate appends later are in the layers (and their ``positions``) only.
    """

    def __init__(self, kv: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                 token_ids: torch.Tensor | None = None, chunk_spans: Sequence[tuple[int, int]] = (),
                 stats: Any = None, capacity: torch.Tensor | None = None, *, chunks: Sequence | None = None,
                 **prepare_options) -> None:
        if kv is not None and not isinstance(kv, torch.Tensor):  # KDNCache(kdn, chunks=[...])
            if not callable(getattr(kv, "prepare", None)):
                raise TypeError(f"KDNCache takes a KDN (and chunks=[...]) or a kv tensor, got {type(kv).__name__}")
            if chunks is None:
                chunks = positions  # KDNCache(kdn, [doc, ...])
            if chunks is None:
                raise TypeError("KDNCache(kdn, chunks=[...]) needs the chunks to prepare, e.g. chunks=[system, doc]")
            prepared = kv.prepare(chunks, **prepare_options)
            self.__dict__.update(vars(prepared))
            return
        if chunks is not None or prepare_options:
            raise TypeError(f"chunks= and prepare options go with KDNCache(kdn, chunks=...), not with a kv tensor; "
                            f"got {sorted(prepare_options) + (['chunks'] if chunks is not None else [])}")
        super().__init__()
        self.layer_class_to_replicate = KDNLayer
        self.chunk_spans = [tuple(s) for s in chunk_spans]
        self.stats = stats
        #: [vocab] float32 logits of the token after the cached ones, where preparing computed them
        #: (KDN.generate's blend computes the whole question), else None
        self.next_logits: torch.Tensor | None = None
        if kv is None:  # empty: layers are created by the first forward
            self.layers = []
            self.token_ids = torch.zeros(0, dtype=torch.long)
            return
        if positions is None or token_ids is None:
            raise ValueError("KDNCache needs positions and token_ids with kv")
        if kv.dim() != 5 or kv.shape[1] != 2:
            raise ValueError(f"kv must be [layers, 2, kv_heads, tokens, head_dim], got {tuple(kv.shape)}")
        n = kv.shape[3]
        if positions.shape != (n,) or token_ids.shape != (n,):
            raise ValueError(
                f"kv holds {n} tokens but positions is {tuple(positions.shape)} and token_ids "
                f"{tuple(token_ids.shape)}"
            )
        if capacity is not None and (
            capacity.dim() != 5 or capacity.shape[:3] != kv.shape[:3] or capacity.shape[4] != kv.shape[4]
            or capacity.shape[3] < n or capacity.data_ptr() != kv.data_ptr() or capacity.stride() != kv.stride()
        ):
            raise ValueError(
                f"capacity must be the buffer kv is the first slots of (kv = capacity[:, :, :, :{n}]); got kv "
                f"{tuple(kv.shape)} and capacity {tuple(capacity.shape)} not sharing their first slots"
            )
        self.layers = [
            KDNLayer(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0), positions,
                     spare=None if capacity is None else (capacity[i, 0].unsqueeze(0), capacity[i, 1].unsqueeze(0)))
            for i in range(kv.shape[0])
        ]
        self.layers[0].detect_refeed = True
        self.token_ids = token_ids.to(torch.long).cpu()

    @property
    def positions(self) -> torch.Tensor:
        """[tokens] int64 positions of layer 0 (every layer holds the same)."""
        return self.layers[0].positions if self.layers else torch.zeros(0, dtype=torch.long)

    def __repr__(self) -> str:
        return (f"KDNCache(layers={len(self.layers)}, tokens={self.get_seq_length()}, "
                f"chunks={len(self.chunk_spans)})")
