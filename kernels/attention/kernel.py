"""Triton kernel of selected-row attention (imported only when the Triton backend runs).

A flash-attention forward over rows at arbitrary positions: one program takes ``BLOCK_M`` rows of
one kv head, the query heads that share it folded into the rows (row r is query ``r // G`` of head
``hk * G + r % G``), so K/V blocks are read once per kv head and the rows of a block share their
positions. It walks only the key blocks its rows can see ([min position - window + 1, max position])
with an online softmax; masked keys get zero weight.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kdn_hf.kernels.plan import Plan


@triton.jit
def selected_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr,
    Hkv, G, NQ, TK, D, window, qk_scale,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_n,
    HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // Hkv).to(tl.int64)
    hk = (pid % Hkv).to(tl.int64)
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < NQ * G
    qi = (r // G).to(tl.int64)
    hq = hk * G + (r % G)
    pos = tl.load(pos_ptr + qi, mask=r_ok, other=0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + b * sq_b + hq[:, None] * sq_h + qi[:, None] * sq_n + d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    hi = tl.max(pos, axis=0) + 1
    if HAS_WINDOW:
        lo = tl.maximum(tl.min(tl.where(r_ok, pos, hi), axis=0) - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    else:
        lo = 0
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kb = k_ptr + b * sk_b + hk * sk_h
    vb = v_ptr + b * sv_b + hk * sv_h
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < TK
        kt = tl.load(kb + j[None, :].to(tl.int64) * sk_t + d[:, None], mask=d_ok[:, None] & j_ok[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale  # log2 units
        seen = (j[None, :] <= pos[:, None]) & j_ok[None, :]
        if HAS_WINDOW:
            seen = seen & (j[None, :] > pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(vb + j[:, None].to(tl.int64) * sv_t + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new
    out = acc / tl.where(r_ok, l_i, 1.0)[:, None]  # rows past the end have no keys
    tl.store(o_ptr + b * so_b + hq[:, None] * so_h + qi[:, None] * so_n + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])


def plan(q, k, v, out, q_pos, scale: float, window: int | None) -> Plan:
    """q/out [B, Hq, rows, D], k/v [B, Hkv, keys, D] (last dims contiguous), q_pos [rows] int64."""
    B, Hq, NQ, D = q.shape
    Hkv, TK = k.shape[1], k.shape[2]
    G = Hq // Hkv
    # float32 dots run as IEEE fp32 (not tf32): smaller tiles keep them in registers
    block_m, block_n = (32, 32) if q.dtype == torch.float32 else (64, 64)
    args = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, o_ptr=out, pos_ptr=q_pos,
        Hkv=Hkv, G=G, NQ=NQ, TK=TK, D=D, window=0 if window is None else window,
        qk_scale=scale * math.log2(math.e),
        sq_b=q.stride(0), sq_h=q.stride(1), sq_n=q.stride(2), sk_b=k.stride(0), sk_h=k.stride(1), sk_t=k.stride(2),
        sv_b=v.stride(0), sv_h=v.stride(1), sv_t=v.stride(2), so_b=out.stride(0), so_h=out.stride(1),
        so_n=out.stride(2),
    )
    meta = dict(HAS_WINDOW=window is not None, IEEE=q.dtype == torch.float32,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)))
    return Plan(selected_attention_kernel, (B * Hkv, triton.cdiv(NQ * G, block_m)), args, meta,
                {"enable_fp_fusion": True})


def launch(*a, **kw) -> None:
    plan(*a, **kw).launch()
