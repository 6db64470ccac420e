"""Helpers for testing the kernels on CPU: Triton's interpreter, and a comparison that reports errors.

Triton runs kernels on CPU tensors in its interpreter when ``TRITON_INTERPRET=1`` is set *before
triton is imported*: its own library functions (``tl.max``, ``tl.zeros``) are decorated at that
import, and ours when their modules are imported. :func:`use_interpreter` sets it if it still can.
In a long test session something else may import triton first (``torch._dynamo`` does, via
transformers' model classes); the kernel tests then skip in that process and
``tests/unit/test_kernels_backend.py`` runs them again in a fresh one.

Two interpreter artefacts to know: float32 -> bfloat16 casts truncate instead of rounding to
nearest (results may differ from torch by one bfloat16 ulp), and it is slow (keep shapes small).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch


def use_interpreter() -> str | None:
    """Have ``backend="triton"`` run in Triton's CPU interpreter in this process, if it still can.

    Sets ``TRITON_INTERPRET=1`` (for the rest of the process: it must hold when the kernel modules
    are imported) unless triton is already imported. Returns None when the kernels will run
    interpreted, else why they cannot (a reason to skip with).
    """
    if importlib.util.find_spec("triton") is None:
        return ("triton is not installed: the Triton kernels are not tested "
                "(scripts/setup.sh dev installs triton==3.9.0 next to CPU torch)")
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        return None
    import triton.language.standard as std

    if type(std.zeros).__name__ == "InterpretedFunction" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return ("triton was imported in this process before TRITON_INTERPRET=1 could be set (torch._dynamo imports "
            "it); test_kernels_backend.py::test_kernel_tests_pass_in_a_fresh_interpreted_process runs these")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, ulps: float = 0.0, atol: float = 0.0,
                 what: str = "") -> None:
    """Assert ``actual`` equals ``expected`` to within ``ulps`` units in the last place of their dtype
    (relative to each element's magnitude) plus ``atol`` (both 0: bit-identical), reporting max and
    mean error."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, \
        f"{what}: {tuple(actual.shape)} {actual.dtype} vs {tuple(expected.shape)} {expected.dtype}"
    if ulps == 0 and atol == 0 and torch.equal(actual, expected):
        return
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    tol = ulps * torch.finfo(actual.dtype).eps * e.abs() + atol
    bad = err > tol
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {err.numel()} elements off by more than {ulps} ulp + {atol}; "
        f"max abs error {err.max().item():.3g}, mean {err.mean().item():.3g}, "
        f"max relative {(err / e.abs().clamp_min(1e-30)).max().item():.3g}")
