"""Which implementation runs (kdn_hf.kernels.dispatch), that every Triton kernel compiles for a CUDA
target (no GPU needed), and the interpreted kernel tests in a process of their own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdn_hf.errors import ConfigError, InputError
from kdn_hf.kernels import dispatch as kb

HERE = Path(__file__).resolve().parent
KERNEL_TESTS = ("test_kernels_rotary.py", "test_kernels_dequant.py", "test_kernels_attention.py")


def test_auto_runs_torch_on_cpu_and_float64():
    assert kb.resolve("auto", torch.device("cpu"), torch.float32) == "torch"
    assert kb.resolve("auto", torch.device("cuda"), torch.float64) == "torch"
    assert kb.backend("cpu") == "torch"
    assert kb.resolve("torch", torch.device("cuda")) == "torch"


def test_auto_runs_triton_on_cuda_where_it_imports(monkeypatch):
    monkeypatch.setattr(kb, "triton_available", lambda: True)
    assert kb.resolve("auto", torch.device("cuda"), torch.bfloat16) == "triton"
    monkeypatch.setattr(kb, "triton_available", lambda: False)
    assert kb.resolve("auto", torch.device("cuda"), torch.bfloat16) == "torch"
    with pytest.raises(ConfigError, match="pip install"):
        kb.resolve("triton", torch.device("cuda"))


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ConfigError, match="auto.*torch.*triton"):
        kb.resolve("cuda", torch.device("cpu"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InputError, match="TRITON_INTERPRET"):
        kb.resolve("triton", torch.device("cpu"), torch.float32)


def test_attention_backend_is_sdpa_without_flash_attn(monkeypatch):
    assert kb.attention_backend("cpu", torch.bfloat16) == "sdpa"
    monkeypatch.setattr(kb, "flash_attn_available", lambda: True)
    assert kb.attention_backend("cuda", torch.bfloat16) == "flash_attn"
    assert kb.attention_backend("cuda", torch.float32) == "sdpa"


def _env_without_interpreter() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_every_kernel_compiles_for_sm90(tmp_path):
    """The interpreter is lenient; the compiler is not. One configuration per kernel, down to a cubin."""
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "-m", "kdn_hf.kernels.compile_check", "--quick", "--arch", "90"],
                         cwd=tmp_path, env=_env_without_interpreter(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "FAIL" not in out.stdout and out.stdout.count("ok ") >= 3, out.stdout


def test_kernel_tests_pass_in_a_fresh_interpreted_process():
    """In a long session triton is imported (by torch._dynamo) before the kernel tests can turn its
    interpreter on, and they skip there; here they run in a process where it is on from the start."""
    pytest.importorskip("triton")
    import triton.language.standard as std

    if "triton" in sys.modules and type(std.zeros).__name__ == "InterpretedFunction":
        pytest.skip("the interpreter is on in this process: the kernel tests ran here")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS],
                         cwd=HERE, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " skipped" not in out.stdout.splitlines()[-1], out.stdout[-2000:]


def test_gpu_check_runs_from_a_checkout_without_install(tmp_path):
    """kernels/gpu_check.py is run on a GPU machine from the repository, nothing installed: it must
    find kdn_hf.kernels in the checkout. Here with the environment's own kdn-hf hidden and no CUDA
    device, it gets as far as saying so."""
    import shutil

    root = HERE.parents[1]
    checkout = tmp_path / "checkout"
    shutil.copytree(root, checkout, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".kdn_home", "bench_out"))
    hide_install = ("import runpy, sys; "
                    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
                    "sys.argv = ['kernels/gpu_check.py']; runpy.run_path('kernels/gpu_check.py', run_name='__main__')")
    env = {**_env_without_interpreter(), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", hide_install], cwd=checkout, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"kdn_hf.kernels from {checkout / 'kernels'}" in out.stdout, out.stdout
