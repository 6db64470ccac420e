"""SGLang adapter tests: real SGLang 0.5.23 classes on CPU, run with .venv-sglang (scripts/setup_sglang.sh).

The core suite (.venv, the project's own transformers) does not collect this directory: without an
importable sglang, ``collect_ignore_glob`` drops every file here. With it, the torchvision stand-in
(tests/sglang/stubs) goes first on sys.path before anything imports sglang.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

_spec = importlib.util.find_spec("sglang")
# tests/ is on sys.path while pytest collects, so this very folder is an importable namespace package
# named "sglang" (no origin) when the real one is not installed
if _spec is None or _spec.origin is None:
    collect_ignore_glob = ["*"]
else:
    if str(HERE / "stubs") not in sys.path:
        sys.path.insert(0, str(HERE / "stubs"))
    collect_ignore_glob = ["stubs/*"]


@pytest.fixture(autouse=True)
def _sglang_server_args():
    """SGLang's modules read a published ServerArgs (page size, backend name, ...): a dummy one per test."""
    from sglang.srt.runtime_context import get_context

    override = get_context().override_server_args()
    override.install()
    yield
    override.restore()
