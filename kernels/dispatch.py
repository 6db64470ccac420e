"""Which implementation runs an op: capability detection once, the dispatch rule in one place.

Every wrapper in ``kdn_hf.kernels`` takes ``backend="auto" | "torch" | "triton"`` and asks
:func:`resolve` which one to run:

- ``"auto"``: the Triton kernel when the tensors are on a CUDA device, their dtype is one the
  kernels take (float16, bfloat16, float32) and ``triton`` imports; the torch reference otherwise
  (CPU, float64, no triton).
- ``"torch"``: the torch reference (the CPU path; also the reference the kernels are tested against).
- ``"triton"``: the kernel, or an error saying why it cannot run. On CPU tensors it runs only under
  Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernel modules are first imported:
  Triton reads it when a kernel is decorated), which is how the tests check the kernels without a GPU.

:func:`backend` and :func:`describe` say what ``"auto"`` picks, for the engine's stats.
Nothing here changes global state; detection results are cached per process.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch

from kdn_hf.errors import ConfigError, InputError

BACKENDS = ("auto", "torch", "triton")
#: dtypes the Triton kernels take (float64 runs in torch)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether ``triton`` (and ``triton.language``) import."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    if not triton_available():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


def resolve(backend: str, device: torch.device | torch.Tensor, dtype: torch.dtype | None = None) -> str:
    """``"torch"`` or ``"triton"``: what runs an op on tensors of ``device`` / ``dtype`` (or like the
    tensor passed as ``device``: its device and dtype).

    Raises ConfigError for an unknown name or ``"triton"`` without triton installed, and InputError
    for ``"triton"`` on tensors it cannot take (CPU outside the interpreter, float64).
    """
    if isinstance(device, torch.Tensor):
        if not device.is_cuda and backend in ("auto", "torch"):  # the CPU path, decided without a device object
            return "torch"
        device, dtype = device.device, device.dtype
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        ok = device.type == "cuda" and (dtype is None or dtype in TRITON_DTYPES) and triton_available()
        return "triton" if ok else "torch"
    if backend == "triton":
        if not triton_available():
            raise ConfigError("backend='triton' needs the triton package: pip install 'kdn-hf[gpu]', "
                              "or use backend='auto' / 'torch'")
        if device.type != "cuda" and not interpreting():
            raise InputError(f"the Triton kernels run on CUDA tensors, got {device.type} tensors; use backend='torch' "
                             "(or set TRITON_INTERPRET=1 before importing kdn_hf.kernels to run them interpreted)")
        if dtype is not None and dtype not in TRITON_DTYPES:
            raise InputError(f"the Triton kernels take {[str(d) for d in TRITON_DTYPES]}, got {dtype}; "
                             "use backend='torch'")
    return backend


def backend(device: torch.device | str = "cuda") -> str:
    """What ``backend="auto"`` runs on ``device`` (for float16/bfloat16/float32 tensors)."""
    return resolve("auto", torch.device(device))


@lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    """Whether flash-attn >= 2.1 (bottom-right aligned causal masks) imports."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn
    except ImportError:  # installed but built for another torch / CUDA: unusable, SDPA serves
        return False
    major, minor = (int(x) for x in flash_attn.__version__.split(".")[:2])
    return (major, minor) >= (2, 1)


def attention_backend(device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16) -> str:
    """``"flash_attn"`` where flash-attn serves causal attention on ``device`` / ``dtype``, else ``"sdpa"``."""
    ok = torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_attn_available()
    return "flash_attn" if ok else "sdpa"


def describe(device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """What runs on ``device`` / ``dtype``, for stats: ``{"kernels": "triton" | "torch",
    "attention": "flash_attn" | "sdpa"}``."""
    dev = torch.device(device)
    return {"kernels": resolve("auto", dev, dtype), "attention": attention_backend(dev, dtype)}


def check_device(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    """Raise InputError unless tensor ``name`` is on the device of ``like``."""
    if t.is_cuda != like.is_cuda or t.get_device() != like.get_device():
        raise InputError(f"{name} is on {t.device} but the op runs on {like.device}; move it there first")
