"""Triton kernel of decode + re-rotate + scatter (imported only when the Triton backend runs).

One program handles ``BLOCK_T`` tokens of one (layer, head): it dequantizes their V row by row and
their K channel by channel (codes gathered from the [D, T] order they are stored in; int4 codes
are nibbles of the flat run), rounds to the kv dtype as the reference does, rotates K's pairs with
the cos/sin row of each token's delta, and stores both into the destination rows (``row0 + t`` or
``slots[t]``). Floating point contraction is off, so the arithmetic rounds like torch's.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kdn_hf.kernels.plan import EXACT, Plan


@triton.jit
def _code(q_ptr, idx, m, BITS: tl.constexpr):
    if BITS == 4:
        b = tl.load(q_ptr + (idx >> 1), mask=m, other=0).to(tl.int32)
        return (b >> ((idx & 1) * 4).to(tl.int32)) & 0xF
    else:
        return tl.load(q_ptr + idx, mask=m, other=0).to(tl.int32)


@triton.jit
def _k_values(kq, ks, kmn, lh, t, d, m, T, D, GK, NGK, BITS: tl.constexpr, OUT_TY: tl.constexpr):
    """K at tokens t [BT, 1] x channels d [1, BD] of (layer, head) lh, rounded to OUT_TY, as float32."""
    chan = lh * D + d
    code = _code(kq, chan * T + t, m, BITS)
    s_idx = chan * NGK + t // GK
    step = tl.load(ks + s_idx, mask=m, other=0.0).to(tl.float32)
    mn = tl.load(kmn + s_idx, mask=m, other=0.0).to(tl.float32)
    return (code.to(tl.float32) * step + mn).to(OUT_TY).to(tl.float32)


@triton.jit
def decode_kernel(
    kq, ks, kmn, vq, vs, vmn, kd_ptr, vd_ptr, cos_ptr, sin_ptr, crow_ptr, slot_ptr,
    l0, H, T, D, GK, NGK, GV, NGV, N_PAIRS, row0,
    sk_l, sk_h, sk_t, sv_l, sv_h, sv_t, sc_l, sc_r,
    BITS: tl.constexpr, ROTATE: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_CROW: tl.constexpr,
    HAS_SLOTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    li = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    lh = (l0 + li) * H + h  # (layer, head) of the entry
    t1 = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t1 < T
    t = t1.to(tl.int64)[:, None]
    if HAS_SLOTS:
        r = tl.load(slot_ptr + t1, mask=t_ok, other=0).to(tl.int64)[:, None]
    else:
        r = row0 + t
    kb = kd_ptr + li * sk_l + h * sk_h + r * sk_t
    vb = vd_ptr + li * sv_l + h * sv_h + r * sv_t
    out_ty = kd_ptr.dtype.element_ty

    # V: per token, groups of GV channels
    d = tl.arange(0, BLOCK_D)[None, :]
    md = t_ok[:, None] & (d < D)
    row = lh * T + t
    code = _code(vq, row * D + d, md, BITS)
    s_idx = row * NGV + d // GV
    step = tl.load(vs + s_idx, mask=md, other=0.0).to(tl.float32)
    mn = tl.load(vmn + s_idx, mask=md, other=0.0).to(tl.float32)
    tl.store(vb + d, (code.to(tl.float32) * step + mn).to(out_ty), mask=md)

    # K: per channel, groups of GK tokens
    if ROTATE:
        i = tl.arange(0, BLOCK_N)[None, :]
        mi = t_ok[:, None] & (i < N_PAIRS)
        if HAS_CROW:
            cr = tl.load(crow_ptr + t1, mask=t_ok, other=0).to(tl.int64)[:, None]
        else:
            cr = tl.zeros([BLOCK_T, 1], dtype=tl.int64)
        c_off = li * sc_l + cr * sc_r + i
        c = tl.load(cos_ptr + c_off, mask=mi, other=1.0)
        s = tl.load(sin_ptr + c_off, mask=mi, other=0.0)
        if INTERLEAVED:
            d1 = 2 * i
            d2 = 2 * i + 1
        else:
            d1 = i
            d2 = i + N_PAIRS
        x1 = _k_values(kq, ks, kmn, lh, t, d1, mi, T, D, GK, NGK, BITS, out_ty)
        x2 = _k_values(kq, ks, kmn, lh, t, d2, mi, T, D, GK, NGK, BITS, out_ty)
        tl.store(kb + d1, (x1 * c - x2 * s).to(out_ty), mask=mi)
        tl.store(kb + d2, (x2 * c + x1 * s).to(out_ty), mask=mi)
        mp = md & (d >= 2 * N_PAIRS)  # partial rotary: the rest passes through
        tl.store(kb + d, _k_values(kq, ks, kmn, lh, t, d, mp, T, D, GK, NGK, BITS, out_ty).to(out_ty), mask=mp)
    else:
        tl.store(kb + d, _k_values(kq, ks, kmn, lh, t, d, md, T, D, GK, NGK, BITS, out_ty).to(out_ty), mask=md)


def plan(src, k_dst, v_dst, start: int, stop: int, rows, cos, sin, crow, interleaved: bool) -> Plan:
    """src: QuantKV; k_dst/v_dst [stop - start, H, T_dst, D] (last dim contiguous); rows: int or [T]
    int64 slots; cos/sin [Lc, R, n] float32 or None (no rotation); crow [T] int32 or None."""
    _, _, H, T, D = src.shape
    block_t = 32
    rotate = cos is not None
    n = cos.shape[-1] if rotate else 0
    slots = not isinstance(rows, int)
    dummy = src.k_step
    args = dict(
        kq=src.k_codes, ks=src.k_step, kmn=src.k_min, vq=src.v_codes, vs=src.v_step, vmn=src.v_min,
        kd_ptr=k_dst, vd_ptr=v_dst, cos_ptr=cos if rotate else dummy, sin_ptr=sin if rotate else dummy,
        crow_ptr=crow if crow is not None else dummy, slot_ptr=rows if slots else dummy,
        l0=start, H=H, T=T, D=D, GK=src.group_k, NGK=src.k_step.shape[-1], GV=src.group_v,
        NGV=src.v_step.shape[-1], N_PAIRS=n, row0=0 if slots else rows,
        sk_l=k_dst.stride(0), sk_h=k_dst.stride(1), sk_t=k_dst.stride(2),
        sv_l=v_dst.stride(0), sv_h=v_dst.stride(1), sv_t=v_dst.stride(2),
        sc_l=(cos.shape[1] * n if cos.shape[0] > 1 else 0) if rotate else 0, sc_r=n if crow is not None else 0,
    )
    meta = dict(BITS=src.bits, ROTATE=rotate, INTERLEAVED=interleaved, HAS_CROW=crow is not None, HAS_SLOTS=slots,
                BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(D), BLOCK_N=triton.next_power_of_2(max(n, 1)))
    return Plan(decode_kernel, ((stop - start) * H, triton.cdiv(T, block_t)), args, meta, EXACT)


def launch(*a, **kw) -> None:
    plan(*a, **kw).launch()
