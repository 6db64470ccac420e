"""Packaging: kernels/ and integrations/ install as kdn_hf.kernels and kdn_hf.integrations, and the
distribution adds no top-level import name but ``kdn_hf`` (``kernels`` is HuggingFace's kernel-hub
package, which transformers probes; ``integrations`` is just too generic).

Checked for both installs people make: a wheel (built from a copy of the source tree, installed
with ``pip install --target``) and the editable install of the test environment.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAPPED = {"kernels": "kdn_hf/kernels", "integrations": "kdn_hf/integrations"}

# Run in a fresh interpreter from a directory outside the repository (the repository root on
# sys.path would make its top-level folders importable whatever the install does).
_PROBE = """
import importlib.util, json, sys
import kdn_hf.kernels, kdn_hf.integrations
top = {}
for name in ("kernels", "integrations"):
    spec = importlib.util.find_spec(name)
    top[name] = None if spec is None else (spec.origin or str(list(spec.submodule_search_locations or [])))
print(json.dumps({"kernels": kdn_hf.kernels.__file__, "integrations": kdn_hf.integrations.__file__, "top": top}))
"""


def _packages_in_tree() -> set[str]:
    """Every package folder of the source tree, as the path it installs under ("kdn_hf/kernels")."""
    names = set()
    for folder, prefix in (("kdn_hf", "kdn_hf"), *MAPPED.items()):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).as_posix()
            names.add(prefix if rel == "." else f"{prefix}/{rel}")
    return names


def _probe(env: dict[str, str], cwd: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _not_ours(origin: str | None, *roots: Path) -> bool:
    return origin is None or not any(str(r) in origin for r in roots)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built (no deps, no build isolation: offline) from a copy of the source tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".kdn_home", "bench_out"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "--disable-pip-version-check", "-w", str(tmp / "dist"), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("kdn_hf-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_has_only_kdn_hf_at_top(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"kdn_hf"}, sorted(top)
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    missing = _packages_in_tree() - packages
    assert not missing, f"packages of the source tree missing from the wheel: {sorted(missing)}"
    assert "kdn_hf/kernels/__init__.py" in names and "kdn_hf/integrations/__init__.py" in names
    assert {"kdn_hf/data/dev_qa.json", "kdn_hf/data/test_qa.json"} <= set(names)  # both QA splits ship
    top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    for n in top_level:
        assert zipfile.ZipFile(wheel).read(n).decode().split() == ["kdn_hf"]


@pytest.mark.slow
def test_wheel_install_imports_kdn_hf_kernels(wheel, tmp_path):
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                          "--no-index", "--target", str(site), str(wheel)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (site / "kernels").exists() and not (site / "integrations").exists()
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the environment's own (editable) kdn_hf
    found = _probe(env, tmp_path)
    assert found["kernels"] == str(site / "kdn_hf" / "kernels" / "__init__.py")
    assert found["integrations"] == str(site / "kdn_hf" / "integrations" / "__init__.py")
    assert all(_not_ours(o, site, ROOT) for o in found["top"].values()), found["top"]


def test_installed_kdn_hf_exposes_only_kdn_hf(tmp_path):
    """The environment's own install (editable in the dev setup): kdn_hf.kernels and
    kdn_hf.integrations resolve to the repository's folders; no top-level kernels/integrations."""
    try:
        dist = importlib.metadata.distribution("kdn-hf")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kdn-hf is not installed in this environment (tests run from a source path)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = _probe(env, tmp_path)
    assert Path(found["kernels"]).parent.name == "kernels"
    assert Path(found["integrations"]).parent.name == "integrations"
    assert all(_not_ours(o, ROOT) for o in found["top"].values()), found["top"]
    assert (dist.read_text("top_level.txt") or "").split() == ["kdn_hf"]
