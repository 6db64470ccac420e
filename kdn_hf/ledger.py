"""The stats ledger: a request's PrepareStats, derived once from the stages' typed results.

No stage edits counters as it goes; each returns what it did (plan units, a
Resolution, a BlendOutcome), and :func:`prepare_stats` counts from those after
the KV is complete. A hit that failed while composing was recomputed, so its
source is a computed one by then: it is counted as a miss, never as a hit
first and taken back later.
"""

from __future__ import annotations

from typing import Sequence

from kdn_hf.plan import Unit
from kdn_hf.resolve import Resolution, Source
from kdn_hf.result import PrepareStats


def count_sources(stats: PrepareStats, units: Sequence[Unit], sources: dict[str, Source]) -> None:
    """Hits per tier, misses, bytes and tokens of ``units`` whose distinct keys resolved to ``sources``.

    A unit's tokens are reused when it was a hit or repeats a unit earlier in the prompt, computed when
    this request computed its first occurrence."""
    seen: set[str] = set()
    for unit in units:
        src = sources[unit.key]
        if unit.key in seen or src.stored:
            stats.tokens_reused += len(unit.ids)
        else:
            stats.tokens_computed += len(unit.ids)
        if unit.key in seen:
            continue
        seen.add(unit.key)
        if src.stored:
            stats.hits[src.tier] = stats.hits.get(src.tier, 0) + 1
            stats.bytes_loaded += src.nbytes
        else:
            stats.misses += 1


def prepare_stats(mode: str, chunks: int, tokens_total: int, units: Sequence[Unit] = (),
                  resolution: Resolution | None = None) -> PrepareStats:
    """The stats of a prepared prompt of ``chunks`` chunks and ``tokens_total`` tokens (opener included)."""
    stats = PrepareStats(mode=mode, chunks=chunks, tokens_total=tokens_total)
    if resolution is not None:
        count_sources(stats, units, resolution.sources)
    return stats
