"""GPU kernels of kdn_hf's data path, each with a torch reference that is also the CPU path.

Installed as ``kdn_hf.kernels`` (the folder sits at the top of the repository). One wrapper per op
validates shapes, dtypes and devices, allocates the output and dispatches
``backend="auto" | "torch" | "triton"`` through :func:`kdn_hf.kernels.dispatch.resolve`
(auto: Triton on CUDA when it imports, torch otherwise):

- :func:`rerotate`: post-RoPE K moved to new positions (rotate-half / interleaved, partial rotary,
  per-layer bases, one delta per token so many chunks go in one launch), in place or into a buffer.
- :func:`decode_rerotate_scatter`: an int8 / int4 entry (:class:`QuantKV`) dequantized, its K
  re-rotated, and written into destination rows (a contiguous range or slot indices).
- :func:`selected_attention`: attention of selected query rows at sorted positions over the whole
  context, causal by position, optional sliding window, grouped-query.
- :func:`causal_attention`: flash-attn where installed (bottom-right causal), SDPA otherwise.

:func:`describe` says what runs on a device (for stats). ``kernels/gpu_check.py`` checks and times
the Triton kernels against the references on a CUDA machine. Kernel modules import ``triton`` and
are imported only when a Triton backend runs; this package imports only torch and kdn_hf.errors.
"""

from kdn_hf.kernels.attention import causal_attention, selected_attention
from kdn_hf.kernels.dispatch import BACKENDS, attention_backend, backend, describe, resolve
from kdn_hf.kernels.dequant import QuantKV, decode_rerotate_scatter
from kdn_hf.kernels.rotary import rerotate

__all__ = [
    "BACKENDS",
    "QuantKV",
    "attention_backend",
    "backend",
    "causal_attention",
    "decode_rerotate_scatter",
    "describe",
    "rerotate",
    "resolve",
    "selected_attention",
]
