"""Compile every Triton kernel for a CUDA target, on any machine (no GPU needed).

Triton's interpreter (what the CPU tests run) is more lenient than its compiler: it accepts type
mixes and constructs the compiler rejects, and it does not lower to PTX. This builds the same
launch plans the wrappers make, for small CPU tensors covering every compile-time branch (dtypes,
int8 / int4, rotation or not, slots, layouts, sliding window), and compiles each one down to a
cubin for ``--arch`` (Triton ships ptxas). A kernel that would fail to compile on a GPU fails here.

    python -m kdn_hf.kernels.compile_check [--arch 90] [--quick]

Run it without ``TRITON_INTERPRET`` (under it the kernels are interpreted functions, not compiled).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
          torch.int32: "i32", torch.int64: "i64"}


def _sig(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def compile_plan(plan, arch: int):
    """Compile ``plan`` (a :class:`kdn_hf.kernels.plan.Plan`) for sm_<arch>; returns Triton's compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = plan.kernel
    if not hasattr(fn, "arg_names") or type(fn).__name__ != "JITFunction":
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET=1): run the compile check without it")
    names = fn.arg_names
    signature = {n: ("constexpr" if n in plan.meta else _sig(plan.args[n])) for n in names}
    constexprs = {(names.index(n),): v for n, v in plan.meta.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(plan.options))


def plans(quick: bool = False):
    """(name, plan) for every compile-time branch worth checking (``quick``: one per kernel)."""
    from kdn_hf.codec import get_codec
    from kdn_hf.kernels.attention import kernel as attention
    from kdn_hf.kernels.dequant import QuantKV
    from kdn_hf.kernels.dequant import kernel as dequant
    from kdn_hf.kernels.rotary import kernel as rotary
    from kdn_hf.kernels.rotary import rope_table

    w = 1.0 / (10000 ** (torch.arange(4, dtype=torch.float64) / 4))
    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32):
        for interleaved, rows, D in ((False, None, 8), (True, True, 11)):
            k = torch.randn(2, 3, 5, D, dtype=dtype)
            cos, sin, r = rope_table(torch.arange(5) if rows else 3, w, k.device)
            yield f"rerotate {dtype} {'interleaved' if interleaved else 'half'} D={D}", \
                rotary.plan(k, torch.empty_like(k), cos, sin, r, interleaved)
    codecs = ("int4",) if quick else ("int8", "int4")
    for codec in codecs:
        for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32):
            kv = torch.randn(2, 2, 2, 6, 8).to(dtype)
            src = QuantKV.from_tensors(get_codec(codec).encode(kv), codec, dtype, kv.shape)
            dst = torch.empty(2, 2, 9, 8, dtype=dtype)
            for rotate, slots in ((True, False), (False, True)) if not quick else ((True, True),):
                cos = sin = crow = None
                if rotate:
                    cos, sin, crow = rope_table(torch.arange(6), w, kv.device)
                rows = torch.arange(6) if slots else 1
                yield f"decode_rerotate_scatter {codec} {dtype} rotate={rotate} slots={slots}", \
                    dequant.plan(src, dst, dst.clone(), 0, 2, rows, cos, sin, crow, False)
    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32):
        for window in (None, 4) if not quick else (4,):
            q, k = torch.randn(1, 4, 3, 64, dtype=dtype), torch.randn(1, 2, 9, 64, dtype=dtype)
            yield f"selected_attention {dtype} window={window}", \
                attention.plan(q, k, k.clone(), torch.empty_like(q), torch.tensor([1, 4, 8]), 0.125, window)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90 (default 90)")
    ap.add_argument("--quick", action="store_true", help="one configuration per kernel")
    a = ap.parse_args(argv)
    failed = 0
    for name, plan in plans(a.quick):
        t = time.perf_counter()
        try:
            compiled = compile_plan(plan, a.arch)
            print(f"ok    {name}: sm_{a.arch} cubin {len(compiled.asm['cubin'])} bytes "
                  f"({time.perf_counter() - t:.1f} s)")
        except Exception as e:  # report every kernel, then fail
            failed += 1
            print(f"FAIL  {name}: {type(e).__name__}: {str(e)[:2000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
