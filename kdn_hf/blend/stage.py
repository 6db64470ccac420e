"""Stage 4, blend: selective recompute of a composed prompt, as the consumer of its composition.

    blend = Blend(model, ids, spans, ratio, selection, query_rows=len(question), last_hidden=True)
    composition.run(blend)        # blend(kv, wait_layer) recomputes in place, layer by layer
    blend.outcome                 # BlendOutcome: tokens recomputed, share of the layer work, last hidden

A Blend belongs to one request. ``Composition.run`` may call it again (a stored
entry failed while composing and was recomputed); the outcome is then the one
of the last, complete run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kdn_hf.blend.recompute import recompute
from kdn_hf.blend.selection import Selection


@dataclass(frozen=True)
class BlendOutcome:
    """tokens_recomputed: context tokens selected (recomputed from the first recomputed layer on).
    recompute_share: context token-layers recomputed over all of them (layers x context tokens).
    last_hidden: [hidden] the last layer's output for the last slot (a question row), or None."""

    tokens_recomputed: int
    recompute_share: float
    last_hidden: torch.Tensor | None


class Blend:
    """Recompute ``ratio`` of the context of a composed prompt (see ``kdn_hf.blend.recompute``).

    ids:        [tokens] int64, every slot of the composed KV (context, then the question's rows).
    spans:      (start, end) of each chunk.
    query_rows: the last ``query_rows`` slots are the question, computed through every layer.
    last_hidden: also keep the last row's final hidden state (for the first token).
    """

    def __init__(self, model, ids: torch.Tensor, spans: Sequence[tuple[int, int]], ratio: float,
                 selection: Selection, *, query_rows: int = 0, last_hidden: bool = False) -> None:
        self.model, self.ids, self.spans, self.ratio, self.selection = model, ids, list(spans), ratio, selection
        self.query_rows, self.last_hidden = query_rows, last_hidden
        self.outcome: BlendOutcome | None = None

    def __call__(self, kv: torch.Tensor, wait_layer) -> None:
        """kv: [layers, 2, kv_heads, >= tokens, head_dim]; reads layer l only after ``wait_layer(l)``."""
        n = len(self.ids)
        res = recompute(self.model, kv[:, :, :, :n], self.ids, self.spans, self.ratio, self.selection,
                        wait_layer=wait_layer, query_rows=self.query_rows, last_hidden=self.last_hidden)
        context = n - self.query_rows
        share = sum(res.layer_rows) / (len(res.layer_rows) * context) if context and res.layer_rows else 0.0
        self.outcome = BlendOutcome(int(res.selected.numel()), share, res.last_hidden)
