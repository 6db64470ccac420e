"""``decode_rerotate_scatter``: an int8 / int4 entry's layers dequantized, K re-rotated, both
written into destination rows, in one pass (one wrapper over the torch reference and the kernel)."""

from __future__ import annotations

import operator

import torch

from kdn_hf.errors import InputError
from kdn_hf.kernels.dispatch import check_device, resolve
from kdn_hf.kernels.dequant import reference
from kdn_hf.kernels.dequant.source import QuantKV, bits_of
from kdn_hf.kernels.rotary import check_delta, check_rope, rope_table

__all__ = ["QuantKV", "bits_of", "decode_rerotate_scatter"]


def _check_dst(name: str, dst: torch.Tensor, src: QuantKV, layers: int) -> None:
    H, D = src.shape[2], src.shape[4]
    if not isinstance(dst, torch.Tensor) or dst.dim() != 4 or dst.shape[0] != layers or dst.shape[1] != H \
            or dst.shape[3] != D:
        found = tuple(dst.shape) if isinstance(dst, torch.Tensor) else type(dst).__name__
        raise InputError(f"{name} must be [layers={layers}, kv_heads={H}, rows, head_dim={D}], got {found}")
    if dst.dtype != src.dtype:
        raise InputError(f"{name} is {dst.dtype} but the entry decodes to {src.dtype}")
    check_device(name, dst, src.k_codes)


def _check_rows(rows: int | torch.Tensor, tokens: int, capacity: int, device: torch.device) -> int | torch.Tensor:
    if isinstance(rows, torch.Tensor):
        if rows.shape != (tokens,) or rows.is_floating_point() or rows.dtype == torch.bool:
            raise InputError(f"rows must be an int (first row of a contiguous range) or an integer tensor [{tokens}] "
                             f"of slots, got shape {tuple(rows.shape)} dtype {rows.dtype}")
        rows = rows.to(device, torch.int64)
        if tokens and (int(rows.min()) < 0 or int(rows.max()) >= capacity):
            raise InputError(f"rows must be slots in [0, {capacity}), got [{int(rows.min())}, {int(rows.max())}]")
        return rows
    try:
        rows = operator.index(rows)
    except TypeError:
        raise InputError(f"rows must be an int or an integer tensor, got {type(rows).__name__}") from None
    if rows < 0 or rows + tokens > capacity:
        raise InputError(f"rows {rows}..{rows + tokens - 1} do not fit the destination's {capacity} rows")
    return rows


def decode_rerotate_scatter(src: QuantKV, k_dst: torch.Tensor | None = None, v_dst: torch.Tensor | None = None, *,
                            layers: tuple[int, int] | None = None, rows: int | torch.Tensor = 0,
                            delta: int | torch.Tensor | None = None, inv_freq: torch.Tensor | None = None,
                            layout: str = "half", backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Decode layers ``layers`` of ``src``, move K by ``delta`` positions, write both into rows ``rows``.

    src:      the entry's quantized kv (:class:`QuantKV`; ``QuantKV.from_tensors`` from an entry).
    k_dst, v_dst: [stop - start, kv_heads, rows_total, head_dim] in ``src.dtype`` on ``src.device``, any
              strides with a contiguous last dim for the kernel (else it goes through a copy), e.g.
              ``out[start:stop, 0]`` / ``out[start:stop, 1]`` of a prompt buffer [layers, 2, H, T, D],
              or for SGLang's ``MHATokenToKVPool`` (k_buffer[l] is [slots, H, D]) one layer at a time:
              ``k_buffer[l].transpose(0, 1)[None]``. Both None: new [stop - start, H, T, D] tensors.
    layers:   (start, stop) entry layers to decode; default all.
    rows:     int: the tokens go to rows rows .. rows + T - 1; or a [T] integer tensor of slots.
    delta, inv_freq, layout: K's re-rotation, as :func:`kdn_hf.kernels.rerotate` takes them
              (inv_freq [n] or [stop - start, n]); delta None: no rotation (inv_freq ignored).
    backend:  "auto" | "torch" | "triton".
    Returns (k_dst, v_dst). The torch backend equals the codec's decoder + ``rerotate_layer`` +
    a copy bit for bit; the kernel rounds the same operations the same way.
    """
    if not isinstance(src, QuantKV):
        raise InputError(f"src must be a QuantKV (QuantKV.from_tensors(entry tensors, ...)), got {type(src).__name__}")
    L, _, H, T, D = src.shape
    start, stop = (0, L) if layers is None else (operator.index(layers[0]), operator.index(layers[1]))
    if not 0 <= start <= stop <= L:
        raise InputError(f"layers must be a range inside [0, {L}], got ({start}, {stop})")
    if (k_dst is None) != (v_dst is None):
        raise InputError("pass both k_dst and v_dst, or neither (new tensors)")
    if k_dst is None:
        k_dst = torch.empty(stop - start, H, T, D, dtype=src.dtype, device=src.device)
        v_dst = torch.empty_like(k_dst)
    _check_dst("k_dst", k_dst, src, stop - start)
    _check_dst("v_dst", v_dst, src, stop - start)
    if k_dst.shape[2] != v_dst.shape[2]:
        raise InputError(f"k_dst and v_dst must have as many rows, got {k_dst.shape[2]} and {v_dst.shape[2]}")
    rows = _check_rows(rows, T, k_dst.shape[2], src.device)
    if delta is not None:
        delta = check_delta(delta, T)
        check_rope(inv_freq, layout, D, stop - start)
    which = resolve(backend, src.device, src.dtype)
    if stop == start or T == 0:
        return k_dst, v_dst
    if which == "torch":
        reference.decode_rerotate_scatter(src, k_dst, v_dst, start, stop, rows, delta, inv_freq, layout)
        return k_dst, v_dst
    from kdn_hf.kernels.dequant import kernel

    cos = sin = crow = None
    if delta is not None and not (isinstance(delta, int) and delta == 0):
        cos, sin, crow = rope_table(delta, inv_freq, src.device)
    kd = k_dst if k_dst.stride(-1) == 1 else torch.empty(k_dst.shape, dtype=k_dst.dtype, device=k_dst.device)
    vd = v_dst if v_dst.stride(-1) == 1 else torch.empty(v_dst.shape, dtype=v_dst.dtype, device=v_dst.device)
    if kd is not k_dst:
        kd.copy_(k_dst)
    if vd is not v_dst:
        vd.copy_(v_dst)
    kernel.launch(src, kd, vd, start, stop, rows, cos, sin, crow, layout == "interleaved")
    if kd is not k_dst:
        k_dst.copy_(kd)
    if vd is not v_dst:
        v_dst.copy_(vd)
    return k_dst, v_dst
