"""Blending: selective recompute of composed chunk KV (CacheBlend, with a correct causal mask).

    from kdn_hf.blend import recompute, get_selection, SELECTIONS
    res = recompute(model, kv, token_ids, spans, ratio=0.15, selection=get_selection("cacheblend"))

``KDN.prepare``/``KDN.generate`` call this for ``mode="blend"``; see
``selection.py`` for the strategies and ``recompute.py`` for the algorithm.
"""

from kdn_hf.blend.recompute import RecomputeResult, causal_mask, recompute
from kdn_hf.blend.selection import (
    SELECTIONS,
    CacheBlendSelection,
    KDNSelection,
    Selection,
    SelectionInput,
    get_selection,
)

# Chosen from `kdn bench` (rag, 4 docs x 512 tokens, ratio 0.15): "kdn" (sinks + K+V deviation)
# and "cacheblend" tie on first-token KL (0.0555 vs 0.0559; 0.0495 vs 0.0489 at 256 tokens), and
# cacheblend agrees slightly more often; the simpler strategy is the default until one wins clearly.
DEFAULT_SELECTION = "cacheblend"

__all__ = [
    "DEFAULT_SELECTION",
    "SELECTIONS",
    "CacheBlendSelection",
    "KDNSelection",
    "RecomputeResult",
    "Selection",
    "SelectionInput",
    "causal_mask",
    "get_selection",
    "recompute",
]
