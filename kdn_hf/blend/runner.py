"""The layer runner: a model's decoder layers run on chosen rows at their own positions, exactly.

The recompute (``recompute.py``) pushes some rows of a prompt through the layers of the model,
each attending to the whole composed KV. How one layer does that depends on the model; the
runner, built once per model (``layer_runner(model)``, cached), knows it:

- per layer (:class:`LayerPlan`): its attention type (full causal, or a sliding window: a row at
  position i sees keys at positions ``i - window < p <= i``, the ``sliding_window_overlay``
  convention of transformers' masks), the argument of its RoPE call (Gemma 3 has one embedding
  per layer type), whether the grouped fast path applies (a Llama-style layer with full attention
  and no soft-capping; its attention is ``kdn_hf.kernels.selected_attention``'s Triton kernel on
  CUDA, SDPA by causal groups of rows on CPU) and whether its attention weights can be recomputed
  for the question pass;
- the embedding: ``embed_tokens``, which scales itself where the model does (Gemma);
- the logits of one row as the model computes them (final norm, LM head and, where the config
  has one, ``final_logit_softcapping``): ``logits`` and ``logits_exact``.

Anything it cannot run exactly is refused: ``require_blendable()`` raises
:class:`~kdn_hf.errors.BlendUnsupportedError` naming what was found (an unknown layer type,
missing pieces, bidirectional attention, a forward that differs from the runner's). Before the
first blend the runner checks itself once against the model's own forward: a ratio-1 recompute of
a short probe prompt must reproduce the prefill KV (and, for ``logits_exact``, the last row's
logits); a model whose forward does something the runner does not know about (e.g. scales the
embeddings outside ``embed_tokens``) is refused, never answered wrongly.

Who calls what: ``recompute`` calls ``require_blendable``, ``embed``, ``position_tables``, ``run``
and ``query_attention``; the engine calls ``logits_exact`` and ``logits`` for the first token.
A runner holds no per-request state: several threads may use one.
"""

from __future__ import annotations

import importlib
import inspect
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdn_hf.compat import cache_kwarg
from kdn_hf.errors import BlendUnsupportedError
from kdn_hf.kernels import resolve, selected_attention

#: decoder layers whose forward is exactly ``_grouped_layer``'s (pre-norm attention + MLP, RoPE on
#: Q/K, optional per-head q_norm/k_norm): their full-attention layers attend group by group
GROUPED_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
#: attention modules whose weights ``query_attention`` recomputes (Q projection, optional per-head
#: q_norm, the module's ``apply_rotary_pos_emb``, ``scaling``, optional logit soft-capping)
SCORED_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
                    "Gemma2Attention", "Gemma3Attention")
#: CausalLM classes whose logits are lm_head(norm(last hidden)), soft-capped by the config's
#: ``final_logit_softcapping`` where set
PLAIN_HEADS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
               "Gemma2ForCausalLM", "Gemma3ForCausalLM")
_ATTENTION_TYPES = ("full_attention", "sliding_attention")


class _Probed(Exception):
    """Raised by the cache to stop a layer right after its K/V projections (control flow only)."""


class ScatterCache:
    """Full-length K/V that the attention of a layer reads, with the current rows scattered in.

    kv: [layers, 2, kv_heads, tokens, head_dim], updated in place.
    """

    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv
        self.rows: torch.Tensor | None = None  # [n] slots of the rows being run
        self.first_row: int | None = None  # rows are first_row..first_row+n-1 (a slice copy), if set
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
        if self.first_row is not None:
            a, b = self.first_row, self.first_row + k_new.shape[1]
            k_all[:, a:b].copy_(k_new)
            v_all[:, a:b].copy_(v_new)
        else:
            k_all.index_copy_(1, self.rows, k_new)
            v_all.index_copy_(1, self.rows, v_new)
        if self.probe:
            raise _Probed
        return k_all[None], v_all[None]


def allowed_keys(rows: torch.Tensor, num_keys: int, window: int | None = None) -> torch.Tensor:
    """[n, num_keys] bool: key at position p is visible to the row at position i when p <= i and,
    with a sliding ``window``, p > i - window (transformers' ``sliding_window_overlay``).

    rows: [n] int64 positions (= slots) of the query rows.
    """
    keys = torch.arange(num_keys, device=rows.device)[None, :]
    pos = rows[:, None]
    allowed = keys <= pos
    if window is not None:
        allowed &= keys > pos - window
    return allowed


def causal_mask(rows: torch.Tensor, num_keys: int, dtype: torch.dtype, device, window: int | None = None):
    """[1, 1, n, num_keys] additive mask: 0 where the row sees the key (``allowed_keys``), else the
    dtype's min (a bool mask breaks the eager path; SDPA takes either)."""
    allowed = allowed_keys(rows.to(device), num_keys, window)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


@dataclass(frozen=True)
class LayerPlan:
    """How the runner runs decoder layer ``index``.

    window:   sliding window size (a row sees the keys at positions > its own - window), or None
              for full causal attention.
    rope_key: the position table the layer reads (``LayerRunner.position_tables``): a layer type
              for models with one RoPE per type (Gemma 3), ``"local"`` for a model's
              ``rotary_emb_local``, None for the model's one ``rotary_emb``.
    grouped:  the layer runs through ``_grouped_layer`` (Llama-style, full attention, no soft-capping).
    softcap:  attention logit soft-capping (Gemma 2), or None.
    scored:   ``query_attention`` can recompute this layer's attention weights.
    """

    index: int
    window: int | None
    rope_key: str | None
    grouped: bool
    softcap: float | None
    scored: bool


class _Refused(Exception):
    """A reason the runner cannot blend this model (collected into ``blend_error``)."""


def _decoder(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)


class LayerRunner:
    """The decoder layers of one model, run on chosen rows (see the module docstring).

    Attributes: ``layers`` (the decoder layers), ``plans`` ([LayerPlan] per layer), ``kv_name``
    (the cache keyword of a layer's forward), ``blend_error`` (why blending is refused, or None
    before the self-check has run or when it passed).
    """

    def __init__(self, model) -> None:
        self._model = weakref.ref(model)
        self.config = model.config
        self.base = _decoder(model)
        self._lock = threading.Lock()
        self._checked = False
        self._head_checked = False
        self.layers: tuple = ()
        self.plans: tuple[LayerPlan, ...] = ()
        self.kv_name = "past_key_values"
        problems: list[str] = []
        try:
            self._read(problems)
        except _Refused as e:
            problems.append(str(e))
        self.blend_error: str | None = "; ".join(problems) or None
        head_cls = type(model).__name__
        self._plain_head = (head_cls in PLAIN_HEADS and hasattr(self.base, "norm")
                            and model.get_output_embeddings() is not None)
        self._lm_head = model.get_output_embeddings()
        self._final_softcap = getattr(self.config, "final_logit_softcapping", None)

    @property
    def own_causal(self) -> bool:
        """Whether the attention applies causality itself when given no mask (SDPA's ``is_causal``);
        read at each call: the attention implementation of a loaded model may be switched."""
        return getattr(self.config, "_attn_implementation", None) == "sdpa"

    # ------------------------------------------------------------------ reading the model
    def _read(self, problems: list[str]) -> None:
        base, cfg = self.base, self.config
        missing = [a for a in ("embed_tokens", "rotary_emb", "layers") if not hasattr(base, a)]
        if missing:
            raise _Refused(f"its decoder {type(base).__name__} has no {', '.join(missing)} (expected a "
                           f"decoder-only model with embed_tokens, rotary_emb and layers)")
        if getattr(cfg, "use_bidirectional_attention", False):
            raise _Refused("its config sets use_bidirectional_attention (the recompute assumes causal attention)")
        self.layers = tuple(base.layers[: getattr(cfg, "num_hidden_layers", len(base.layers))])
        if not self.layers:
            raise _Refused("it has no decoder layers")
        self.kv_name = cache_kwarg(self.layers[0])
        params = inspect.signature(base.rotary_emb.forward).parameters
        self._rope_by_type = "layer_type" in params
        self._rope_types = tuple(getattr(base.rotary_emb, "layer_types", ()) or ())
        plans = []
        for i, layer in enumerate(self.layers):
            try:
                plans.append(self._plan(i, layer))
            except _Refused as e:
                problems.append(str(e))
        self.plans = tuple(plans)

    def _plan(self, i: int, layer) -> LayerPlan:
        cfg = self.config
        name = type(layer).__name__
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise _Refused(f"layer {i} ({name}) has no self_attn")
        if not getattr(attn, "is_causal", True):
            raise _Refused(f"layer {i} ({name}) has non-causal attention")
        fwd = inspect.signature(layer.forward).parameters
        if not {"position_embeddings", "attention_mask"} <= set(fwd):
            raise _Refused(f"layer {i} ({name}).forward takes no position_embeddings/attention_mask")
        types = getattr(cfg, "layer_types", None)
        kind = types[i] if types is not None and i < len(types) else None
        if kind is not None and kind not in _ATTENTION_TYPES:
            raise _Refused(f"layer {i} has attention type {kind!r} (supported: {', '.join(_ATTENTION_TYPES)})")
        if hasattr(attn, "sliding_window"):  # Qwen2/3, Gemma 2/3: set per layer from layer_types
            window = attn.sliding_window
        else:  # Mistral, Mixtral, Phi3, Starcoder2: the mask of every layer uses the config's
            window = getattr(cfg, "sliding_window", None)
        if kind == "sliding_attention" and window is None:
            raise _Refused(f"layer {i} is a sliding_attention layer without a sliding_window")
        if kind == "full_attention" and window is not None:
            raise _Refused(f"layer {i} is a full_attention layer, but its attention uses sliding_window={window}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise _Refused(f"layer {i} has sliding_window={window!r} (expected a positive int)")
        if self._rope_by_type:
            rope_key = kind or "full_attention"
            if self._rope_types and rope_key not in self._rope_types:
                raise _Refused(f"layer {i} ({rope_key}) has no RoPE table in {type(self.base.rotary_emb).__name__}")
        elif hasattr(self.base, "rotary_emb_local") and getattr(attn, "is_sliding", window is not None):
            rope_key = "local"  # Gemma 3 before per-type embeddings: local layers read rotary_emb_local
        else:
            rope_key = None
        softcap = getattr(attn, "attn_logit_softcapping", getattr(cfg, "attn_logit_softcapping", None))
        grouped = window is None and softcap is None and groupable(layer)
        scored = (type(attn).__name__ in SCORED_ATTENTION and hasattr(layer, "input_layernorm")
                  and all(hasattr(attn, a) for a in ("q_proj", "head_dim", "scaling"))
                  and hasattr(importlib.import_module(type(attn).__module__), "apply_rotary_pos_emb"))
        return LayerPlan(i, window, rope_key, grouped, softcap, scored)

    # ------------------------------------------------------------------ checks
    def require_blendable(self) -> None:
        """Raise BlendUnsupportedError unless every layer can be recomputed exactly (checked against
        the model's own forward once, on first use)."""
        if not self._checked:
            self._self_check()
        if self.blend_error is not None:
            model = self._model()
            raise BlendUnsupportedError(
                f"{type(model).__name__ if model is not None else 'this model'} cannot be blended exactly: "
                f"{self.blend_error}. Use mode='reuse' (re-rotated KV, no recompute) or mode='full'"
            )

    @property
    def checked(self) -> bool:
        """Whether the self-check has run (``blend_error`` then holds its verdict)."""
        return self._checked

    def check(self) -> None:
        """Run the once-per-model self-check now rather than in the first blend request (it costs a short
        prefill and recompute: ~0.3 s for SmolLM2-135M, ~0.5 s for Gemma-3-270M on 2 CPU cores). Never
        raises: ``require_blendable`` reports its verdict."""
        if not self._checked:
            self._self_check()

    @property
    def logits_exact(self) -> bool:
        """Whether ``logits`` computes what the model's forward does (a known CausalLM head, agreeing
        with the model on the self-check's probe)."""
        if not self._plain_head:
            return False
        if not self._checked:
            self._self_check()
        return self._head_checked

    def _self_check(self) -> None:
        with self._lock:
            if self._checked:
                return
            model = self._model()
            if self.blend_error is None and model is not None:
                from kdn_hf.blend.recompute import self_check  # runs the recompute through this runner

                kv_err, logit_err = self_check(model, self)
                if kv_err is not None:
                    self.blend_error = kv_err
                self._head_checked = self._plain_head and logit_err is None
            self._checked = True

    # ------------------------------------------------------------------ running
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[1, T, hidden] input of layer 0 for ids [T] int64 (on the model's device)."""
        return self.base.embed_tokens(ids[None])

    def position_tables(self, x: torch.Tensor, positions: torch.Tensor) -> dict:
        """{rope_key: (cos, sin)} with cos/sin [1, T, head_dim] for positions [T], one entry per
        ``LayerPlan.rope_key`` in use. x: any activation of the model's dtype and device."""
        tables = {}
        for key in dict.fromkeys(p.rope_key for p in self.plans):
            if key is None:
                tables[key] = self.base.rotary_emb(x, position_ids=positions[None])
            elif key == "local":
                tables[key] = self.base.rotary_emb_local(x, positions[None])
            else:
                tables[key] = self.base.rotary_emb(x, positions[None], key)
        return tables

    def run(self, i: int, hidden: torch.Tensor, rs, cache: ScatterCache, kv_only: bool = False,
            grouped: bool = False):
        """Layer ``i`` on the rows ``rs`` (a ``recompute._Rows``), their K/V scattered into ``cache``;
        its output hidden states [1, rows, hidden], or None with ``kv_only`` (stopped once the K/V
        are written). ``grouped``: attend by causal groups where the layer and the rows allow it."""
        plan, layer = self.plans[i], self.layers[i]
        pos_emb = rs.pos_emb_for(plan.rope_key)
        if grouped and plan.grouped and rs.groups is not None:
            return _grouped_layer(layer, hidden, rs, pos_emb, cache, kv_only)
        cache.rows = rs.rows
        cache.probe = kv_only
        try:
            out = layer(
                hidden,
                attention_mask=rs.mask_for(plan.window),
                position_ids=rs.rows[None],
                position_embeddings=pos_emb,
                use_cache=True,
                **{self.kv_name: cache},
            )
        except _Probed:
            return None
        finally:
            cache.probe = False
        return out[0] if isinstance(out, tuple) else out

    def query_attention(self, i: int, hidden_q: torch.Tensor, q_pos: torch.Tensor, pos_emb,
                        keys: torch.Tensor) -> torch.Tensor | None:
        """How much each question row attends to each key at layer ``i``: [q, tokens] float32 (rows
        sum to 1, averaged over heads), or None when the layer's attention is not one the runner
        can score (``LayerPlan.scored``).

        hidden_q: [1, q, hidden] input of the layer for the question rows; q_pos: [q] their positions.
        pos_emb:  (cos, sin) [1, tokens, head_dim] of the layer's RoPE for every slot.
        keys:     [kv_heads, tokens, head_dim] the layer's K, the question rows' own included.
        Uses the layer's scaling, soft-capping and mask (causal, within its window).
        """
        plan, layer = self.plans[i], self.layers[i]
        if not plan.scored:
            return None
        attn = layer.self_attn
        rotate = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
        head_dim = attn.head_dim
        x = layer.input_layernorm(hidden_q)
        q = attn.q_proj(x).view(1, x.shape[1], -1, head_dim).transpose(1, 2)  # [1, heads, q, head_dim]
        if getattr(attn, "q_norm", None) is not None:
            q = attn.q_norm(q)
        cos, sin = pos_emb
        q, _ = rotate(q, q, cos[:, q_pos], sin[:, q_pos])
        heads, kv_heads, n = q.shape[1], keys.shape[0], q.shape[2]
        # grouped-query: heads h*g..h*g+g-1 share kv head h; no copy of K
        qg = q[0].reshape(kv_heads, (heads // kv_heads) * n, head_dim).float()
        scores = (qg @ keys.float().transpose(1, 2)) * attn.scaling  # [kv_heads, g*q, tokens]
        if plan.softcap is not None:
            scores = torch.tanh(scores / plan.softcap) * plan.softcap
        scores = scores.view(heads, n, -1)
        hidden_keys = ~allowed_keys(q_pos.to(keys.device), keys.shape[1], plan.window)
        scores.masked_fill_(hidden_keys[None], float("-inf"))
        return scores.softmax(-1).mean(dim=0)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [vocab] float32 from the last layer's output [hidden] of one row: the
        model's final norm, its LM head and its final soft-capping (exact where ``logits_exact``)."""
        with torch.inference_mode():
            logits = self._lm_head(self.base.norm(hidden[None, None]))[0, 0]
            if self._final_softcap is not None:
                logits = torch.tanh(logits / self._final_softcap) * self._final_softcap
            return logits.float()


def _grouped_layer(layer, hidden, rs, pos_emb, cache: ScatterCache, kv_only: bool = False, attend=None):
    """The forward of a Llama-style decoder layer (full attention) on the rows ``rs``, its attention
    by :func:`grouped_attention` at the model's scaling. Same result as the stock forward with the
    full causal mask.

    hidden: [1, rows, hidden]; pos_emb: (cos, sin) [1, rows, head_dim] of the rows;
    attend: ``attend(q, keys, values, scale) -> [1, rows, heads * head_dim]``, the attention to use in
            place of ``grouped_attention`` (``kdn_hf.suffix``: rows at the end of the keys), or None;
    returns [1, rows, hidden], or None with ``kv_only``.
    """
    attn = layer.self_attn
    mod = importlib.import_module(type(attn).__module__)
    n = hidden.shape[1]
    x = layer.input_layernorm(hidden)
    shape = (1, n, -1, attn.head_dim)
    q, k, v = attn.q_proj(x).view(shape), attn.k_proj(x).view(shape), attn.v_proj(x).view(shape)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [1, heads, n, head_dim]
    cos, sin = pos_emb
    q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)
    cache.rows = rs.rows
    cache.probe = kv_only
    try:
        keys, values = cache.update(k, v, attn.layer_idx)  # [1, kv_heads, tokens, head_dim]
    except _Probed:
        return None
    finally:
        cache.probe = False
    attend = attend or (lambda q, keys, values, scale: grouped_attention(q, keys, values, rs, scale))
    o = attend(q, keys, values, attn.scaling)  # [1, rows, heads * head_dim]
    hidden = hidden + attn.o_proj(o)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rs, scale: float,
                      backend: str = "auto") -> torch.Tensor:
    """Full causal attention of the rows ``rs`` (a ``recompute._Rows`` with sorted rows: ``rs.groups``
    is not None) over every key: [1, rows, heads * head_dim].

    q:       [1, heads, rows, head_dim], RoPE applied, row i at position ``rs.rows[i]``.
    keys, values: [1, kv_heads, tokens, head_dim], key j at position j; heads h*g..h*g+g-1 read kv
             head h (g = heads // kv_heads, HF's ``repeat_kv`` order).
    backend: "auto": ``kdn_hf.kernels.selected_attention``'s Triton kernel where it runs (CUDA), else
             SDPA one causal group of rows at a time over the keys that group can see (the CPU path);
             "torch" / "triton": ``selected_attention`` with that backend (tests).
    """
    heads, kv_heads, n, d = q.shape[1], keys.shape[1], q.shape[2], q.shape[3]
    if backend != "auto" or resolve("auto", q) == "triton":
        # the grouped plan takes full-attention layers only: no window
        o = selected_attention(q, keys, values, rs.rows, scale=scale, window=None, backend=backend)
        return o[0].transpose(0, 1).reshape(1, n, heads * d)
    g = heads // kv_heads
    if q.device.type == "cpu" and _FLASH_CPU is not None:
        return _split_grouped_attention(q, keys, values, rs, scale)
    out = []
    for a, b, m, mask in rs.groups_for(g):
        # grouped-query: heads h*g..h*g+g-1 share kv head h, so fold them into the rows (no copy of K/V)
        qg = q[0, :, a:b].reshape(1, kv_heads, g * (b - a), d)
        o = F.scaled_dot_product_attention(qg, keys[:, :, :m], values[:, :, :m], attn_mask=mask,
                                           scale=scale)  # [1, kv_heads, g * rows, head_dim]
        out.append(o.reshape(heads, b - a, d).transpose(0, 1))  # [rows of the group, heads, head_dim]
    return torch.cat(out, dim=0).reshape(1, n, heads * d)


#: PyTorch's CPU flash-attention op, which also returns each row's log-sum-exp (None where missing)
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _split_grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rs,
                             scale: float) -> torch.Tensor:
    """``grouped_attention`` on CPU: each group's keys before its first row unmasked (the rows all see
    them), the keys from its first row to its last causally masked, in two calls of the CPU flash
    kernel merged by their log-sum-exp; [1, rows, heads * head_dim]. A masked call computes its
    whole rectangle and pays for the mask: on 2 CPU cores the split makes the recompute's attention
    about a quarter faster than one masked call per group (the selected rows sit late in the
    context, so most of a group's keys come before its first row).

    Shapes as ``grouped_attention``; the same result within float rounding.
    """
    heads, kv_heads, n, d = q.shape[1], keys.shape[1], q.shape[2], q.shape[3]
    g = heads // kv_heads
    out = []
    for a, b, first, m, mask in rs.split_groups_for(g):
        # grouped-query: heads h*g..h*g+g-1 share kv head h, so fold them into the rows (no copy of K/V)
        qg = q[0, :, a:b].reshape(1, kv_heads, g * (b - a), d)
        o, lse = _FLASH_CPU(qg, keys[:, :, first:m], values[:, :, first:m], 0.0, False, attn_mask=mask,
                            scale=scale)  # [1, kv_heads, g * rows, head_dim], [1, kv_heads, g * rows]
        if first > 0:  # every row sees its own position: the masked part is never empty, lse finite
            o_head, lse_head = _FLASH_CPU(qg, keys[:, :, :first], values[:, :, :first], 0.0, False, scale=scale)
            total = torch.logaddexp(lse, lse_head)
            o = (o.float() * (lse - total).exp()[..., None]
                 + o_head.float() * (lse_head - total).exp()[..., None]).to(q.dtype)
        out.append(o.reshape(heads, b - a, d).transpose(0, 1))  # [rows of the group, heads, head_dim]
    return torch.cat(out, dim=0).reshape(1, n, heads * d)


_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RUNNERS_LOCK = threading.Lock()


def layer_runner(model) -> LayerRunner:
    """The model's LayerRunner, built on first use and kept while the model lives (thread-safe).
    Reading the model never raises: what cannot be blended shows in ``require_blendable``."""
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get(model)
        if runner is None:
            runner = _RUNNERS[model] = LayerRunner(model)
        return runner


def groupable(layer) -> bool:
    """Whether ``layer`` alone (without its model) would take the grouped path: a known Llama-style
    layer with full causal attention (no sliding window) and the attributes ``_grouped_layer`` uses."""
    attn = getattr(layer, "self_attn", None)
    if type(layer).__name__ not in GROUPED_LAYERS or attn is None:
        return False
    # Qwen2/3 set it per layer; Mistral reads its config's
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(attn.config, "sliding_window", None)
    return (window is None and getattr(attn.config, "attn_logit_softcapping", None) is None
            and all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))
            and all(hasattr(layer, a) for a in ("input_layernorm", "post_attention_layernorm", "mlp")))
