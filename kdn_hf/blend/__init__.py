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

# Chosen by first-token KL vs full prefill at ratio 0.15 (4 dev documents x 512 tokens, 16 questions,
# `scripts/compare_selection.py 16 512`): cacheblend 0.0755; question-aware "kdn" 0.0265 (0.35x
# cacheblend's); its question pass over 2/3, 1/2 or 1/3 of the layers 0.0347 (0.46x), 0.0373 (0.49x),
# 0.0478 (0.63x); every question token instead of the last 0.0340 (0.45x). The shallower passes save
# up to ~90 ms of TTFT but lose most on the hardest questions (one went 0.075 -> 0.167 at half depth).
# Progressive narrowing (`scripts/compare_selection.py 16 512 narrow`: KL, then median prepare time in
# that one run, the selections alternating): off 0.0265 / 1015 ms; after the 0-based layers 4, 8, 12,
# 16, 20 keeping 85% each time 0.0288 / 781 ms (the default: ~10% of the context's layer work instead
# of 15%); after 8, 16 keeping 75% 0.0284 / 860 ms; after 15 keeping 70% 0.0268 / 908 ms; after 10, 20
# keeping 60% 0.0292 / 820 ms; after 5 keeping 60% 0.0328 / 812 ms; cacheblend 0.0755 / 930 ms.
# In one `kdn bench` over all 80 dev questions narrowing took blend/kdn from 906 to 707 ms (3.26x to
# 4.15x full prefill) at KL 0.031 -> 0.035 and the same QA accuracy (README).
# Without the question (prepare() with no query) "kdn" ranks by deviation like cacheblend.
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
