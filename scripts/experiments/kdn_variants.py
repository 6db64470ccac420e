"""Experiment (dev split only; nothing here is shipped): variants of ``kdn``'s settings compared at equal
recompute work through ``kdn bench --layer-share`` (each gets the ratio whose layer% is that share).

    python scripts/experiments/kdn_variants.py bench --split dev --workload long --docs 8 --questions 8 \
        --reps 1 --timing-cases 1 --methods full,blend --layer-share 0.066 \
        --selection kdn,kdn-nonarrow,kdn-keep70,kdn-keep50,kdn-depth50,kdn-depth33,kdn-mean \
        --store "memory://?budget=8GiB"

Every argument is passed to ``kdn``; the variants are registered as selection names first:

- ``kdn-nonarrow``: no progressive narrowing (every selected token through every layer);
- ``kdn-keep70`` / ``kdn-keep50``: narrowing keeps 70% / 50% of the rows at each step (default 85%);
- ``kdn-depth50`` / ``kdn-depth33``: the question pass stops at half / a third of the layers (a cheaper
  pass; the ranking averages the layers it ran);
- ``kdn-mean``: every question token's attention instead of the last one's.

Result (2026-12-02, quiet machine, dev, 4.2K-token prompts of 8 documents, 8 questions, 6.6% of the
layer rows each; the README's "Long context"): first-token KL 0.0296 (kdn, 5.79x), 0.0299 (nonarrow,
5.97x), 0.0389 (keep70), 0.0486 (keep50), 0.0290 (depth50, 6.50x, but answer-token KL 0.093 against
kdn's 0.067), 0.0307 (depth33, 6.64x), 0.0326 (mean). None is better than ``kdn`` at equal work by more
than the noise of 8 questions, so the defaults stay.
"""

import sys

import kdn_hf.blend.selection as S
from kdn_hf.blend.selection import KDNSelection

VARIANTS = {
    "kdn-nonarrow": {"narrow_depths": ()},
    "kdn-keep70": {"narrow_keep": 0.7},
    "kdn-keep50": {"narrow_keep": 0.5},
    "kdn-depth50": {"query_depth": 0.5},
    "kdn-depth33": {"query_depth": 1 / 3},
    "kdn-mean": {"query_tokens": "mean"},
}


def _variant(name: str, settings: dict) -> type:
    def __init__(self) -> None:
        KDNSelection.__init__(self, **settings)

    return type(name.replace("-", "_"), (KDNSelection,), {"name": name, "__init__": __init__})


if __name__ == "__main__":
    for name, settings in VARIANTS.items():
        S.SELECTIONS[name] = _variant(name, settings)
    from kdn_hf.cli import main

    sys.argv = ["kdn"] + sys.argv[1:]
    main()
