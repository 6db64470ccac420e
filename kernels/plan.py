"""A prepared kernel launch: the kernel, its grid, arguments and compile-time constants.

Each ``kernel.py`` builds one with ``plan(...)``; :meth:`Plan.launch` runs it, and
``kdn_hf.kernels.compile_check`` compiles the same plan for a CUDA target without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: launch options that make the arithmetic round like torch's (no fused multiply-add)
EXACT = {"enable_fp_fusion": False}


@dataclass(frozen=True)
class Plan:
    """kernel: a ``triton.jit`` function; grid: program counts; args: its runtime arguments by name;
    meta: its ``tl.constexpr`` arguments by name; options: compile options (``enable_fp_fusion``)."""

    kernel: Any
    grid: tuple[int, ...]
    args: dict[str, Any]
    meta: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)

    def launch(self) -> None:
        if all(self.grid):
            self.kernel[self.grid](**self.args, **self.meta, **self.options)
