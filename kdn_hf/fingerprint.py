"""Model fingerprint: the identity of everything that shapes a model's KV.

Two models share a fingerprint only if they have the same architecture,
weights (a digest of every parameter and buffer), dtype, layer/head geometry
and RoPE configuration. The fingerprint is part of every store key and is
checked again when an entry is read, so a KV computed by one model can never
be served to another.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

_weights_digests: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def weights_digest(model: torch.nn.Module) -> str:
    """xxh3_128 over the names, dtypes, shapes and bytes of every tensor in the
    state dict. Cached per model object (weights are assumed frozen once a
    model is handed to kdn_hf)."""
    cached = _weights_digests.get(model)
    if cached is not None:
        return cached
    h = xxhash.xxh3_128()
    seen: set[int] = set()
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        ptr = t.data_ptr()
        if ptr in seen:  # tied weights: hash the storage once
            continue
        seen.add(ptr)
        data = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    digest = h.hexdigest()
    _weights_digests[model] = digest
    return digest


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


@dataclass(frozen=True)
class ModelFingerprint:
    """``digest``: 32 hex chars, what keys and entries carry. ``fields``: the
    description it hashes, for humans (``kdn store stats``) and errors."""

    digest: str
    fields: dict = field(compare=False, hash=False)

    def __str__(self) -> str:
        return self.digest


def rope_config(config: Any) -> dict:
    """Every config field that changes rotary embeddings, in any transformers version."""
    out = {}
    for name in (
        "rope_parameters",
        "rope_scaling",
        "rope_theta",
        "rope_local_base_freq",
        "partial_rotary_factor",
        "rotary_dim",
        "rotary_pct",
        "rotary_emb_base",
        "layer_types",
        "sliding_window",
        "max_position_embeddings",
    ):
        if hasattr(config, name):
            out[name] = getattr(config, name)
    return _jsonable(out)


def model_fingerprint(model: torch.nn.Module, *, extra: dict | None = None) -> ModelFingerprint:
    """Fingerprint ``model`` (a transformers causal LM)."""
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_heads = getattr(text_cfg, "num_attention_heads", None)
    hidden = getattr(text_cfg, "hidden_size", None)
    head_dim = getattr(text_cfg, "head_dim", None) or (hidden // n_heads if hidden and n_heads else None)
    fields = {
        "architecture": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "weights": weights_digest(model),
        "dtype": str(next(model.parameters()).dtype),
        "num_layers": getattr(text_cfg, "num_hidden_layers", None),
        "num_attention_heads": n_heads,
        "num_kv_heads": getattr(text_cfg, "num_key_value_heads", None) or n_heads,
        "head_dim": head_dim,
        "hidden_size": hidden,
        "rope": rope_config(text_cfg),
        "extra": _jsonable(extra or {}),
    }
    fields = _jsonable(fields)
    digest = xxhash.xxh3_128(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return ModelFingerprint(digest=digest, fields=fields)
