"""Candidate selections for the distractor workload (experiments; nothing here edits /work/main)."""
from __future__ import annotations

import torch

import kdn_hf.blend.stage as _stage
from kdn_hf.blend.recompute import RecomputeResult, recompute as _recompute
from kdn_hf.blend.selection import KDNSelection, SelectionInput, _top


def _score(inp: SelectionInput, last: bool, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    att = inp.query_attention  # [layers, q, tokens]
    L = att.shape[0]
    a, b = int(round(lo * L)), max(int(round(lo * L)) + 1, int(round(hi * L)))
    att = att[a:b]
    att = att[:, -1] if last else att.mean(dim=1)
    return att.mean(dim=0).clone()


class ScoreSel(KDNSelection):
    """KDN with the score averaged over layers [lo, hi) of the depth, last or mean question tokens."""

    def __init__(self, lo=0.0, hi=1.0, query_tokens="last", **kw):
        super().__init__(query_tokens=query_tokens, **kw)
        self.lo, self.hi = lo, hi

    def select(self, inp):
        if inp.query_attention is None:
            return super().select(inp)
        return _top(_score(inp, self.query_tokens == "last", self.lo, self.hi), inp.budget)


class WindowSel(KDNSelection):
    """Top question-attended tokens, each expanded to a window [s - back, s + fwd] (fact span), until the
    budget is filled."""

    def __init__(self, back=4, fwd=2, query_tokens="last", **kw):
        super().__init__(query_tokens=query_tokens, **kw)
        self.back, self.fwd = back, fwd

    def select(self, inp):
        if inp.query_attention is None:
            return super().select(inp)
        score = _score(inp, self.query_tokens == "last")
        T = score.numel()
        order = torch.sort(score, descending=True, stable=True).indices.tolist()
        chosen = torch.zeros(T, dtype=torch.bool)
        n = 0
        for s in order:
            if n >= inp.budget:
                break
            for t in range(max(0, s - self.back), min(T, s + self.fwd + 1)):
                if not chosen[t] and n < inp.budget:
                    chosen[t] = True
                    n += 1
        return torch.nonzero(chosen).flatten()


def _doc_mass(inp, score, skip=8):
    """Attention mass of each span (first ``skip`` tokens of a span left out: sinks)."""
    return [float(score[s + skip:e].sum()) if e - s > skip else 0.0 for s, e in inp.spans]


class DocSel(KDNSelection):
    """Recompute the whole document the question attends to most (its span, or the oracle's gold span),
    optionally capped at the last token of it among the top-attended ones; plus top-attended tokens
    elsewhere (``extra`` share of the budget on top of the doc). Budget is ignored for the doc part."""

    def __init__(self, oracle=False, extra=0.0, upto=False, protect=False, skip=8, **kw):
        super().__init__(**kw)
        self.oracle, self.extra, self.upto, self.protect, self.skip = oracle, extra, upto, protect, skip
        self.gold = None  # span index, set by the harness for the oracle
        self._doc = None

    def set_case(self, case):
        self.gold = case.gold_index + 1 if self.oracle else None

    def pick_doc(self, inp, score):
        if self.gold is not None:
            return self.gold
        mass = _doc_mass(inp, score, self.skip)
        mass[0] = -1.0  # the system chunk
        return max(range(len(mass)), key=lambda i: mass[i])

    def select(self, inp):
        if inp.query_attention is None:
            return super().select(inp)
        score = _score(inp, self.query_tokens == "last")
        d = self.pick_doc(inp, score)
        s, e = inp.spans[d]
        if self.upto:
            top = _top(score, inp.budget)
            inside = top[(top >= s) & (top < e)]
            if inside.numel():
                e = int(inside.max()) + 1
        doc = torch.arange(s, e)
        self._doc = (s, e)
        k = int(round(self.extra * inp.budget))
        if k:
            sc = score.clone()
            sc[s:e] = -1.0
            doc = torch.cat([doc, _top(sc, k)])
        return torch.sort(torch.unique(doc)).values

    def narrow(self, layer, rows, dev, keep):
        if self.protect and self._doc is not None:
            s, e = self._doc
            dev = dev.clone()
            dev[(rows >= s) & (rows < e)] += 1e9
        return _top(dev, keep)


class TwoPass:
    """Marker wrapper: pass 1 with ``first`` at ``r1``, then pass 2 with ``second`` at the request's ratio
    over the blended KV (question attention re-measured). ``exclude``: pass 2 skips pass 1's tokens."""


class TwoPassSel(KDNSelection):
    def __init__(self, first: KDNSelection, r1: float, second: KDNSelection, exclude=True):
        super().__init__()
        self.first, self.r1, self.second, self.exclude = first, r1, second, exclude
        self.narrow_depths = second.narrow_depths
        self.narrow_keep = second.narrow_keep


class _Excl(KDNSelection):
    def __init__(self, base, banned):
        super().__init__(narrow_depths=base.narrow_depths, narrow_keep=base.narrow_keep,
                         query_tokens=base.query_tokens)
        self.base, self.banned = base, banned

    def select(self, inp):
        if self.banned is None or inp.query_attention is None:
            return self.base.select(inp)
        att = inp.query_attention.clone()
        att[..., self.banned] = -1.0
        return self.base.select(SelectionInput(inp.dev_k, inp.dev_v, inp.spans, inp.budget, att))

    def narrow(self, layer, rows, dev, keep):
        return self.base.narrow(layer, rows, dev, keep)


def _patched(model, kv, ids, spans, ratio, selection, wait_layer=None, query_rows=0, last_hidden=False):
    if not isinstance(selection, TwoPassSel):
        return _recompute(model, kv, ids, spans, ratio, selection, wait_layer=wait_layer, query_rows=query_rows,
                          last_hidden=last_hidden)
    r1 = _recompute(model, kv, ids, spans, selection.r1, selection.first, wait_layer=wait_layer,
                    query_rows=query_rows, last_hidden=False)
    second = _Excl(selection.second, r1.selected.cpu() if selection.exclude else None)
    r2 = _recompute(model, kv, ids, spans, ratio, second, query_rows=query_rows, last_hidden=last_hidden)
    rows = tuple(a + b for a, b in zip(r1.layer_rows, r2.layer_rows))
    return RecomputeResult(torch.unique(torch.cat([r1.selected, r2.selected])), None, None, r2.query_attention,
                           r2.last_hidden, rows)


_stage.recompute = _patched

CONFIGS = {
    "oracle-gold-flat": (lambda: DocSel(oracle=True, narrow_depths=()), 0.15),
    "oracle-gold-narrow": (lambda: DocSel(oracle=True), 0.15),
    "topdoc-narrow": (lambda: DocSel(), 0.15),
    "topdoc-upto-flat": (lambda: DocSel(upto=True, narrow_depths=()), 0.15),
    "kdn@0.227": (lambda: KDNSelection(), 0.227),
    "win4-2@0.227": (lambda: WindowSel(4, 2), 0.227),
    "win8-4@0.227": (lambda: WindowSel(8, 4), 0.227),
    "deep@0.227": (lambda: ScoreSel(lo=0.5), 0.227),
    "mean@0.227": (lambda: KDNSelection(query_tokens="mean"), 0.227),
    "2pass@.12+.11": (lambda: TwoPassSel(KDNSelection(), 0.12, KDNSelection()), 0.11),
}

CONFIGS.update({
    "win4-2-flat@0.15": (lambda: WindowSel(4, 2, narrow_depths=()), 0.15),
    "win2-1@0.227": (lambda: WindowSel(2, 1), 0.227),
    "win6-3-mean@0.227": (lambda: WindowSel(6, 3, query_tokens="mean"), 0.227),
})


class DraftSel(KDNSelection):
    """Lookahead selection: the request's query is the question followed by a short greedy draft of the
    answer decoded over the reused (un-blended) KV (``draft_tokens`` tokens; the caller appends them,
    see ``harness.evaluate``). The score is the attention of the question's last row and the draft rows
    (``rows`` = draft + 1 last query rows), averaged over those rows and the layers: the tokens the
    *answer* reads (the fact value, several tokens after the question), not only its first token.
    The cache still covers the context only; the draft rows are not kept."""

    def __init__(self, draft_tokens=8, window=(0, 0), **kw):
        super().__init__(query_tokens="mean", **kw)
        self.draft_tokens = draft_tokens
        self.rows = 1
        self.back, self.fwd = window

    def select(self, inp):
        if inp.query_attention is None:
            return super().select(inp)
        att = inp.query_attention[:, -self.rows:]  # [layers, rows, tokens]
        score = att.mean(dim=(0, 1))
        if self.back or self.fwd:
            return WindowSel.select(self, inp) if False else _window(score, inp.budget, self.back, self.fwd)
        return _top(score, inp.budget)


def _window(score, budget, back, fwd):
    T = score.numel()
    order = torch.sort(score, descending=True, stable=True).indices.tolist()
    chosen = torch.zeros(T, dtype=torch.bool)
    n = 0
    for s in order:
        if n >= budget:
            break
        for t in range(max(0, s - back), min(T, s + fwd + 1)):
            if not chosen[t] and n < budget:
                chosen[t] = True
                n += 1
    return torch.nonzero(chosen).flatten()


CONFIGS.update({
    "draft8@0.227": (lambda: DraftSel(8), 0.227),
    "draft8-flat@0.15": (lambda: DraftSel(8, narrow_depths=()), 0.15),
    "draft8-win4-2@0.227": (lambda: DraftSel(8, window=(4, 2)), 0.227),
})
