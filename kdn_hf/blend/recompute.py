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
(``Selection.narrow_layers``): the context rows whose fresh K/V deviates least
from the reused K/V there stop, and keep their reused KV in the layers above.

It is a manual loop over the model's own decoder layers (stock modules, stock
attention kernels), with three ingredients:

- :class:`_ScatterCache`: its ``update`` writes the new rows into their slots of
  the full-length K/V and returns the full K/V, so the attention sees the whole
  context;
- explicit positions (the rotary cos/sin of each row's own slot);
- a 4D float additive mask [1, 1, rows, tokens]: row at position i sees keys at
  positions <= i only (a bool mask breaks the eager path; SDPA takes either).
  The CacheBlend and LMCache reference code let earlier selected tokens see
  later ones; this one does not.

Works for decoder-only HF models whose base model exposes ``embed_tokens``,
``rotary_emb`` and ``layers`` (Llama, Mistral, Qwen2/3, SmolLM, Gemma-style
without per-layer masks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdn_hf.blend.selection import Selection, SelectionInput
from kdn_hf.compat import cache_kwarg
from kdn_hf.errors import ConfigError


class _Probed(Exception):
    """Raised by the cache to stop a layer right after its K/V projections (control flow only)."""


class _ScatterCache:
    """Full-length K/V that the attention of a layer reads, with the current rows scattered in.

    kv: [layers, 2, kv_heads, tokens, head_dim], updated in place.
    """

    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv
        self.rows: torch.Tensor | None = None  # [n] slots of the rows being run
        self.probe = False
        self.measure = True  # compute dev_k/dev_v on update
        self.dev_k: torch.Tensor | None = None  # [n] float32, set by each update
        self.dev_v: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key_states/value_states: [1, kv_heads, n, head_dim] for self.rows
        k_all, v_all = self.kv[layer_idx, 0], self.kv[layer_idx, 1]  # [kv_heads, tokens, head_dim]
        k_new, v_new = key_states[0].to(k_all.dtype), value_states[0].to(v_all.dtype)
        if self.measure:
            old_k, old_v = k_all[:, self.rows].float(), v_all[:, self.rows].float()
            self.dev_k = (k_new.float() - old_k).pow(2).sum(dim=(0, 2))
            self.dev_v = (v_new.float() - old_v).pow(2).sum(dim=(0, 2))
        k_all.index_copy_(1, self.rows, k_new)
        v_all.index_copy_(1, self.rows, v_new)
        if self.probe:
            raise _Probed
        return k_all[None], v_all[None]


def causal_mask(rows: torch.Tensor, num_keys: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[1, 1, n, num_keys] additive mask: 0 where key position <= the row's position, else -inf.

    rows: [n] int64 positions (= slots) of the query rows.
    """
    keys = torch.arange(num_keys, device=device)
    allowed = keys[None, :] <= rows.to(device)[:, None]  # [n, num_keys]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


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


def query_attention(layer, hidden_q: torch.Tensor, q_pos: torch.Tensor, pos_emb, keys: torch.Tensor):
    """How much each question row attends to each key at ``layer``: [q, tokens] float32 (rows sum
    to 1, averaged over heads), or None when the layer's attention is not Llama-style (q_proj,
    head_dim, the modeling module's ``apply_rotary_pos_emb``).

    hidden_q: [1, q, hidden] input of ``layer`` for the question rows; q_pos: [q] their positions.
    pos_emb:  (cos, sin) [1, tokens, head_dim] for every slot.
    keys:     [kv_heads, tokens, head_dim] the layer's K, the question rows' own included.
    Causal: a question row sees keys at positions <= its own.
    """
    import importlib

    attn = layer.self_attn
    try:
        rotate = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
        head_dim = attn.head_dim
        x = layer.input_layernorm(hidden_q)
        q = attn.q_proj(x).view(1, x.shape[1], -1, head_dim).transpose(1, 2)  # [1, heads, q, head_dim]
        if getattr(attn, "q_norm", None) is not None:
            q = attn.q_norm(q)
    except (AttributeError, RuntimeError):
        return None
    cos, sin = pos_emb
    q, _ = rotate(q, q, cos[:, q_pos], sin[:, q_pos])
    heads, kv_heads, n = q.shape[1], keys.shape[0], q.shape[2]
    # grouped-query: heads h*g..h*g+g-1 share kv head h; no copy of K
    qg = q[0].reshape(kv_heads, (heads // kv_heads) * n, head_dim).float()
    scores = (qg @ keys.float().transpose(1, 2)) * (head_dim**-0.5)  # [kv_heads, g*q, tokens]
    scores = scores.view(heads, n, -1)
    later = torch.arange(keys.shape[1], device=keys.device)[None, :] > q_pos.to(keys.device)[:, None]
    scores.masked_fill_(later[None], float("-inf"))
    return scores.softmax(-1).mean(dim=0)


def _question_pass(layers, hidden_q, q_rows, C, pos_emb, cache, kv, kv_name, own_causal, wait,
                   depth: int, last_only: bool):
    """Run the question rows through layers ``0..depth-1`` over the composed (reused) KV and return
    how much they attend to each context token at each of those layers: [depth, q or 1, C] float32
    on CPU (``last_only``: the last question row's attention only), or None when the attention is
    not Llama-style. Writes the question rows' K/V (overwritten later by the recompute)."""
    rs = _Rows(q_rows, kv.shape[3], pos_emb, kv.dtype, own_causal)
    cache.measure = False
    att = []
    for i, layer in enumerate(layers[:depth]):
        wait(i)
        h_in = hidden_q
        # the last layer's output is never used: stop it once the rows' K/V are written
        hidden_q = _run_layer(layer, hidden_q, rs, cache, kv_name, kv_only=i == depth - 1, grouped=True)
        if last_only:
            a = query_attention(layer, h_in[:, -1:], q_rows[-1:], pos_emb, kv[i, 0])
        else:
            a = query_attention(layer, h_in, q_rows, pos_emb, kv[i, 0])
        if a is None:
            return None
        att.append(a[:, :C])
    return torch.stack(att).cpu()


def _decoder(model):
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    for attr in ("embed_tokens", "rotary_emb", "layers"):
        if not hasattr(base, attr):
            raise ConfigError(
                f"{type(model).__name__}: blending needs a decoder with embed_tokens, rotary_emb and layers "
                f"(Llama-style); this one has no {attr!r}. Use mode='reuse' or mode='full'"
            )
    return base


#: rows per causal group at least (fewer groups below that: each group is one more attention call)
GROUP_ROWS = 32
#: causal groups at most
MAX_GROUPS = 8


class _Rows:
    """A set of query rows with what every layer needs for them, built once.

    mask is None when the rows are every slot 0..T-1 and the attention is SDPA: its own
    causal path (``is_causal``, top-left aligned, exact for that case) is faster. Eager
    attention applies no causality without a mask, so it always gets one.

    groups: the rows (sorted by position) cut into runs of about equal size, each with the
    number of keys it can see (its last row's position + 1): ``(start, end, keys)``; their
    causal masks over those keys only come from ``groups_for``. Attending group by group skips
    keys that the mask would hide anyway (on average half the context for rows spread over it);
    the result is the same, as masked keys get zero weight. None where the rows are not sorted.
    """

    def __init__(self, rows: torch.Tensor, num_keys: int, pos_emb, dtype, own_causal: bool) -> None:
        self.rows = rows
        every = rows.numel() == num_keys
        self.mask = None if every and own_causal else causal_mask(rows, num_keys, dtype, rows.device)
        cos, sin = pos_emb
        self.pos_emb = pos_emb if every else (cos[:, rows], sin[:, rows])
        self._dtype = dtype
        self._groups = False  # not built yet
        self._masks: dict[int, list] = {}

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

    def groups_for(self, fold: int):
        """``groups`` with each group's mask [1, 1, fold * rows, keys] for query heads folded into
        the rows ``fold`` at a time (grouped-query attention), built once per ``fold``."""
        if fold not in self._masks:
            self._masks[fold] = [
                (a, b, m, causal_mask(self.rows[a:b], m, self._dtype, self.rows.device).repeat(1, 1, fold, 1))
                for a, b, m in self.groups
            ]
        return self._masks[fold]


#: decoder layers whose forward is exactly ``_grouped_layer``'s (pre-norm attention + MLP, RoPE on
#: Q/K, optional per-head q_norm/k_norm): they attend group by group
_GROUPED_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def groupable(layer) -> bool:
    """Whether ``layer`` can run through ``_grouped_layer`` (a known Llama-style layer with full
    causal attention: no sliding window)."""
    attn = getattr(layer, "self_attn", None)
    if type(layer).__name__ not in _GROUPED_LAYERS or attn is None:
        return False
    # Qwen2/3 set it per layer; Mistral reads its config's
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(attn.config, "sliding_window", None)
    return (window is None
            and all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))
            and all(hasattr(layer, a) for a in ("input_layernorm", "post_attention_layernorm", "mlp")))


def _grouped_layer(layer, hidden, rs: _Rows, cache, kv_only: bool = False):
    """The forward of a Llama-style decoder layer on the rows ``rs``, attending one causal group of
    rows at a time over the keys that group can see (``_Rows.groups``), with the model's own
    attention function. Same result as the stock forward with the full mask.

    hidden: [1, rows, hidden]; returns [1, rows, hidden], or None with ``kv_only``.
    """
    import importlib

    attn = layer.self_attn
    mod = importlib.import_module(type(attn).__module__)
    n = hidden.shape[1]
    x = layer.input_layernorm(hidden)
    shape = (1, n, -1, attn.head_dim)
    q, k, v = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [1, heads, n, head_dim]
    cos, sin = rs.pos_emb
    q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)
    cache.rows = rs.rows
    cache.probe = kv_only
    try:
        keys, values = cache.update(k, v, attn.layer_idx)  # [1, kv_heads, tokens, head_dim]
    except _Probed:
        return None
    finally:
        cache.probe = False
    heads, kv_heads, d = q.shape[1], keys.shape[1], q.shape[3]
    g = heads // kv_heads
    out = []
    for a, b, m, mask in rs.groups_for(g):
        # grouped-query: heads h*g..h*g+g-1 share kv head h, so fold them into the rows (no copy of K/V)
        qg = q[0, :, a:b].reshape(1, kv_heads, g * (b - a), d)
        o = F.scaled_dot_product_attention(qg, keys[:, :, :m], values[:, :, :m], attn_mask=mask,
                                           scale=attn.scaling)  # [1, kv_heads, g * rows, head_dim]
        out.append(o.reshape(heads, b - a, d).transpose(0, 1))  # [rows of the group, heads, head_dim]
    o = torch.cat(out, dim=0).reshape(1, n, heads * d)
    hidden = hidden + attn.o_proj(o)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _run_layer(layer, hidden, rs: _Rows, cache, kv_name, kv_only: bool = False, grouped: bool = False):
    """``layer`` on the rows ``rs`` (their K/V scattered into ``cache``); its output hidden states
    [1, rows, hidden], or None with ``kv_only`` (stopped once the K/V are written). ``grouped``:
    attend by causal groups (``_grouped_layer``) where the layer and the rows allow it."""
    if grouped and rs.groups is not None and groupable(layer):
        return _grouped_layer(layer, hidden, rs, cache, kv_only)
    cache.rows = rs.rows
    cache.probe = kv_only
    try:
        out = layer(
            hidden,
            attention_mask=rs.mask,
            position_ids=rs.rows[None],
            position_embeddings=rs.pos_emb,
            use_cache=True,
            **{kv_name: cache},
        )
    except _Probed:
        return None
    finally:
        cache.probe = False
    return out[0] if isinstance(out, tuple) else out


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
    base = _decoder(model)
    layers = base.layers[: kv.shape[0]]
    T = kv.shape[3]
    device = kv.device
    kv_name = cache_kwarg(layers[0])  # `cache` on transformers >= 5.24
    dtype = kv.dtype
    own_causal = getattr(model.config, "_attn_implementation", None) == "sdpa"
    if not 0 <= query_rows < T:
        raise ConfigError(f"query_rows must lie in [0, {T}) for {T} slots, got {query_rows}")
    if last_hidden and not query_rows:
        raise ConfigError("last_hidden needs query_rows > 0 (the last slot must be a question row)")
    C = T - query_rows  # context tokens: the ones selection chooses from
    budget = min(C, max(1, round(ratio * C)))
    wait = wait_layer if wait_layer is not None else (lambda i: None)

    ids = token_ids.to(device)
    all_rows = torch.arange(T, device=device)
    hidden = base.embed_tokens(ids[None])  # [1, T, hidden]
    pos_emb = base.rotary_emb(hidden, position_ids=all_rows[None])  # cos/sin [1, T, head_dim]
    cache = _ScatterCache(kv)

    q_att = None
    if query_rows and selection.uses_query:
        depth = selection.query_layers(len(layers))
        q_att = _question_pass(layers, hidden[:, C:], all_rows[C:], C, pos_emb, cache, kv, kv_name,
                               own_causal, wait, depth, selection.query_last_only)
    dev_k = dev_v = None
    start = 0
    if selection.probes(q_att is not None):
        start = check = selection.check_layer
        if not 1 <= check < len(layers):
            raise ConfigError(f"check_layer must lie in [1, {len(layers)}), got {check}")
        every = _Rows(all_rows, T, pos_emb, dtype, own_causal)
        cache.measure = False
        for i in range(check):  # every token, fresh: exact
            hidden = _run_layer(layers[i], hidden, every, cache, kv_name)
        cache.measure = True
        wait(check)
        _run_layer(layers[check], hidden, every, cache, kv_name, kv_only=True)
        dev_k, dev_v = cache.dev_k[:C].cpu(), cache.dev_v[:C].cpu()
    sel = selection.select(SelectionInput(dev_k, dev_v, tuple(tuple(s) for s in spans), budget, q_att))
    rows = torch.cat([sel.to(device), all_rows[C:]])
    if rows.numel() == 0:
        return RecomputeResult(sel, dev_k, dev_v, q_att)
    rs = _Rows(rows, T, pos_emb, dtype, own_causal)
    hidden = hidden[:, rs.rows]
    last = len(layers) - 1
    # progressive narrowing: never after the last layer, nor when every context token is selected
    # (ratio 1 stays exact)
    narrow_at = {i for i in selection.narrow_layers(len(layers)) if i < last} if budget < C else set()
    layer_rows = [C] * start + [0] * (len(layers) - start)  # below a probe's check layer: every token
    for i in range(start, len(layers)):
        wait(i)
        layer_rows[i] = int(rs.rows.numel()) - query_rows
        cache.measure = i in narrow_at
        # the last layer's output is never used (the KV is the product): stop once its K/V are written
        h_in = hidden
        hidden = _run_layer(layers[i], hidden, rs, cache, kv_name, kv_only=i == last, grouped=True)
        if i == last and last_hidden:  # the full layer for the last row only (its K/V rewritten, the same)
            cache.measure = False
            one = _Rows(rs.rows[-1:], T, pos_emb, dtype, own_causal)
            out_last = _run_layer(layers[i], h_in[:, -1:], one, cache, kv_name, grouped=True)[0, -1]
        if cache.measure:  # narrow the context rows; question rows always go on
            n_ctx = int((rs.rows < C).sum())
            dev = (cache.dev_k + cache.dev_v)[:n_ctx].cpu()
            keep = selection.narrow(i, rs.rows[:n_ctx].cpu(), dev).to(device)
            keep = torch.cat([keep, torch.arange(n_ctx, rs.rows.numel(), device=device)])
            rs = _Rows(rs.rows[keep], T, pos_emb, dtype, own_causal)
            hidden = hidden[:, keep]
    return RecomputeResult(sel, dev_k, dev_v, q_att, out_last if last_hidden else None, tuple(layer_rows))
