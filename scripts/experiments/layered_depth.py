"""Experiment (dev split only; not a shipped selection): each selected token recomputed up to its own depth,
the last layer at which it is among the fewest tokens holding COVERAGE of the question's attention at that
layer (layer 0 skipped: its re-rotated KV is exact), instead of kdn's deviation-based narrowing.

    python scripts/experiments/layered_depth.py COVERAGE bench --split dev --workload long --docs 8 \
        --questions 3 --reps 1 --timing-cases 1 --methods full,blend --ratios 0.15 \
        --selection kdn-adaptive,kdn-layered --store "memory://?budget=8GiB"

Result (2026-12-02, 4.2K-token dev prompts, 3 questions): coverage 0.8 gave q_layer% 4.4% at KL 0.052
(kdn-adaptive: 4.9%, 0.047); 0.9 gave 8.8% at 0.042 (kdn@0.15: 9.9%, 0.040). No better at equal work,
so it was not kept. It keeps per-request state on the selection instance, which is fine here only
because ``get_selection(name)`` makes one per request.
"""
import sys, torch
import kdn_hf.blend.selection as S
from kdn_hf.blend.selection import KDNSelection, SelectionInput, _top

COV = float(sys.argv[1])

class Layered(KDNSelection):
    name = "kdn-layered"
    adaptive = True
    def __init__(self, **kw):
        super().__init__(**kw)
        self._depth = None
    def narrow_layers(self, L):
        return tuple(range(L - 1)) if self._depth is not None else super().narrow_layers(L)
    def select(self, inp: SelectionInput):
        q = self.query_score(inp)
        if q is None:
            self._depth = None
            return super().select(inp)
        att = inp.query_attention[:, -1]  # [L, C]
        L, C = att.shape
        depth = torch.full((C,), -1)
        for l in range(1, L):
            s, idx = att[l].sort(descending=True)
            cum = s.cumsum(0) / s.sum()
            m = int((cum < COV).sum()) + 1
            depth[idx[:m]] = l
        cand = depth >= 0
        score = q.clone(); score[~cand] = -1
        n = min(inp.budget, int(cand.sum()))
        sel = _top(score, n)
        self._depth = depth
        self._sel_depth = depth[sel]
        return sel
    def narrow_count(self, i, rows, budget, L):
        if self._depth is None:
            return super().narrow_count(i, rows, budget, L)
        return max(1, int((self._sel_depth > i).sum()))
    def narrow(self, i, rows, dev, keep):
        if self._depth is None:
            return super().narrow(i, rows, dev, keep)
        d = self._depth[rows.cpu()]
        return torch.nonzero(d > i).flatten()

S.SELECTIONS["kdn-layered"] = Layered
from kdn_hf.cli import main
sys.argv = ["kdn"] + sys.argv[2:]
main()
