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

# Chosen by first-token KL vs full prefill at ratio 0.15 (4 dev documents x 512 tokens, 7 questions,
# scripts/compare_selection.py): question-aware "kdn" 0.019 (0.35x cacheblend's), question pass over
# half the layers 0.023 (0.43x), every question token instead of the last 0.026 (0.49x); cacheblend
# 0.054. Without the question (prepare() with no query) "kdn" ranks by deviation like cacheblend.
DEFAULT_SELECTION = "kdn"

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
