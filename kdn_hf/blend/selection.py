"""Which tokens to recompute: selection strategies behind one small interface.

The recompute (``kdn_hf.blend.recompute``) gives a :class:`Selection` what it
asks for and pushes the tokens it picks through the layers again:

- a probing strategy (``probes`` True) gets each token's deviation at the
  *check layer* (fresh vs reused K/V, after running the layers below it fresh
  for every token); its tokens go on from the check layer;
- a question-aware strategy (``uses_query``) gets how much the question
  attends to each context token at every layer (the question run over the
  reused KV); its tokens run from layer 0.

Later layers may narrow the set again (``narrow``; a no-op unless a strategy
wants it).

Strategies (``SELECTIONS`` maps names to classes):

- ``cacheblend``: the paper's (arXiv 2405.16444): the ``budget`` tokens whose
  K deviates most at layer 1. The baseline.
- ``kdn``: ours: the tokens the question's last token attends to most,
  averaged over layers (falls back to K+V deviation when the question is not
  known).

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
    query_attention: [layers, q, tokens] float32, how much each question token attends to each
                  context token at each layer (over the reused KV, averaged over heads), or
                  None when the question is not known or the strategy does not ask for it.
    """

    dev_k: torch.Tensor
    dev_v: torch.Tensor
    spans: tuple[tuple[int, int], ...]
    budget: int
    query_attention: torch.Tensor | None = None

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
    uses_query: bool = False  # wants SelectionInput.query_attention (the recompute then computes it)

    query_last_only: bool = False  # query_attention of the question's last token only ([layers, 1, tokens])

    def query_layers(self, num_layers: int) -> int:
        """How many layers (from 0) the question pass runs to collect ``query_attention``."""
        return num_layers

    def narrow_layers(self, num_layers: int) -> tuple[int, ...]:
        """0-based layers after which ``narrow`` is asked, for a model of ``num_layers`` layers (default:
        none). The recompute skips narrowing when every context token is selected (ratio 1 stays
        exact) and after the last layer."""
        return ()

    def probes(self, query_known: bool) -> bool:
        """Whether the recompute measures deviation at ``check_layer`` (running the layers below it
        fresh for every token) before ``select``; False: selected rows run from layer 0."""
        return True

    def fresh_layers(self, query_known: bool) -> int:
        """How many low layers the recompute overwrites for every token without reading them
        (a composer may leave them unwritten)."""
        return self.check_layer if self.probes(query_known) else 0

    @abstractmethod
    def select(self, inp: SelectionInput) -> torch.Tensor:
        """[budget] int64 sorted slot indices of the tokens to recompute."""

    def narrow(self, layer: int, rows: torch.Tensor, dev: torch.Tensor) -> torch.Tensor:
        """After ``layer`` (one of ``narrow_layers``) ran for ``rows`` ([n] slots) with per-row
        K+V deviation ``dev`` [n]: sorted positions *into rows* to keep for the next layers."""
        return torch.arange(rows.numel())


class CacheBlendSelection(Selection):
    """Top ``budget`` tokens by K deviation at layer 1 (CacheBlend / LMCache)."""

    name = "cacheblend"

    def select(self, inp: SelectionInput) -> torch.Tensor:
        return _top(inp.dev_k, inp.budget)


class KDNSelection(Selection):
    """Question-aware: the context tokens the question attends to most, recomputed from layer 0.

    When the question is known (``KDN.generate``, or ``KDN.prepare(..., query=...)``), the
    recompute first runs the question over the reused KV and records, at every layer, how
    much each context token is attended to (``SelectionInput.query_attention``, [layers, tokens]).
    The score of a token is that attention averaged over layers; ``query_tokens`` picks whose:

    - ``"last"`` (default): the question's last token, the one that predicts the answer's first token;
    - ``"mean"``: every question token alike.

    No probe is needed: the selected tokens run from layer 0, whose reused KV is exact, so
    the cost is the question pass instead of a fresh layer 0 (and the check-layer probe)
    over every token. The idea: a token's stale KV only matters as much as the answer
    attends to it, and that attention is sparse; numbers in ``kdn_hf/blend/__init__.py``.

    Without the question (``KDN.prepare`` with no ``query``), it falls back to the
    deviation ranking of ``cacheblend`` (K+V deviation at ``check_layer``). Either way each
    later chunk's first ``sink_tokens`` tokens are taken first (0, the default: none; forcing 1
    or 4 changed no answer on the 50 dev questions, the question's attention already picks them).

    Progressive narrowing (on by default): after the layers at the fractions ``narrow_depths`` of
    the model's depth (for 30 layers: after the 0-based layers 4, 8, 12, 16 and 20), only the ``narrow_keep``
    share of the context rows still being recomputed whose K+V deviates most from the reused KV at
    that layer go on; the others keep their reused KV in the layers above. With the defaults, 44% of
    the selected tokens reach the top third of the model (measurements: the README's "How the
    blend defaults were chosen"). ``narrow_depths=()`` turns it off.
    The question rows are never narrowed, and a ratio of 1 (every token selected) is not narrowed,
    so it stays exact.
    """

    name = "kdn"
    uses_query = True

    def __init__(self, query_tokens: str = "last", query_depth: float = 1.0, sink_tokens: int = 0,
                 narrow_depths: tuple[float, ...] = (2 / 15, 4 / 15, 6 / 15, 8 / 15, 10 / 15),
                 narrow_keep: float = 0.85) -> None:
        if query_tokens not in ("last", "mean"):
            raise ConfigError(f"query_tokens must be 'last' or 'mean', got {query_tokens!r}")
        if not 0.0 < query_depth <= 1.0:
            raise ConfigError(f"query_depth must lie in (0, 1], got {query_depth}")
        self.query_depth = query_depth
        self.query_last_only = query_tokens == "last"
        if sink_tokens < 0:
            raise ConfigError(f"sink_tokens must be >= 0, got {sink_tokens}")
        if not 0.0 < narrow_keep <= 1.0:
            raise ConfigError(f"narrow_keep must lie in (0, 1], got {narrow_keep}")
        depths = tuple(float(d) for d in narrow_depths)
        if any(not 0.0 < d < 1.0 for d in depths):
            raise ConfigError(f"narrow_depths are fractions of the model's depth in (0, 1), got {narrow_depths!r}")
        self.query_tokens = query_tokens
        self.sink_tokens = sink_tokens
        self.narrow_depths = depths
        self.narrow_keep = narrow_keep

    def probes(self, query_known: bool) -> bool:
        return not query_known

    def query_layers(self, num_layers: int) -> int:
        return max(1, round(self.query_depth * num_layers))

    def narrow_layers(self, num_layers: int) -> tuple[int, ...]:
        # 0-based layer indices (30 layers: 4, 8, 12, 16, 20)
        return tuple(sorted({round(d * num_layers) for d in self.narrow_depths}))

    def select(self, inp: SelectionInput) -> torch.Tensor:
        if inp.query_attention is not None:  # [layers, q, tokens]
            att = inp.query_attention[:, -1] if self.query_tokens == "last" else inp.query_attention.mean(dim=1)
            score = att.mean(dim=0).clone()
        else:
            score = (inp.dev_k + inp.dev_v).clone()
        sinks = [torch.arange(s, min(e, s + self.sink_tokens)) for s, e in inp.spans if s > 0]
        forced = torch.cat(sinks)[: inp.budget] if sinks else torch.zeros(0, dtype=torch.long)
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
