"""Which tokens to recompute: selection strategies behind one small interface.

The recompute (``kdn_hf.blend.recompute``) gives a :class:`Selection` what it
asks for and pushes the tokens it picks through the layers again:

- a probing strategy (``probes`` True) gets each token's deviation at the
  *check layer* (fresh vs reused K/V, after running the layers below it fresh
  for every token); its tokens go on from the check layer;
- a question-aware strategy (``uses_query``) gets how much the question
  attends to each context token at every layer (the question run over the
  reused KV); its tokens run from layer 0.

Later layers may narrow the set again: after each layer of ``narrow_layers``
the rows still being recomputed are ranked by their K+V deviation at that
layer and the ``narrow_count`` most deviating go on (``narrow``); the others
keep their reused KV above. How many context rows run at each layer is a pure
function of the selection, the model depth, the context length and the budget
(``Selection.rows_per_layer``), equal to the recompute's
``RecomputeResult.layer_rows``; its mean over layers is the *layer share*
(``recompute_share``, the bench's ``layer%``), the work actually done.
``ratio_for_layer_share`` inverts it, to compare strategies at equal work.

Strategies (``SELECTIONS`` maps names to classes). ``ratio`` is the request's
``recompute_ratio``; ``budget = round(ratio * context tokens)``:

- ``cacheblend``: the paper's (CacheBlend, arXiv 2405.16444, "gradual
  filtering"): layer 0 runs fresh for every token; at layer 1 the
  ``first_factor * budget`` tokens whose K+V deviates most are chosen; after
  each of the next ``filter_steps`` layers only the most deviating of those
  still selected go on (deviation measured again, on them only), the count
  shrinking geometrically to ``budget``, which then runs to the top. Ratio =
  the share recomputed in the layers above the filter (the final count); the
  layers below recompute more. The authors' released code selects once (like
  ``cacheblend-oneshot``); this follows the paper's text.
- ``cacheblend-oneshot``: LMCache's variant: the ``budget`` tokens whose K
  deviates most at layer 1, recomputed through every layer above it. Ratio =
  the share of every layer above 1.
- ``kdn``: ours: the tokens the question's last token attends to most,
  averaged over layers, recomputed from layer 0 and narrowed by deviation in
  the upper layers (falls back to K+V deviation when the question is not
  known). Ratio = the share at layer 0; fewer run above each narrowing layer.
- ``kdn-adaptive``: ``kdn`` with a per-request budget: the fewest top tokens
  that hold ``coverage`` of the question's attention to the context (its
  layer-averaged score), at most ``budget``. The ratio is a ceiling: a
  question whose attention is concentrated (long contexts, typically)
  recomputes less. Not comparable at equal work in advance (``adaptive``).

At ratio 1 (budget = every context token) no strategy narrows, so a ratio-1
blend is full prefill. Every strategy is deterministic: ties are broken by
position (stable sort).
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
    #: ``select`` may return fewer tokens than ``first_rows(budget, tokens)`` (it sizes its own
    #: budget, at most the request's); ``rows_per_layer`` of the count it returned is then the schedule
    adaptive: bool = False

    def query_layers(self, num_layers: int) -> int:
        """How many layers (from 0) the question pass runs to collect ``query_attention``."""
        return num_layers

    def narrow_layers(self, num_layers: int) -> tuple[int, ...]:
        """0-based layers after which ``narrow`` is asked, for a model of ``num_layers`` layers (default:
        none). The recompute skips narrowing when every context token is selected (ratio 1 stays
        exact) and after the last layer."""
        return ()

    def first_rows(self, budget: int, tokens: int) -> int:
        """How many tokens ``select`` returns for ``budget`` out of ``tokens`` (default: ``budget``)."""
        return budget

    def narrow_count(self, layer: int, rows: int, budget: int, num_layers: int) -> int:
        """After ``layer`` (one of ``narrow_layers``) ran for ``rows`` context rows: how many go on (default:
        all). Pure: ``rows_per_layer`` and the recompute both call it."""
        return rows

    def rows_per_layer(self, num_layers: int, tokens: int, budget: int, query_known: bool = True) -> tuple[int, ...]:
        """Context rows recomputed at each of ``num_layers`` layers for ``budget`` of ``tokens`` context
        tokens (what the recompute reports as ``layer_rows``; question rows not counted): every token
        below a probe's check layer, then ``first_rows``, fewer after each narrowing layer."""
        start = self.check_layer if self.probes(query_known) else 0
        narrow_at = set(self.narrow_layers(num_layers)) if budget < tokens else set()
        n = self.first_rows(budget, tokens)
        rows = [tokens] * start
        for i in range(start, num_layers):
            rows.append(n)
            if i in narrow_at and i < num_layers - 1:
                n = min(n, self.narrow_count(i, n, budget, num_layers))
        return tuple(rows)

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
        """[first_rows(budget, tokens)] int64 sorted slot indices of the tokens to recompute."""

    def narrow(self, layer: int, rows: torch.Tensor, dev: torch.Tensor, keep: int) -> torch.Tensor:
        """After ``layer`` (one of ``narrow_layers``) ran for ``rows`` ([n] slots) with per-row
        K+V deviation ``dev`` [n] at that layer: sorted positions *into rows* of the ``keep``
        (``narrow_count``) rows that go on (default: the most deviating)."""
        return _top(dev, keep)


class OneShotCacheBlendSelection(Selection):
    """Top ``budget`` tokens by K deviation at layer 1, never narrowed (LMCache's CacheBlend)."""

    name = "cacheblend-oneshot"

    def select(self, inp: SelectionInput) -> torch.Tensor:
        return _top(inp.dev_k, inp.budget)


class CacheBlendSelection(Selection):
    """The paper's CacheBlend: gradual filtering by K+V deviation (see the module docstring).

    first_factor: tokens chosen at the check layer, as a multiple of the budget (capped at every token).
    filter_steps: narrowing layers after the check layer (0-based ``check_layer .. check_layer +
                  filter_steps - 1``, fewer on a shallow model); the count falls geometrically from
                  ``first_factor * budget`` to ``budget`` over them.
    """

    name = "cacheblend"

    def __init__(self, first_factor: float = 2.0, filter_steps: int = 4) -> None:
        if first_factor < 1.0:
            raise ConfigError(f"first_factor must be >= 1 (tokens at the check layer per final token), got {first_factor}")
        if filter_steps < 1:
            raise ConfigError(f"filter_steps must be >= 1, got {filter_steps}")
        self.first_factor = first_factor
        self.filter_steps = filter_steps

    def narrow_layers(self, num_layers: int) -> tuple[int, ...]:
        # never after the last layer: the final count must be reached below it
        return tuple(range(self.check_layer, min(self.check_layer + self.filter_steps, num_layers - 1)))

    def first_rows(self, budget: int, tokens: int) -> int:
        return min(tokens, max(budget, round(budget * self.first_factor)))

    def narrow_count(self, layer: int, rows: int, budget: int, num_layers: int) -> int:
        steps = self.narrow_layers(num_layers)
        left = len(steps) - steps.index(layer)  # narrowing steps left, this one included
        # geometric: equal factors from ``rows`` down to ``budget`` over the steps left; the last one hits it
        return max(budget, round(budget * (rows / budget) ** ((left - 1) / left)))

    def select(self, inp: SelectionInput) -> torch.Tensor:
        return _top(inp.dev_k + inp.dev_v, self.first_rows(inp.budget, inp.num_tokens))


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

    def query_score(self, inp: SelectionInput) -> torch.Tensor | None:
        """[tokens] float32: the question's attention to each context token, averaged over layers (the
        last question token's, or every one's with ``query_tokens="mean"``); None without the question."""
        if inp.query_attention is None:  # [layers, q, tokens]
            return None
        att = inp.query_attention[:, -1] if self.query_tokens == "last" else inp.query_attention.mean(dim=1)
        return att.mean(dim=0)

    def ranking_score(self, inp: SelectionInput) -> torch.Tensor:
        """[tokens] the score ``select`` ranks by: ``query_score`` (else K+V deviation), with each later
        chunk's first ``sink_tokens`` tokens set to +inf (taken first)."""
        q = self.query_score(inp)
        score = (q if q is not None else inp.dev_k + inp.dev_v).clone()
        score[self.sink_slots(inp)] = float("inf")
        return score

    def sink_slots(self, inp: SelectionInput) -> torch.Tensor:
        """[n] int64: each later chunk's first ``sink_tokens`` slots (taken first), at most the budget."""
        sinks = [torch.arange(s, min(e, s + self.sink_tokens)) for s, e in inp.spans if s > 0]
        return torch.cat(sinks)[: inp.budget] if sinks else torch.zeros(0, dtype=torch.long)

    def select(self, inp: SelectionInput) -> torch.Tensor:
        return _top(self.ranking_score(inp), inp.budget)

    def narrow_count(self, layer: int, rows: int, budget: int, num_layers: int) -> int:
        return max(1, round(rows * self.narrow_keep))


class AdaptiveKDNSelection(KDNSelection):
    """``kdn`` that recomputes only as many tokens as the question needs: the fewest of the top-ranked
    tokens whose scores (the question's last-token attention to each context token, averaged over
    layers) sum to ``coverage`` of the context's total, and never more than the request's budget
    (``ratio`` is the ceiling). Attention over a long context is concentrated: on the dev split, 90%
    of it sits on 11-13% of 2K-token contexts and on 7-8% of 4K-token ones, so a long prompt
    recomputes (and costs) less than a fixed ratio would. Without the question it is ``kdn``
    (deviation ranking, the whole budget), and at ratio 1 it recomputes every token (exact). Other
    arguments as ``KDNSelection``; ``coverage`` in (0, 1] (1: the whole budget, as ``kdn``)."""

    name = "kdn-adaptive"
    adaptive = True

    def __init__(self, coverage: float = 0.9, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < coverage <= 1.0:
            raise ConfigError(f"coverage must lie in (0, 1], got {coverage}")
        self.coverage = coverage

    def budget_for(self, inp: SelectionInput) -> int:
        """How many tokens this request recomputes: the fewest top ``query_score`` tokens holding
        ``coverage`` of its total (at least the forced sink tokens), at most ``inp.budget``."""
        q = self.query_score(inp)
        if q is None or self.coverage >= 1.0 or inp.budget >= q.numel():  # ratio 1 stays exact
            return inp.budget
        mass = torch.sort(q, descending=True, stable=True).values.cumsum(0)
        need = int((mass < self.coverage * float(mass[-1])).sum()) + 1
        return max(1, min(inp.budget, max(need, self.sink_slots(inp).numel())))

    def select(self, inp: SelectionInput) -> torch.Tensor:
        return _top(self.ranking_score(inp), self.budget_for(inp))


SELECTIONS: dict[str, type[Selection]] = {
    CacheBlendSelection.name: CacheBlendSelection,
    OneShotCacheBlendSelection.name: OneShotCacheBlendSelection,
    KDNSelection.name: KDNSelection,
    AdaptiveKDNSelection.name: AdaptiveKDNSelection,
}


def get_selection(selection: str | Selection) -> Selection:
    """A Selection from its name (see ``SELECTIONS``) or an instance."""
    if isinstance(selection, Selection):
        return selection
    cls = SELECTIONS.get(selection) if isinstance(selection, str) else None
    if cls is None:
        raise ConfigError(f"selection must be one of {tuple(SELECTIONS)} or a Selection, got {selection!r}")
    return cls()


def layer_share(selection: Selection, num_layers: int, tokens: int, ratio: float, query_known: bool = True) -> float:
    """Share of the (layer x context token) rows a blend at ``ratio`` recomputes (``recompute_share``)."""
    budget = min(tokens, max(1, round(ratio * tokens)))
    return sum(selection.rows_per_layer(num_layers, tokens, budget, query_known)) / (num_layers * tokens)


def ratio_for_layer_share(selection: Selection, num_layers: int, tokens: int, share: float,
                          query_known: bool = True) -> float:
    """The ratio (``budget / tokens``) whose layer share for ``tokens`` context tokens is closest to
    ``share``: bisection over the budget (the layer share never falls as the budget grows). A share
    below the strategy's floor (a probe's fresh layers) gives the smallest budget, 1."""
    if not 0.0 < share <= 1.0:
        raise ConfigError(f"layer share must lie in (0, 1], got {share}")
    if tokens < 1:
        raise ConfigError(f"tokens must be >= 1, got {tokens}")

    def at(b: int) -> float:
        return layer_share(selection, num_layers, tokens, b / tokens, query_known)

    lo, hi = 1, tokens  # smallest budget whose share reaches ``share``
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid) >= share:
            hi = mid
        else:
            lo = mid + 1
    best = min((b for b in (lo - 1, lo) if b >= 1), key=lambda b: (abs(at(b) - share), b))
    return best / tokens
