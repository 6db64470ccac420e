"""Reading a model's RoPE into a :class:`~kdn_hf.rope.RopeSpec`, generically.

Frequencies come from the model's own rotary module (its ``original_inv_freq``
or ``inv_freq`` buffers; GPT-J's are recovered from its sin/cos table), the
pair layout from the module's cos/sin output, and the config supplies only
geometry, layer types and the rope type. Rope types whose frequencies depend
on the sequence length are refused with :class:`UnsupportedRopeError`.
"""

from __future__ import annotations

import inspect
import math
import sys

import torch

from kdn_hf.errors import UnsupportedRopeError
from kdn_hf.rope import BOUNDED_ROPE_TYPES, RopeFrequencies, RopeSpec, STATIC_ROPE_TYPES, _REFUSE_HINT


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _find_rotary_module(model) -> torch.nn.Module:
    found = [
        (name, m) for name, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")
    ]
    text = [(n, m) for n, m in found if not any(s in n.lower() for s in ("vision", "visual", "audio", "image"))]
    if not text:
        raise UnsupportedRopeError(
            f"{type(model).__name__} has no rotary embedding module (no submodule whose class name ends "
            "with 'RotaryEmbedding'), so its positions are not RoPE (learned absolute positions, ALiBi, ...) "
            "and cached K/V cannot be moved to new positions; use mode='full' for this model"
        )
    classes = {type(m) for _, m in text}
    if len(classes) > 1:
        raise UnsupportedRopeError(
            f"{type(model).__name__} has several kinds of rotary modules ({sorted(c.__name__ for c in classes)}"
            f" at {[n for n, _ in text]}); kdn_hf cannot tell which one the text layers use; use mode='full'"
        )
    return text[0][1]


def _rope_params(tc, name: str) -> dict:
    params = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
    if name and isinstance(params.get(name), dict):
        params = params[name]
    return params if isinstance(params, dict) else {}


def _buffer(module, prefix: str) -> torch.Tensor | None:
    # original_inv_freq first: longrope/dynamic overwrite inv_freq in place after long forwards.
    for attr in (f"{prefix}original_inv_freq", f"{prefix}inv_freq"):
        t = getattr(module, attr, None)
        if isinstance(t, torch.Tensor):
            return t
    return None


def _probe(module, positions: list[int], layer_type: str | None):
    """(cos, sin) [len(positions), W] float64 of the module's output at ``positions``."""
    ref = next(iter(module.buffers()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    x = torch.zeros(1, dtype=torch.float32, device=device)
    pos = torch.tensor([positions], device=device)
    kwargs = {}
    if "layer_type" in inspect.signature(module.forward).parameters and layer_type is not None:
        kwargs["layer_type"] = layer_type
    with torch.no_grad():
        out = module(x, pos, **kwargs)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(
        isinstance(t, torch.Tensor) and not t.is_complex() for t in out
    )):
        raise UnsupportedRopeError(
            f"{type(module).__name__} does not return a (cos, sin) pair of real tensors; kdn_hf cannot read "
            "its frequencies; use mode='full' for this model"
        )
    a, b = (t.detach().to("cpu", torch.float64).reshape(-1, t.shape[-1])[-len(positions):] for t in out)
    # Row 0 is position 0, where sin is 0 and cos is the attention scaling: that tells the order.
    return (b, a) if a[0].abs().max() < 1e-6 < b[0].abs().max() else (a, b)


def _recover_inv_freq(cos: torch.Tensor, sin: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """w from per-frequency cos/sin at positions [0, 1, ..., P]: estimate at 1, refine at P."""
    w1 = torch.atan2(sin[1], cos[1])
    p = positions[-1]
    theta = torch.atan2(sin[-1], cos[-1])
    turns = torch.round((p * w1 - theta) / (2 * math.pi))
    return (theta + 2 * math.pi * turns) / p


def _layout(module, cos: torch.Tensor, sin: torch.Tensor, n: int | None) -> tuple[str, torch.Tensor, torch.Tensor]:
    """Layout and per-frequency cos/sin [P, n] from the module's output [P, W].

    n is the number of frequencies when known (from a buffer), else None. Distinct
    frequencies never repeat, so a repeated pattern in the output means a full-width one.
    """
    width = cos.shape[-1]

    def same(x, y):
        return torch.allclose(x, y, rtol=0, atol=1e-6)

    if width % 2 == 0 and n in (None, width // 2):
        h = width // 2
        if same(cos[:, :h], cos[:, h:]) and same(sin[:, :h], sin[:, h:]):
            return "half", cos[:, :h], sin[:, :h]
        if same(cos[:, 0::2], cos[:, 1::2]) and same(sin[:, 0::2], sin[:, 1::2]):
            return "interleaved", cos[:, 0::2], sin[:, 0::2]
    if n in (None, width):
        # One value per frequency: the attention code expands it. The GPT-J/CodeGen convention
        # (rotate_every_two) pairs neighbours; the other one (GPT-OSS, torch.chunk) pairs halves.
        modeling = sys.modules.get(type(module).__module__)
        layout = "interleaved" if hasattr(modeling, "rotate_every_two") else "half"
        return layout, cos, sin
    raise UnsupportedRopeError(
        f"{type(module).__name__} returns cos/sin of width {width} for {n} frequencies in neither the "
        "rotate_half nor the interleaved pattern; kdn_hf cannot re-rotate this model; use mode='full'"
    )


def _refuse(rope_type: str, where: str) -> None:
    if "dynamic" in rope_type:
        raise UnsupportedRopeError(
            f"{where} uses rope_type={rope_type!r} (dynamic NTK): its frequencies are recomputed from the "
            "sequence length (and kept as module state), so K stored from a chunk need not carry the "
            "frequencies the composed prompt will use, and no rotation by a position delta makes it "
            f"exact; {_REFUSE_HINT}"
        )
    if rope_type not in STATIC_ROPE_TYPES | BOUNDED_ROPE_TYPES:
        raise UnsupportedRopeError(
            f"{where} uses rope_type={rope_type!r}, which kdn_hf does not know to have frequencies "
            f"independent of the sequence length; {_REFUSE_HINT}"
        )


def rope_spec_from_model(model) -> RopeSpec:
    """Read a transformers causal LM's RoPE into a RopeSpec.

    Frequencies come from the model's rotary module (``inv_freq`` buffers, per layer type
    for Gemma3-style modules, or recovered from its cos/sin output when it has none, as
    GPT-J's sinusoid table); the layout from the pattern of its cos output; the rope type,
    layer types, ``no_rope_layers`` and head_dim from the config. Raises
    UnsupportedRopeError for models without RoPE, dynamic NTK, multimodal (mrope)
    positions, unknown rope types or unreadable rotary modules.
    """
    where = type(model).__name__
    check_rope_config(model.config, where)
    return spec_from_rotary_module(_find_rotary_module(model), model.config, where)


def rope_spec_from_config(config) -> RopeSpec:
    """The RopeSpec ``rope_spec_from_model`` reads from the causal LM built from ``config``
    (a transformers config), without building that model's weights.

    The model's module tree is built on the meta device (no memory) to find the class of its
    rotary module; that one module is then built for real from the config (transformers'
    ``ROPE_INIT_FUNCTIONS`` run inside it) and read exactly as ``rope_spec_from_model``
    reads the model's own. Raises UnsupportedRopeError as ``rope_spec_from_model`` does.
    """
    from kdn_hf.models import meta_skeleton

    skeleton = meta_skeleton(config)
    where = type(skeleton).__name__
    check_rope_config(config, where)
    rotary_cls = type(_find_rotary_module(skeleton))
    tc = _text_config(config)
    try:
        module = rotary_cls(config=tc)
    except TypeError as e:
        raise UnsupportedRopeError(
            f"{where}: its rotary module {rotary_cls.__name__} cannot be built from the config alone ({e}); "
            "read the spec from the loaded model with rope_spec_from_model(model)"
        ) from e
    return spec_from_rotary_module(module.eval(), config, where)


def check_rope_config(config, where: str) -> None:
    """Raise UnsupportedRopeError for what the config alone shows cannot be re-rotated."""
    tc = _text_config(config)
    top = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
    nested = [v for v in top.values() if isinstance(v, dict)] if isinstance(top, dict) else []
    for params in [top, *nested] if isinstance(top, dict) else []:
        if "mrope_section" in params:
            raise UnsupportedRopeError(
                f"{where} uses multimodal RoPE (mrope_section): its positions are 3-D and kdn_hf re-rotates "
                "1-D text positions only; use mode='full' for this model"
            )
        if "rope_type" in params:
            _refuse(str(params["rope_type"]), where)


def spec_from_rotary_module(module: torch.nn.Module, config, where: str) -> RopeSpec:
    """The RopeSpec of a model with ``config`` whose text layers use rotary ``module``.

    Shared by ``rope_spec_from_model`` (the model's own module) and ``rope_spec_from_config``
    (a module of the same class built from the config), so both read a model the same way.
    """
    tc = _text_config(config)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    num_layers = tc.num_hidden_layers
    module_types = getattr(module, "rope_type", None)
    names = sorted(module_types) if isinstance(module_types, dict) else [""]

    max_pos_emb = getattr(tc, "max_position_embeddings", None) or 4096
    freqs: list[RopeFrequencies] = []
    layouts: set[str] = set()
    max_position: int | None = None
    for name in names:
        params = _rope_params(tc, name)
        rope_type = str(module_types[name] if name else (module_types or params.get("rope_type", "default")))
        _refuse(rope_type, f"{where} ({name})" if name else where)
        limit = max_pos_emb
        if rope_type == "longrope" and params.get("long_factor") != params.get("short_factor"):
            bound = params.get("original_max_position_embeddings") or getattr(
                tc, "original_max_position_embeddings", None
            )
            if bound is None:
                raise UnsupportedRopeError(f"{where} uses longrope without original_max_position_embeddings")
            max_position = int(bound) if max_position is None else min(max_position, int(bound))
            limit = min(limit, int(bound))

        buf = _buffer(module, f"{name}_" if name else "")
        # Probe positions 0..3 for the pattern, and a far one to pin frequencies down precisely.
        positions = [0, 1, 2, 3, max(4, min(2047, limit - 1))]
        cos, sin = _probe(module, positions, name or None)
        layout, cos_f, sin_f = _layout(module, cos, sin, buf.numel() if buf is not None else None)
        scale = float(cos_f[0, 0])  # cos(0) times the attention scaling
        if not scale > 0:
            raise UnsupportedRopeError(f"{type(module).__name__} returns cos(0) = {scale}; it is not RoPE")
        if buf is not None:
            w = buf.detach().to("cpu", torch.float64)
        else:
            w = _recover_inv_freq(cos_f / scale, sin_f / scale, positions)
        ang = torch.tensor(positions, dtype=torch.float64)[:, None] * w
        # Loose: the module's own angles are float32 (bf16 tables in a bf16 model); this checks
        # the form (a rotation by p * w), not the last digits.
        close = torch.allclose(cos_f, scale * ang.cos(), atol=1e-2) and torch.allclose(
            sin_f, scale * ang.sin(), atol=1e-2
        )
        if not close:
            raise UnsupportedRopeError(
                f"{type(module).__name__} ({name or 'single set'}) output is not cos/sin of position * inv_freq; "
                "kdn_hf cannot re-rotate this model; use mode='full'"
            )
        expected = _config_rotary_dim(tc, params, head_dim, rope_type)
        if expected is not None and expected != 2 * w.numel():
            raise UnsupportedRopeError(
                f"{where}: the rotary module has {w.numel()} frequencies (rotary_dim {2 * w.numel()}) but the "
                f"config implies rotary_dim {expected}; kdn_hf cannot tell which dims rotate; use mode='full'"
            )
        layouts.add(layout)
        freqs.append(RopeFrequencies(w, rope_type, scale, name))

    if len(layouts) != 1 or len({f.inv_freq.numel() for f in freqs}) != 1:
        raise UnsupportedRopeError(f"{where}: layer types disagree on the RoPE layout or rotary_dim")
    rotary_dim = 2 * freqs[0].inv_freq.numel()

    if names == [""]:
        index = [0] * num_layers
    else:
        layer_types = getattr(tc, "layer_types", None)
        if layer_types is None or len(layer_types) != num_layers:
            raise UnsupportedRopeError(f"{where}: rotary module has per-layer-type frequencies but no layer_types")
        index = [names.index(t) if t in names else -1 for t in layer_types]
    no_rope = getattr(tc, "no_rope_layers", None)  # SmolLM3/Llama4: truthy = the layer uses RoPE
    if isinstance(no_rope, (list, tuple)) and len(no_rope) == num_layers:
        index = [i if use else -1 for i, use in zip(index, no_rope)]
    return RopeSpec(tuple(freqs), tuple(index), rotary_dim, head_dim, layouts.pop(), max_position)


def _config_rotary_dim(tc, params: dict, head_dim: int, rope_type: str) -> int | None:
    """rotary_dim as the config states it (partial_rotary_factor or rotary_dim), None if silent."""
    if rope_type == "proportional":  # pads inv_freq with zeros up to head_dim
        return None
    rd = getattr(tc, "rotary_dim", None)
    if isinstance(rd, int):
        return rd
    prf = params.get("partial_rotary_factor", getattr(tc, "partial_rotary_factor", None))
    if isinstance(prf, (int, float)):
        dim = int(head_dim * prf)
        return dim + dim % 2  # arange(0, dim, 2) gives ceil(dim / 2) frequencies
    return None
