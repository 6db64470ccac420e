"""kdn_hf.kernels.rerotate: the torch path against kdn_hf.rope.rerotate_layer (bit-identical), the
Triton kernel (in Triton's CPU interpreter) against the torch path."""

from __future__ import annotations

import pytest
import torch

from kdn_hf.errors import ConfigError, InputError
from kdn_hf.kernels import rerotate
from kdn_hf.kernels.testing import assert_close, use_interpreter
from kdn_hf.rope import RopeFrequencies, RopeSpec, rerotate_layer

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (head_dim, rotary_dim): whole head, partial rotary with an odd head dim
GEOMETRIES = ((16, 16), (11, 8))


NO_INTERPRETER = use_interpreter()  # before anything here imports triton


def _inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def _spec(head_dim: int, rotary_dim: int, layout: str, layers: int = 1) -> RopeSpec:
    return RopeSpec((RopeFrequencies(_inv_freq(rotary_dim), "default"),), (0,) * layers, rotary_dim, head_dim, layout)


def _chunk_deltas(lengths: tuple[int, ...], deltas: tuple[int, ...]) -> torch.Tensor:
    """[sum(lengths)] int64: each chunk's tokens moved by its own delta."""
    return torch.cat([torch.full((n,), d, dtype=torch.int64) for n, d in zip(lengths, deltas)])


def _k(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3).to(dtype)


@pytest.fixture(scope="module")
def triton_interpreted():
    if NO_INTERPRETER:
        pytest.skip(NO_INTERPRETER)


# ----------------------------------------------------------------------------- torch path == rope


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_path_is_bit_identical_to_rerotate_layer(layout, geometry, dtype):
    head_dim, rotary_dim = geometry
    spec = _spec(head_dim, rotary_dim, layout)
    w = spec.inv_freq(0)
    k = _k(3, 37, head_dim, dtype=dtype)
    for delta in (123, -7, _chunk_deltas((10, 20, 7), (5, 900, -3))):
        assert_close(rerotate(k, delta, w, layout=layout, backend="torch"), rerotate_layer(k, delta, spec, 0),
                     what=f"new tensor, delta {delta if isinstance(delta, int) else 'per token'}")
        buf = torch.zeros(3, 50, head_dim, dtype=dtype)
        rerotate(k, delta, w, layout=layout, out=buf[:, 4:41], backend="torch")
        want = torch.zeros_like(buf)
        rerotate_layer(k, delta, spec, 0, out=want[:, 4:41])
        assert_close(buf, want, what="into a slice of a buffer")
        inplace = k.clone()
        assert rerotate(inplace, delta, w, layout=layout, out=inplace, backend="torch") is inplace
        assert_close(inplace, rerotate_layer(k, delta, spec, 0), what="in place")


def test_per_layer_frequencies_match_one_layer_at_a_time():
    """inv_freq [layers, n]: layer l turns by its own bases; a zero row (a layer without RoPE) is left as is."""
    w = _inv_freq(16)
    spec = RopeSpec((RopeFrequencies(w, "default"), RopeFrequencies(w / 8, "linear")), (0, 1, -1, 0), 16, 16)
    table = torch.stack([w, w / 8, torch.zeros_like(w), w])
    k = _k(4, 2, 19, 16, dtype=torch.float32)
    delta = _chunk_deltas((9, 10), (40, -11))
    got = rerotate(k, delta, table, backend="torch")
    for layer in range(4):
        want = k[layer] if spec.inv_freq(layer) is None else rerotate_layer(k[layer], delta, spec, layer)
        assert_close(got[layer], want, what=f"layer {layer}")


def test_zero_delta_copies():
    k = _k(2, 5, 8, dtype=torch.bfloat16)
    out = rerotate(k, 0, _inv_freq(8), backend="torch")
    assert out is not k and torch.equal(out, k)


# ----------------------------------------------------------------------------- Triton == torch path


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_kernel_matches_reference_float32(triton_interpreted, layout, geometry):
    """Several chunks with their own deltas (37 tokens: not a multiple of the 32-token block)."""
    head_dim, rotary_dim = geometry
    w = _inv_freq(rotary_dim)
    k = _k(2, 37, head_dim, dtype=torch.float32)
    delta = _chunk_deltas((10, 20, 7), (5, 900, -3))
    want = rerotate(k, delta, w, layout=layout, backend="torch")
    assert_close(rerotate(k, delta, w, layout=layout, backend="triton"), want, what="new tensor")
    buf = torch.zeros(2, 45, head_dim)  # the prompt buffer: rows 8..44
    rerotate(k, delta, w, layout=layout, out=buf[:, 8:], backend="triton")
    assert_close(buf[:, 8:], want, what="into a buffer slice")
    assert not buf[:, :8].any()
    inplace = k.clone()
    rerotate(inplace, 300, w, layout=layout, out=inplace, backend="triton")
    assert_close(inplace, rerotate(k, 300, w, layout=layout, backend="torch"), what="in place, one delta")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_matches_reference_half_precision(triton_interpreted, dtype):
    """Per-layer bases over [layers, heads, tokens, head_dim] K. float16 is bit-identical; bfloat16
    may differ by one ulp (the interpreter truncates float32 -> bfloat16, a GPU rounds)."""
    w = _inv_freq(16)
    table = torch.stack([w, w / 8, torch.zeros_like(w)])
    k = _k(3, 2, 33, 16, dtype=dtype)
    delta = _chunk_deltas((13, 20), (64, 2))
    ulps = 0 if dtype == torch.float16 else 1
    assert_close(rerotate(k, delta, table, backend="triton"), rerotate(k, delta, table, backend="torch"), ulps=ulps)


# ----------------------------------------------------------------------------- validation


def test_bad_arguments_raise_clear_errors(monkeypatch):
    k, w = _k(2, 5, 8, dtype=torch.float32), _inv_freq(8)
    with pytest.raises(InputError, match="layout"):
        rerotate(k, 1, w, layout="neox")
    with pytest.raises(InputError, match="delta"):
        rerotate(k, torch.zeros(4, dtype=torch.int64), w)
    with pytest.raises(InputError, match="delta"):
        rerotate(k, torch.zeros(5), w)
    with pytest.raises(InputError, match="rotary_dim"):
        rerotate(k, 1, _inv_freq(10))
    with pytest.raises(InputError, match="per-layer"):
        rerotate(k[None], 1, torch.stack([w, w, w]))
    with pytest.raises(InputError, match="out must match"):
        rerotate(k, 1, w, out=torch.empty(2, 5, 8, dtype=torch.float16))
    with pytest.raises(ConfigError, match="backend"):
        rerotate(k, 1, w, backend="cuda")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InputError, match="CUDA tensors"):
        rerotate(k, 1, w, backend="triton")
    with pytest.raises(InputError, match="float64|CUDA"):
        rerotate(k.double(), 1, w, backend="triton")
