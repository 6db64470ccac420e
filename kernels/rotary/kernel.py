"""Triton kernel of K re-rotation (imported only when the Triton backend runs).

One program rotates ``BLOCK_T`` tokens of one (layer, head): it loads the two dims of every pair
(rotate-half: i and i + n; interleaved: 2i and 2i + 1), the cos/sin row of each token from a small
table (one row per distinct delta, per layer where the bases differ), and writes both dims back;
the dims past ``rotary_dim`` are copied when the output is not K itself. cos/sin come from the
host, made in float64 like the reference, so the kernel does only the multiply-adds; with floating
point contraction off (``enable_fp_fusion=False``) they round like torch's.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kdn_hf.kernels.plan import EXACT, Plan


@triton.jit
def rerotate_kernel(
    k_ptr, o_ptr, cos_ptr, sin_ptr, row_ptr,
    H, T, N_PAIRS, N_PASS,
    sk_l, sk_h, sk_t, so_l, so_h, so_t, sc_l, sc_r,
    INTERLEAVED: tl.constexpr, HAS_ROW: tl.constexpr, COPY_PASS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    l = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_N)
    t_ok = t < T
    m = t_ok[:, None] & (i < N_PAIRS)[None, :]
    if HAS_ROW:
        r = tl.load(row_ptr + t, mask=t_ok, other=0).to(tl.int64)
    else:
        r = tl.zeros([BLOCK_T], dtype=tl.int64)
    c_off = l * sc_l + r[:, None] * sc_r + i[None, :]
    c = tl.load(cos_ptr + c_off, mask=m, other=1.0)
    s = tl.load(sin_ptr + c_off, mask=m, other=0.0)
    if INTERLEAVED:
        d1 = 2 * i
        d2 = 2 * i + 1
    else:
        d1 = i
        d2 = i + N_PAIRS
    t64 = t.to(tl.int64)[:, None]
    kb = k_ptr + l * sk_l + h * sk_h + t64 * sk_t
    ob = o_ptr + l * so_l + h * so_h + t64 * so_t
    x1 = tl.load(kb + d1[None, :], mask=m, other=0.0).to(c.dtype)
    x2 = tl.load(kb + d2[None, :], mask=m, other=0.0).to(c.dtype)
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    tl.store(ob + d1[None, :], o1.to(o_ptr.dtype.element_ty), mask=m)
    tl.store(ob + d2[None, :], o2.to(o_ptr.dtype.element_ty), mask=m)
    if COPY_PASS:
        p = 2 * N_PAIRS + tl.arange(0, BLOCK_P)
        mp = t_ok[:, None] & (p < 2 * N_PAIRS + N_PASS)[None, :]
        tl.store(ob + p[None, :], tl.load(kb + p[None, :], mask=mp, other=0.0), mask=mp)


def plan(k, out, cos, sin, rows, interleaved: bool) -> Plan:
    """k, out: [L, H, T, D] (last dim contiguous); cos/sin: [Lc, R, n] contiguous float32 (Lc 1 or L);
    rows: [T] int32 index into R, or None (R == 1)."""
    L, H, T, D = k.shape
    Lc, R, n = cos.shape
    block_t = 32
    n_pass = D - 2 * n
    args = dict(
        k_ptr=k, o_ptr=out, cos_ptr=cos, sin_ptr=sin, row_ptr=rows if rows is not None else cos,
        H=H, T=T, N_PAIRS=n, N_PASS=n_pass,
        sk_l=k.stride(0), sk_h=k.stride(1), sk_t=k.stride(2), so_l=out.stride(0), so_h=out.stride(1),
        so_t=out.stride(2), sc_l=R * n if Lc > 1 else 0, sc_r=n if rows is not None else 0,
    )
    meta = dict(INTERLEAVED=interleaved, HAS_ROW=rows is not None,
                COPY_PASS=n_pass > 0 and out.data_ptr() != k.data_ptr(),
                BLOCK_T=block_t, BLOCK_N=triton.next_power_of_2(n), BLOCK_P=triton.next_power_of_2(max(n_pass, 1)))
    return Plan(rerotate_kernel, (L * H, triton.cdiv(T, block_t)), args, meta, EXACT)


def launch(*a, **kw) -> None:
    plan(*a, **kw).launch()
