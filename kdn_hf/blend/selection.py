"""Which tokens to recompute: selection strategies behind one small interface.

The recompute (``kdn_hf.blend.recompute``) runs the first layers fresh for
every context token, measures at the *check layer* how far each token's fresh
K/V lies from its reused K/V, and asks a :class:`Selection` which tokens go on
through the remaining layers. Later layers may narrow the set again
(``narrow``; a no-op unless a strategy wants it).

Strategies (``SELECTIONS`` maps names to classes):

- ``cacheblend``: the paper's (arXiv 2405.16444): the ``budget`` tokens whose
  K deviates most at layer 1. The baseline.
- ``kdn``: ours: each chunk's first ``sink_tokens`` tokens are always taken
  (a chunk computed alone makes its first tokens attention sinks, and they
  carry a large share of the deviation of everything after them), the rest of
  the budget by K+V deviation at the check layer.

Every strategy is deterministic: ties are broken by position (stable sort).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kdn_hf.errors import ConfigError


@dataclass(frozen=True)
class SelectionInput:
    """What a strategy may look at.

    dev_k, dev_v: [tokens] float32, squared L2 distance of fresh vs reused K (V) at the
                  check layer, summed over kv heads and head dims.
    spans:        (start, end) token slots of each chunk in the context, in order.
    budget:       how many tokens to select (0 < budget <= tokens).
    """

    dev_k: torch.Tensor
    dev_v: torch.Tensor
    spans: tuple[tuple[int, int], ...]
    budget: int

    @property
    def num_tokens(self) -> int:
        return int(self.dev_k.numel())


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties to the earlier position; returned sorted."""
    order = torch.sort(score, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


class Selection(ABC):
    """Chooses the tokens to recompute. Subclasses set ``name`` and implement ``select``.

    check_layer: the layer at which deviation is measured; layers before it are
                 computed fresh for every token (cheap, and exact).
    """

    name: str = ""
    check_layer: int = 1
    narrow_at: tuple[int, ...] = ()  # layers after which ``narrow`` is asked

    @abstractmethod
    def select(self, inp: SelectionInput) -> torch.Tensor:
        """[budget] int64 sorted slot indices of the tokens to recompute."""

    def narrow(self, layer: int, rows: torch.Tensor, dev: torch.Tensor) -> torch.Tensor:
        """After ``layer`` (one of ``narrow_at``) ran for ``rows`` ([n] slots) with per-row
        K+V deviation ``dev`` [n]: sorted positions *into rows* to keep for the next layers."""
        return torch.arange(rows.numel())


class CacheBlendSelection(Selection):
    """Top ``budget`` tokens by K deviation at layer 1 (CacheBlend / LMCache)."""

    name = "cacheblend"

    def select(self, inp: SelectionInput) -> torch.Tensor:
        return _top(inp.dev_k, inp.budget)


class KDNSelection(Selection):
    """Each chunk's first ``sink_tokens`` tokens, then the largest K+V deviation.

    sink_tokens: leading tokens per chunk always recomputed (chunks that start the
                 prompt are exact already and get none).
    narrow_at:   layers after which the set shrinks to ``narrow_keep`` of itself by
                 the deviation seen there (progressive narrowing); empty = off.
    """

    name = "kdn"

    def __init__(self, sink_tokens: int = 4, narrow_at: tuple[int, ...] = (), narrow_keep: float = 0.7) -> None:
        if sink_tokens < 0:
            raise ConfigError(f"sink_tokens must be >= 0, got {sink_tokens}")
        if not 0.0 < narrow_keep <= 1.0:
            raise ConfigError(f"narrow_keep must lie in (0, 1], got {narrow_keep}")
        self.sink_tokens = sink_tokens
        self.narrow_at = tuple(narrow_at)
        self.narrow_keep = narrow_keep

    def select(self, inp: SelectionInput) -> torch.Tensor:
        score = inp.dev_k + inp.dev_v
        sinks = [torch.arange(s, min(e, s + self.sink_tokens)) for s, e in inp.spans if s > 0]
        forced = torch.cat(sinks) if sinks else torch.zeros(0, dtype=torch.long)
        forced = forced[: inp.budget]
        score = score.clone()
        score[forced] = float("inf")
        return _top(score, inp.budget)

    def narrow(self, layer: int, rows: torch.Tensor, dev: torch.Tensor) -> torch.Tensor:
        keep = max(1, round(rows.numel() * self.narrow_keep))
        return _top(dev, keep)


SELECTIONS: dict[str, type[Selection]] = {
    CacheBlendSelection.name: CacheBlendSelection,
    KDNSelection.name: KDNSelection,
}


def get_selection(selection: str | Selection) -> Selection:
    """A Selection from its name (see ``SELECTIONS``) or an instance."""
    if isinstance(selection, Selection):
        return selection
    cls = SELECTIONS.get(selection) if isinstance(selection, str) else None
    if cls is None:
        raise ConfigError(f"selection must be one of {tuple(SELECTIONS)} or a Selection, got {selection!r}")
    return cls()
