"""Model fingerprint: the identity of everything that shapes a model's KV.

Two models share a fingerprint only if they have the same architecture,
weights (a digest of every parameter and buffer), dtype, layer/head geometry
and RoPE configuration. The fingerprint is part of every store key and is
checked again when an entry is read, so a KV computed by one model can never
be served to another.

Two ways to compute it, one definition, the same digest:

- ``model_fingerprint(model)``: from a loaded transformers causal LM (the HF engine).
- ``fingerprint_from_checkpoint(model_dir, dtype)``: from a checkpoint directory
  (``config.json`` + ``*.safetensors``) without loading it, for an engine that
  holds fused or sharded weights (an SGLang worker). It reads one tensor at a
  time, casts it to ``dtype`` as ``from_pretrained(dtype=...)`` would, and
  supplies what the checkpoint leaves out: a tied ``lm_head.weight`` is absent
  from the file but present in the model's state dict.

The weights digest (``WEIGHTS_SCHEME`` 1) is ``xxh3_128`` over the model's state
dict in sorted name order: for every name ``"{name}|{dtype}|{shape}\\n"``, then
the tensor's bytes, except for a name whose storage an earlier name already
hashed (tied weights: their data counts once, at the first name in sorted
order).

Checkpoint digests are cached (hashing reads every byte of the checkpoint) in
``KDN_HOME/fingerprints/<xxh3_64 of the resolved directory>.json``, one file per
model directory, an entry per dtype, valid while the sizes and mtimes of its
``*.safetensors`` files and ``config.json``, the transformers version and
``WEIGHTS_SCHEME`` are unchanged. The model directory itself is never written
(it may be read-only); a cache that cannot be written is only logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash

from kdn_hf.env import kdn_home
from kdn_hf.errors import ConfigError, ModelLoadError
from kdn_hf.models import causal_lm_class, meta_skeleton

log = logging.getLogger("kdn_hf.fingerprint")

WEIGHTS_SCHEME = 1
_weights_digests: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- the weights digest


class _WeightsHasher:
    """The weights digest, fed state-dict entries in sorted name order."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()

    def add(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], data: torch.Tensor | None) -> None:
        """``data``: the tensor (any device), or None for a name whose storage was hashed already."""
        self._h.update(f"{name}|{dtype}|{tuple(shape)}\n".encode())
        if data is not None and data.numel():
            flat = data.detach().to("cpu").contiguous().reshape(-1)
            self._h.update(flat.view(torch.uint8).numpy().tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """The weights digest of a loaded model (see the module docstring). Cached per model object
    (weights are assumed frozen once a model is handed to kdn_hf)."""
    cached = _weights_digests.get(model)
    if cached is not None:
        return cached
    hasher = _WeightsHasher()
    seen: set[int] = set()
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        ptr = t.data_ptr()
        hasher.add(name, t.dtype, tuple(t.shape), None if ptr in seen else t)
        seen.add(ptr)
    digest = hasher.hexdigest()
    _weights_digests[model] = digest
    return digest


# --------------------------------------------------------------------------- the fingerprint


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


def fingerprint_from_parts(config: Any, *, architecture: str, weights: str, dtype: torch.dtype,
                           extra: dict | None = None) -> ModelFingerprint:
    """The fingerprint of a model of class ``architecture`` (e.g. ``"LlamaForCausalLM"``) with
    ``config`` (a transformers config), weights digest ``weights`` and parameters of ``dtype``.
    Both ``model_fingerprint`` and ``fingerprint_from_checkpoint`` end here."""
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = getattr(text_cfg, "num_attention_heads", None)
    hidden = getattr(text_cfg, "hidden_size", None)
    head_dim = getattr(text_cfg, "head_dim", None) or (hidden // n_heads if hidden and n_heads else None)
    fields = {
        "architecture": architecture,
        "model_type": getattr(config, "model_type", None),
        "weights": weights,
        "dtype": str(dtype),
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


def model_fingerprint(model: torch.nn.Module, *, extra: dict | None = None) -> ModelFingerprint:
    """Fingerprint ``model`` (a transformers causal LM)."""
    return fingerprint_from_parts(
        model.config, architecture=type(model).__name__, weights=weights_digest(model),
        dtype=next(model.parameters()).dtype, extra=extra,
    )


# --------------------------------------------------------------------------- from a checkpoint


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    found = getattr(torch, name, None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ConfigError(f"dtype must be a floating torch.dtype or its name ('float16', 'bfloat16', "
                          f"'float32'), got {dtype!r}")
    return found


def _safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files ``from_pretrained`` reads: the shards of ``model.safetensors.index.json``, else
    ``model.safetensors``, else every ``*.safetensors`` (other copies, e.g. a ``consolidated`` file, are
    not read when a standard one is present)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted({model_dir / name for name in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"cannot read the shard index {index}: {e!r}") from e
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        raise ModelLoadError(
            f"{model_dir} holds no *.safetensors files"
            + (f" (found {other}; kdn_hf reads safetensors only, never pickles)" if other else "")
            + "; convert it with save_pretrained(..., safe_serialization=True), or fingerprint the "
            "loaded model with model_fingerprint(model)"
        )
    return files


def _checkpoint_weights_digest(model_dir: Path, config: Any, cls: type, dtype: torch.dtype) -> str:
    from safetensors import safe_open

    skeleton = meta_skeleton(config, dtype)
    plan = skeleton._get_dtype_plan(dtype) if hasattr(skeleton, "_get_dtype_plan") else {}
    if plan:
        raise ModelLoadError(
            f"{cls.__name__} keeps {sorted(plan)} in float32 when loaded in {dtype}; "
            "fingerprint_from_checkpoint does not reproduce that; use model_fingerprint(model) on the loaded model"
        )
    state = skeleton.state_dict(keep_vars=True)
    # Tied parameters are one object under several names; the tie source is what the checkpoint holds.
    groups: dict[int, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    sources = {v for v in (getattr(skeleton, "all_tied_weights_keys", None) or {}).values()}

    files = contextlib.ExitStack()
    where: dict[str, Any] = {}  # tensor name -> the open file holding it (memory-mapped; read one at a time)
    for path in _safetensors_files(model_dir):
        try:
            f = files.enter_context(safe_open(path, framework="pt"))
        except Exception as e:  # OSError, or safetensors' own error for a damaged header: re-raised as ours
            files.close()
            raise ModelLoadError(f"cannot read {path}: {e}") from e
        for key in f.keys():
            where.setdefault(key, f)
    # A checkpoint saved from the base model lacks its prefix ("model."); from_pretrained accepts it.
    prefix = getattr(cls, "base_model_prefix", "") or ""

    def stored_name(names: list[str]) -> str:
        for n in sorted(names, key=lambda n: (n not in sources, n)):
            for candidate in (n, n.removeprefix(f"{prefix}.") if prefix else n):
                if candidate in where:
                    return candidate
        raise ModelLoadError(
            f"{model_dir}: no tensor for {names} (transformers builds {cls.__name__} with it); the "
            "checkpoint's names differ from the model's (renamed or fused weights) or it is incomplete. "
            "Fingerprint the loaded model with model_fingerprint(model) instead"
        )

    hasher = _WeightsHasher()
    done: dict[int, tuple[torch.dtype, tuple[int, ...]]] = {}
    with files:
        for name in sorted(state):
            meta = state[name]
            gid = id(meta)
            if gid in done:
                hasher.add(name, *done[gid], None)
                continue
            key = stored_name(groups[gid])
            t = where[key].get_tensor(key)
            if t.is_floating_point() and meta.is_floating_point():
                t = t.to(meta.dtype)
            if tuple(t.shape) != tuple(meta.shape):
                raise ModelLoadError(f"{model_dir}: tensor {key} has shape {tuple(t.shape)}, {cls.__name__} "
                                     f"expects {tuple(meta.shape)}")
            done[gid] = (t.dtype, tuple(t.shape))
            hasher.add(name, t.dtype, tuple(t.shape), t)
            del t
    return hasher.hexdigest()


def _cache_stamp(model_dir: Path, dtype: torch.dtype) -> dict:
    import transformers

    files = [*_safetensors_files(model_dir), model_dir / "config.json"]
    return {
        "scheme": WEIGHTS_SCHEME,
        "transformers": transformers.__version__,
        "dtype": str(dtype),
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def fingerprint_cache_path(model_dir: str | os.PathLike) -> Path:
    """Where the weights digests of ``model_dir`` are cached: ``KDN_HOME/fingerprints/<id>.json``."""
    resolved = str(Path(model_dir).expanduser().resolve())
    return kdn_home() / "fingerprints" / f"{xxhash.xxh3_64(resolved.encode()).hexdigest()}.json"


def _cached_digest(path: Path, stamp: dict, compute: Callable[[], str]) -> str:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    entries = doc.get("entries") if isinstance(doc, dict) else None
    entries = entries if isinstance(entries, dict) else {}
    hit = entries.get(stamp["dtype"])
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("weights"), str):
        return hit["weights"]
    digest = compute()
    entries[stamp["dtype"]] = {"stamp": stamp, "weights": digest}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"entries": entries}, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not cache the weights digest in %s (%s); it is recomputed next time", path, e)
    return digest


def fingerprint_from_checkpoint(model_dir: str | os.PathLike, dtype: torch.dtype | str, *,
                                extra: dict | None = None, cache: bool = True) -> ModelFingerprint:
    """Fingerprint the model in ``model_dir`` as it would be after
    ``AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)``, without loading it.

    model_dir: a transformers checkpoint directory: ``config.json`` and one or more ``*.safetensors``.
    dtype:     the dtype the engine runs the model in (a torch.dtype or its name, e.g. ``"bfloat16"``).
    extra:     as in ``model_fingerprint``.
    cache:     reuse/keep the weights digest in ``KDN_HOME/fingerprints/`` (see the module docstring).
    Equal to ``model_fingerprint(model).digest`` for that loaded model. Raises ModelLoadError when
    the directory is not such a checkpoint or its tensor names do not match the model's.
    """
    from transformers import AutoConfig

    path = Path(model_dir).expanduser()
    dtype = _as_dtype(dtype)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a transformers checkpoint directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read the config in {path}: {e}") from e
    cls = causal_lm_class(config)

    def compute() -> str:
        return _checkpoint_weights_digest(path, config, cls, dtype)

    weights = _cached_digest(fingerprint_cache_path(path), _cache_stamp(path, dtype), compute) if cache else compute()
    return fingerprint_from_parts(config, architecture=cls.__name__, weights=weights, dtype=dtype, extra=extra)
