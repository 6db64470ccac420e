"""kdn_hf.kernels.selected_attention: the torch path against attention written out in float64, the
Triton kernel (in Triton's CPU interpreter) against the torch path; causal_attention's SDPA path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdn_hf.errors import ConfigError, InputError
from kdn_hf.kernels import causal_attention, describe, selected_attention
from kdn_hf.kernels.testing import assert_close, use_interpreter

NO_INTERPRETER = use_interpreter()  # before anything here imports triton


def _qkv(B, Hq, Hkv, rows, keys, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g).to(dtype) for h, n in ((Hq, rows), (Hkv, keys), (Hkv, keys)))
    return q, k, v


def _positions(rows: int, keys: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(keys, generator=g)[:rows].sort().values


def _by_hand(q, k, v, q_pos, scale, window):
    """Softmax attention in float64, one row at a time, over the keys it may see."""
    out = torch.empty(q.shape, dtype=torch.float64)
    G = q.shape[1] // k.shape[1]
    for h in range(q.shape[1]):
        for i, p in enumerate(q_pos.tolist()):
            lo = 0 if window is None else max(0, p - window + 1)
            kk, vv = k[:, h // G, lo : p + 1].double(), v[:, h // G, lo : p + 1].double()
            w = torch.softmax(torch.einsum("bd,bkd->bk", q[:, h, i].double(), kk) * scale, dim=-1)
            out[:, h, i] = torch.einsum("bk,bkd->bd", w, vv)
    return out


@pytest.fixture(scope="module")
def triton_interpreted():
    if NO_INTERPRETER:
        pytest.skip(NO_INTERPRETER)


@pytest.mark.parametrize("window", [None, 5])
def test_torch_path_is_attention_over_visible_keys(window):
    q, k, v = _qkv(2, 4, 2, 6, 23, 8)
    q_pos = _positions(6, 23)
    got = selected_attention(q, k, v, q_pos, scale=0.3, window=window, backend="torch")
    assert torch.allclose(got.double(), _by_hand(q, k, v, q_pos, 0.3, window), atol=1e-6)


# (B, Hq, Hkv, rows, keys, D, window): grouped and plain heads, odd head dims, keys and rows not
# multiples of the blocks, a window smaller than a block
KERNEL_CASES = [(1, 4, 2, 9, 50, 19, None), (2, 3, 3, 40, 70, 16, 7), (1, 2, 1, 5, 37, 8, 40)]


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_matches_reference(triton_interpreted, case):
    B, Hq, Hkv, rows, keys, D, window = case
    q, k, v = _qkv(B, Hq, Hkv, rows, keys, D)
    q_pos = _positions(rows, keys)
    want = selected_attention(q, k, v, q_pos, window=window, backend="torch")
    got = selected_attention(q, k, v, q_pos, window=window, backend="triton")
    assert_close(got, want, atol=2e-6, ulps=8)


def test_kernel_matches_reference_half_precision_three_dims(triton_interpreted):
    """[H, rows, D] inputs, float16, the last context position selected."""
    q, k, v = (t[0] for t in _qkv(1, 4, 2, 7, 33, 16, dtype=torch.float16))
    q_pos = torch.tensor([0, 3, 4, 10, 20, 31, 32])
    want = selected_attention(q.float(), k.float(), v.float(), q_pos, backend="torch")
    got = selected_attention(q, k, v, q_pos, backend="triton")
    assert got.shape == q.shape and got.dtype == torch.float16
    assert_close(got.float(), want, atol=2e-3)


def test_causal_attention_sdpa_is_bottom_right_aligned():
    q, k, v = _qkv(1, 4, 2, 5, 12, 8)
    want = selected_attention(q, k, v, torch.arange(7, 12), backend="torch")
    assert_close(causal_attention(q, k, v, backend="sdpa"), want, atol=1e-6)
    q, k, v = _qkv(1, 2, 2, 9, 9, 8)
    assert_close(causal_attention(q, k, v), selected_attention(q, k, v, torch.arange(9), backend="torch"), atol=1e-6)


def test_causal_attention_sdpa_with_most_queries_is_the_causal_prefills_last_rows():
    # queries >= half the keys take the padded causal square: the same rows full causal prefill computes
    q, k, v = _qkv(1, 4, 2, 40, 40, 8)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for rows in (20, 33, 39):
        got = causal_attention(q[:, :, 40 - rows:], k, v, backend="sdpa")
        assert torch.equal(got, full[:, :, 40 - rows:])
        want = selected_attention(q[:, :, 40 - rows:], k, v, torch.arange(40 - rows, 40), backend="torch")
        assert_close(got, want, atol=1e-6)


def test_the_cpu_choice_is_torch_and_sdpa():
    assert describe("cpu") == {"kernels": "torch", "attention": "sdpa"}


def test_bad_arguments_raise_clear_errors():
    q, k, v = _qkv(1, 3, 2, 4, 10, 8)
    with pytest.raises(InputError, match="multiple of Hkv"):
        selected_attention(q, k, v, torch.arange(4))
    q, k, v = _qkv(1, 4, 2, 4, 10, 8)
    with pytest.raises(InputError, match=r"\[0, keys=10\)"):
        selected_attention(q, k, v, torch.tensor([1, 2, 3, 10]))
    with pytest.raises(InputError, match="q_pos"):
        selected_attention(q, k, v, torch.arange(3))
    with pytest.raises(InputError, match="window"):
        selected_attention(q, k, v, torch.arange(4), window=0)
    with pytest.raises(InputError, match="dtype"):
        selected_attention(q, k.half(), v.half(), torch.arange(4))
    with pytest.raises(InputError, match="rows <= keys"):
        causal_attention(k.repeat(1, 2, 2, 1)[:, :, :12], k, v)
    with pytest.raises(ConfigError, match="flash_attn"):
        causal_attention(q, k, v, backend="flash_attn")
