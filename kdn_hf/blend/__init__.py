"""Blending: selective recompute of composed chunk KV (CacheBlend, with a correct causal mask).

    from kdn_hf.blend import recompute, get_selection, SELECTIONS
    res = recompute(model, kv, token_ids, spans, ratio=0.15, selection=get_selection("cacheblend"))

``KDN.prepare``/``KDN.generate`` call this for ``mode="blend"``; see
``selection.py`` for the strategies and ``recompute.py`` for the algorithm.
"""

from kdn_hf.blend.recompute import RecomputeResult, causal_mask, recompute
from kdn_hf.blend.selection import (
    SELECTIONS,
    AdaptiveKDNSelection,
    CacheBlendSelection,
    KDNSelection,
    OneShotCacheBlendSelection,
    Selection,
    SelectionInput,
    get_selection,
    layer_share,
    ratio_for_layer_share,
)

#: the default selection: question-aware, with progressive narrowing (the README's "How the blend
#: defaults were chosen" has the measurements behind it). Without the question (prepare() with no query)
#: "kdn" ranks by K+V deviation at layer 1 (like cacheblend's first pick) and narrows as with it.
DEFAULT_SELECTION = "kdn"

__all__ = [
    "DEFAULT_SELECTION",
    "AdaptiveKDNSelection",
    "SELECTIONS",
    "CacheBlendSelection",
    "KDNSelection",
    "OneShotCacheBlendSelection",
    "RecomputeResult",
    "Selection",
    "SelectionInput",
    "causal_mask",
    "get_selection",
    "layer_share",
    "ratio_for_layer_share",
    "recompute",
]
