"""Selective recompute: fix the composed KV of a prompt by re-running a few tokens.

Given the naively composed (re-rotated) KV of a context (and optionally the
question after it), ``recompute`` asks a
:class:`~kdn_hf.blend.selection.Selection` which tokens to recompute, giving it
what it asks for:

- probing (CacheBlend): layers ``< check_layer`` run fresh for every token
  (layer 0 is cheap and, run on everything, exact); at the check layer only
  the K/V projections run for every token (the attention is cut off right
  after ``cache.update``), which gives each token's deviation from its reused
  K/V; the chosen tokens go on from the check layer;
- question-aware: the question runs over the reused KV first, recording how
  much it attends to each context token per layer; the chosen tokens run from
  layer 0 (the re-rotated layer-0 KV is exact, as it depends on the token and
  its position only).

The chosen tokens (and the question) are pushed through the layers, each
attending to the whole context (fresh rows where recomputed, reused rows
elsewhere). A strategy may narrow the set after some layers
(``Selection.narrow_layers``, ``Selection.narrow_count``): the context rows whose
fresh K/V deviates least from the reused K/V there stop, and keep their reused
KV in the layers above. The rows run at each layer (``layer_rows``) are
``Selection.rows_per_layer`` of the budget, computed before any layer runs.

It is a manual loop over the model's own decoder layers (stock modules, stock
attention kernels), run by the model's :class:`~kdn_hf.blend.runner.LayerRunner`
(which knows each layer's attention type, sliding window and RoPE call), with
three ingredients:

- :class:`~kdn_hf.blend.runner.ScatterCache`: its ``update`` writes the new
  rows into their slots of the full-length K/V and returns the full K/V, so the
  attention sees the whole context;
- explicit positions (the rotary cos/sin of each row's own slot, from the
  layer's own RoPE table);
- a 4D float additive mask [1, 1, rows, tokens]: row at position i sees keys at
  positions <= i only, and within the layer's sliding window where it has one
  (a bool mask breaks the eager path; SDPA takes either). The CacheBlend and
  LMCache reference code let earlier selected tokens see later ones; this one
  does not.

A model the runner cannot run exactly is refused
(:class:`~kdn_hf.errors.BlendUnsupportedError`), never blended approximately.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdn_hf.blend.runner import LayerRunner, ScatterCache, causal_mask, groupable, layer_runner
from kdn_hf.blend.selection import Selection, SelectionInput
from kdn_hf.errors import ConfigError

__all__ = ["RecomputeResult", "causal_mask", "groupable", "recompute", "self_check"]


@dataclass
class RecomputeResult:
    """selected: [n] int64 context slots recomputed (sorted; question rows excluded).
    dev_k, dev_v: [context tokens] float32 check-layer deviations, or None (no probe).
    query_attention: [layers, context tokens] float32 attention of the question per layer, or None.
    last_hidden: [hidden] output of the last layer for the last slot (asked with ``last_hidden``), or None.
    layer_rows: context rows recomputed at each layer: every one below a probe's check layer (run
                fresh), the selected ones above it, fewer in the upper layers with narrowing."""

    selected: torch.Tensor
    dev_k: torch.Tensor | None
    dev_v: torch.Tensor | None
    query_attention: torch.Tensor | None = None
    last_hidden: torch.Tensor | None = None
    layer_rows: tuple[int, ...] = ()


def _question_pass(runner: LayerRunner, hidden_q, q_rows, C, tables, cache, kv, own_causal, wait,
                   depth: int, last_only: bool):
    """Run the question rows through layers ``0..depth-1`` over the composed (reused) KV and return
    how much they attend to each context token at each of those layers: [depth, q or 1, C] float32
    on CPU (``last_only``: the last question row's attention only), or None when a layer's attention
    cannot be scored (``LayerPlan.scored``). Writes the question rows' K/V (overwritten later by the
    recompute)."""
    rs = _Rows(q_rows, kv.shape[3], tables, kv.dtype, own_causal)
    cache.measure = False
    att = []
    for i in range(depth):
        wait(i)
        h_in = hidden_q
        # the last layer's output is never used: stop it once the rows' K/V are written
        hidden_q = runner.run(i, hidden_q, rs, cache, kv_only=i == depth - 1, grouped=True)
        pos_emb = tables[runner.plans[i].rope_key]
        if last_only:
            a = runner.query_attention(i, h_in[:, -1:], q_rows[-1:], pos_emb, kv[i, 0])
        else:
            a = runner.query_attention(i, h_in, q_rows, pos_emb, kv[i, 0])
        if a is None:
            return None
        att.append(a[:, :C])
    return torch.stack(att).cpu()


#: rows per causal group at least (fewer groups below that: each group is one more attention call)
GROUP_ROWS = 32
#: causal groups at most
MAX_GROUPS = 8


class _Rows:
    """A set of query rows with what every layer needs for them, built once.

    pos_emb: (cos, sin) [1, tokens, head_dim] for every slot, or {rope_key: (cos, sin)} with one
    table per ``LayerPlan.rope_key``; ``pos_emb_for(key)`` gives the rows' own.

    ``mask_for(window)``: the rows' additive mask over every key, causal and within ``window``
    (None: full causal), built once per window. It is None for full attention when the rows are
    every slot 0..T-1 and the attention is SDPA: its own causal path (``is_causal``, top-left
    aligned, exact for that case) is faster. Eager attention applies no causality without a mask,
    and a sliding window needs one, so those always get one.

    groups: the rows (sorted by position) cut into runs of about equal size, each with the
    number of keys it can see (its last row's position + 1): ``(start, end, keys)``; their
    causal masks over those keys only come from ``groups_for``. Attending group by group skips
    keys that the mask would hide anyway (on average half the context for rows spread over it);
    the result is the same, as masked keys get zero weight. None where the rows are not sorted.
    Full attention only (the grouped path is not taken for windowed layers).
    """

    def __init__(self, rows: torch.Tensor, num_keys: int, pos_emb, dtype, own_causal: bool) -> None:
        self.rows = rows
        self.num_keys = num_keys
        self._every = rows.numel() == num_keys
        self._own_causal = own_causal
        self._tables = pos_emb if isinstance(pos_emb, dict) else {None: pos_emb}
        self._pos: dict = {}
        self._window_masks: dict = {}
        self._dtype = dtype
        self._groups = False  # not built yet
        self._masks: dict = {}

    def pos_emb_for(self, key):
        """(cos, sin) [1, rows, head_dim] of the rows in table ``key``."""
        if key not in self._pos:
            cos, sin = self._tables[key]
            self._pos[key] = (cos, sin) if self._every else (cos[:, self.rows], sin[:, self.rows])
        return self._pos[key]

    def mask_for(self, window: int | None):
        """[1, 1, rows, tokens] additive mask (or None, see the class docstring)."""
        if window is None and self._every and self._own_causal:
            return None
        if window not in self._window_masks:
            self._window_masks[window] = causal_mask(self.rows, self.num_keys, self._dtype, self.rows.device,
                                                     window)
        return self._window_masks[window]

    @property
    def groups(self):
        """``[(start, end, keys)]`` or None (see the class docstring)."""
        if self._groups is False:
            rows, n = self.rows, self.rows.numel()
            if n == 0 or (n > 1 and not bool((rows[1:] > rows[:-1]).all())):
                self._groups = None
            else:
                k = max(1, min(MAX_GROUPS, n // GROUP_ROWS))
                bounds = [(j * n // k, (j + 1) * n // k) for j in range(k)]
                self._groups = [(a, b, int(rows[b - 1]) + 1) for a, b in bounds]
        return self._groups

    def split_groups_for(self, fold: int):
        """``groups`` as ``(start, end, first, keys, mask)``: the keys before ``first`` (the group's first
        row's position) are seen by every row of the group, the keys ``first..keys-1`` causally, by
        ``mask`` [1, 1, fold * rows, keys - first] (query heads folded into the rows ``fold`` at a
        time); built once per ``fold``."""
        key = ("split", fold)
        if key not in self._masks:
            out = []
            for a, b, m in self.groups:
                first = int(self.rows[a])
                mask = causal_mask(self.rows[a:b] - first, m - first, self._dtype, self.rows.device)
                out.append((a, b, first, m, mask.repeat(1, 1, fold, 1)))
            self._masks[key] = out
        return self._masks[key]

    def groups_for(self, fold: int):
        """``groups`` with each group's mask [1, 1, fold * rows, keys] for query heads folded into
        the rows ``fold`` at a time (grouped-query attention), built once per ``fold``."""
        if fold not in self._masks:
            self._masks[fold] = [
                (a, b, m, causal_mask(self.rows[a:b], m, self._dtype, self.rows.device).repeat(1, 1, fold, 1))
                for a, b, m in self.groups
            ]
        return self._masks[fold]


@torch.inference_mode()
def recompute(
    model,
    kv: torch.Tensor,
    token_ids: torch.Tensor,
    spans,
    ratio: float,
    selection: Selection,
    wait_layer=None,
    query_rows: int = 0,
    last_hidden: bool = False,
) -> RecomputeResult:
    """Recompute ``ratio`` of the context tokens of the composed ``kv``, in place.

    kv:        [layers, 2, kv_heads, tokens, head_dim] composed KV at positions 0..tokens-1,
               model dtype and device; overwritten with the blended KV.
    token_ids: [tokens] int64 ids of every slot.
    spans:     (start, end) slots of each chunk.
    ratio:     fraction of the context tokens recomputed through the layers, (0, 1].
    wait_layer: optional callable(i) that returns once layer i of ``kv`` holds the composed
               (reused) KV (idempotent); lets delivery fill later layers while earlier ones are
               recomputed. ``Selection.fresh_layers`` tells which low layers are overwritten
               without being read (the composer may skip them).
    query_rows: the last ``query_rows`` slots are the question (suffix). It is computed through
               every layer (its slots' prior content is never read) and is not counted in the
               budget. A strategy with ``uses_query`` first runs it over the reused KV to see which
               context tokens it attends to (``SelectionInput.query_attention``); those tokens are
               then recomputed from layer 0, with no probe (layer-0 KV depends on the token and its
               position only, so the re-rotated one is exact).
    last_hidden: also return the last layer's output for the last slot (a question row: needs
               ``query_rows`` > 0): the final norm and LM head of the model give the next token's logits.

    Two ways to select, by ``selection.probes(query_known)``:

    - probe (CacheBlend): layers below ``check_layer`` run fresh for every token, the check layer
      runs up to its K/V projections for every token (deviation of fresh vs reused K/V), and the
      selected rows go on from the check layer;
    - no probe (question-aware): selected rows and question rows run from layer 0.
    """
    runner = layer_runner(model)
    runner.require_blendable()
    return _recompute(runner, kv, token_ids, spans, ratio, selection, wait_layer, query_rows, last_hidden)


def _recompute(runner: LayerRunner, kv, token_ids, spans, ratio, selection: Selection, wait_layer=None,
               query_rows: int = 0, last_hidden: bool = False) -> RecomputeResult:
    """``recompute`` with the model's runner, without its blendability check (the self-check runs it)."""
    L = kv.shape[0]
    if L > len(runner.layers):
        raise ConfigError(f"kv has {L} layers; the model has {len(runner.layers)}")
    T = kv.shape[3]
    device = kv.device
    dtype = kv.dtype
    own_causal = runner.own_causal
    if not 0 <= query_rows < T:
        raise ConfigError(f"query_rows must lie in [0, {T}) for {T} slots, got {query_rows}")
    if last_hidden and not query_rows:
        raise ConfigError("last_hidden needs query_rows > 0 (the last slot must be a question row)")
    C = T - query_rows  # context tokens: the ones selection chooses from
    budget = min(C, max(1, round(ratio * C)))
    wait = wait_layer if wait_layer is not None else (lambda i: None)

    ids = token_ids.to(device)
    all_rows = torch.arange(T, device=device)
    hidden = runner.embed(ids)  # [1, T, hidden]
    tables = runner.position_tables(hidden, all_rows)  # {rope_key: cos/sin [1, T, head_dim]}
    cache = ScatterCache(kv)

    q_att = None
    if query_rows and selection.uses_query:
        depth = selection.query_layers(L)
        q_att = _question_pass(runner, hidden[:, C:], all_rows[C:], C, tables, cache, kv, own_causal, wait,
                               depth, selection.query_last_only)
    dev_k = dev_v = None
    start = 0
    if selection.probes(q_att is not None):
        start = check = selection.check_layer
        if not 1 <= check < L:
            raise ConfigError(f"check_layer must lie in [1, {L}), got {check}")
        every = _Rows(all_rows, T, tables, dtype, own_causal)
        cache.measure = False
        for i in range(check):  # every token, fresh: exact
            hidden = runner.run(i, hidden, every, cache)
        cache.measure = True
        wait(check)
        runner.run(check, hidden, every, cache, kv_only=True)
        dev_k, dev_v = cache.dev_k[:C].cpu(), cache.dev_v[:C].cpu()
    sel = selection.select(SelectionInput(dev_k, dev_v, tuple(tuple(s) for s in spans), budget, q_att))
    rows = torch.cat([sel.to(device), all_rows[C:]])
    if rows.numel() == 0:
        return RecomputeResult(sel, dev_k, dev_v, q_att)
    rs = _Rows(rows, T, tables, dtype, own_causal)
    hidden = hidden[:, rs.rows]
    last = L - 1
    # progressive narrowing: never after the last layer, nor when every context token is selected
    # (ratio 1 stays exact)
    narrow_at = {i for i in selection.narrow_layers(L) if i < last} if budget < C else set()
    layer_rows = [C] * start + [0] * (L - start)  # below a probe's check layer: every token
    for i in range(start, L):
        wait(i)
        n_ctx = layer_rows[i] = int(rs.rows.numel()) - query_rows
        keep_n = selection.narrow_count(i, n_ctx, budget, L) if i in narrow_at else n_ctx
        cache.measure = keep_n < n_ctx
        # the last layer's output is never used (the KV is the product): stop once its K/V are written
        h_in = hidden
        hidden = runner.run(i, hidden, rs, cache, kv_only=i == last, grouped=True)
        if i == last and last_hidden:  # the full layer for the last row only (its K/V rewritten, the same)
            cache.measure = False
            one = _Rows(rs.rows[-1:], T, tables, dtype, own_causal)
            out_last = runner.run(i, h_in[:, -1:], one, cache, grouped=True)[0, -1]
        if keep_n < n_ctx:  # narrow the context rows; question rows always go on
            dev = (cache.dev_k + cache.dev_v)[:n_ctx].cpu()
            keep = selection.narrow(i, rs.rows[:n_ctx].cpu(), dev, keep_n).to(device)
            keep = torch.cat([keep, torch.arange(n_ctx, rs.rows.numel(), device=device)])
            rs = _Rows(rs.rows[keep], T, tables, dtype, own_causal)
            hidden = hidden[:, keep]
    return RecomputeResult(sel, dev_k, dev_v, q_att, out_last if last_hidden else None, tuple(layer_rows))


class _EverySlot(Selection):
    """Selects every context slot from layer 0 (the self-check's ratio-1 recompute)."""

    name = "every-slot"

    def probes(self, query_known: bool) -> bool:
        return False

    def select(self, inp: SelectionInput) -> torch.Tensor:
        return torch.arange(inp.budget)


#: tokens in the self-check's probe prompt (more where a sliding window is short enough to be crossed)
PROBE_TOKENS = 8
#: the longest probe: windows longer than this minus a few tokens are not crossed by the probe
MAX_PROBE_TOKENS = 64


@torch.inference_mode()
def self_check(model, runner: LayerRunner) -> tuple[str | None, str | None]:
    """Check ``runner`` against ``model``'s own forward once: a ratio-1 recompute of a short probe
    prompt (every row from layer 0, the last one a question row) must reproduce the prefill KV, and
    ``runner.logits`` of its last row the model's logits. Returns (why the KV differs or None, why
    the logits differ or None). Tolerance: relative error 1e-3 in float32, 2e-2 in lower precision
    (kernel rounding is far below; a structural mismatch, e.g. a missing embedding scale or logit
    soft-capping, is off by far more)."""
    from kdn_hf.compute import prefill, stack_cache

    # the config's window too: a layer misread as full attention then shows on the probe
    windows = [w for w in [p.window for p in runner.plans] + [getattr(runner.config, "sliding_window", None)]
               if isinstance(w, int) and w > 0]
    n = PROBE_TOKENS if not windows else max(PROBE_TOKENS, min(MAX_PROBE_TOKENS, min(windows) + 4))
    vocab = int(runner.base.embed_tokens.weight.shape[0])
    device = runner.base.embed_tokens.weight.device
    ids = (torch.arange(n) * 7919 + 13) % vocab
    try:
        cache, ref_logits = prefill(model, ids, torch.arange(n))
        ref = stack_cache(cache)  # [layers, 2, kv_heads, n, head_dim]
        kv = torch.zeros_like(ref)
        res = _recompute(runner, kv, ids.to(device), [(0, n - 1)], 1.0, _EverySlot(), query_rows=1,
                         last_hidden=True)
    except (RuntimeError, TypeError, ValueError, AttributeError, IndexError) as e:
        return f"running its layers one by one failed ({type(e).__name__}: {e})", "not checked"
    tol = 1e-3 if ref.dtype == torch.float32 else 2e-2

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))

    kv_err = max(rel(kv[i], ref[i]) for i in range(ref.shape[0]))
    kv_msg = None if kv_err <= tol else (
        f"its layers run one by one do not reproduce its own forward on a {n}-token probe (relative KV "
        f"error {kv_err:.2e} > {tol:g}): its forward does something the layer runner does not model")
    logit_err = rel(runner.logits(res.last_hidden), ref_logits)
    logit_msg = None if logit_err <= tol else f"logits differ from the model's (relative error {logit_err:.2e})"
    return kv_msg, logit_msg
