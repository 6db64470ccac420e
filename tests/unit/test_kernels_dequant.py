"""kdn_hf.kernels.decode_rerotate_scatter: the torch path against the int8 / int4 codecs' decoders +
kdn_hf.rope.rerotate_layer + a copy (bit-identical), the Triton kernel (in Triton's CPU
interpreter) against the torch path, for contiguous and slot-indexed destinations."""

from __future__ import annotations

import pytest
import torch

from kdn_hf.codec import get_codec, layer_decoder
from kdn_hf.errors import CorruptEntryError, InputError
from kdn_hf.kernels import QuantKV, decode_rerotate_scatter
from kdn_hf.kernels.testing import assert_close, use_interpreter
from kdn_hf.rope import RopeFrequencies, RopeSpec, rerotate_layer

NO_INTERPRETER = use_interpreter()  # before anything here imports triton


def _inv_freq(rotary_dim: int) -> torch.Tensor:
    return 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def _entry(codec: str, dtype: torch.dtype, shape=(3, 2, 2, 21, 10), seed: int = 0):
    """(QuantKV, the codec's tensors, kv as the codec decodes it) for a random kv of ``shape``."""
    g = torch.Generator().manual_seed(seed)
    kv = (torch.randn(*shape, generator=g) * 2 + 0.5).to(dtype)
    c = get_codec(codec)
    tensors = c.encode(kv)
    return QuantKV.from_tensors(tensors, codec, dtype, shape), tensors, c.decode(tensors, dtype, shape)


def _expected(decoded, start, stop, dst_rows, rows, delta, spec, layer_of=lambda i: 0):
    """What composing layers [start, stop) into a [n, H, dst_rows, D] buffer gives with kdn_hf's
    existing code: the codec's decode, rerotate_layer on K, copies into the rows."""
    n, H, D = stop - start, decoded.shape[2], decoded.shape[4]
    k_want = torch.zeros(n, H, dst_rows, D, dtype=decoded.dtype)
    v_want = torch.zeros_like(k_want)
    for i in range(n):
        k, v = decoded[start + i, 0], decoded[start + i, 1]
        if delta is not None:
            k = rerotate_layer(k, delta, spec, layer_of(i))
        if isinstance(rows, int):
            k_want[i, :, rows : rows + k.shape[1]], v_want[i, :, rows : rows + k.shape[1]] = k, v
        else:
            k_want[i][:, rows], v_want[i][:, rows] = k, v
    return k_want, v_want


@pytest.fixture(scope="module")
def triton_interpreted():
    if NO_INTERPRETER:
        pytest.skip(NO_INTERPRETER)


# ----------------------------------------------------------------------------- torch path == codec + rope

# (codec, head_dim, rotary_dim, layout): int4 groups of 8 leave a partial last group of the 21 tokens;
# int4 (group 64, capped to the 21 tokens); head_dim 11 with 2 heads makes a layer's code run odd, so
# int4 layer ranges start inside a byte
CASES = [("int8", 10, 10, "half"), ("int4-g8", 10, 6, "interleaved"), ("int4", 11, 8, "half")]


@pytest.mark.parametrize("codec,head_dim,rotary_dim,layout", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_is_bit_identical_to_codec_decode_and_rerotate_layer(codec, head_dim, rotary_dim, layout, dtype):
    src, tensors, decoded = _entry(codec, dtype, shape=(3, 2, 2, 21, head_dim))
    spec = RopeSpec((RopeFrequencies(_inv_freq(rotary_dim), "default"),), (0, 0, 0), rotary_dim, head_dim, layout)
    w = spec.inv_freq(0)
    per_token = torch.cat([torch.full((9,), 40), torch.full((12,), -5)])
    slots = torch.randperm(30, generator=torch.Generator().manual_seed(1))[:21]
    for start, stop, rows, delta in ((0, 3, 0, None), (1, 3, 6, 17), (1, 2, slots, per_token), (0, 2, slots, None)):
        k_want, v_want = _expected(decoded, start, stop, 30, rows, delta, spec)
        k_got, v_got = torch.zeros_like(k_want), torch.zeros_like(v_want)
        decode_rerotate_scatter(src, k_got, v_got, layers=(start, stop), rows=rows, delta=delta, inv_freq=w,
                                layout=layout, backend="torch")
        assert_close(k_got, k_want, what=f"K layers {start}:{stop}")
        assert_close(v_got, v_want, what=f"V layers {start}:{stop}")
    # and the codec's own per-layer decoder (what delivery uses) for a range inside the entry
    decode_range = layer_decoder(get_codec(codec), tensors, dtype, tuple(decoded.shape))
    k_new, v_new = decode_rerotate_scatter(src, layers=(1, 3), backend="torch")
    assert_close(k_new, decode_range(1, 3)[:, 0], what="K, no destination")
    assert_close(v_new, decode_range(1, 3)[:, 1], what="V, no destination")


def test_per_layer_bases_into_a_prompt_buffer():
    """inv_freq [layers, n]; the destination is the prompt buffer [layers, 2, H, T, D]'s K and V views."""
    src, _, decoded = _entry("int8", torch.float32)
    w = _inv_freq(10)
    spec = RopeSpec((RopeFrequencies(w, "default"), RopeFrequencies(w / 4, "linear")), (0, 1, 0), 10, 10)
    out = torch.zeros(3, 2, 2, 40, 10)
    decode_rerotate_scatter(src, out[:, 0], out[:, 1], rows=11, delta=11, inv_freq=torch.stack([w, w / 4, w]),
                            backend="torch")
    k_want, v_want = _expected(decoded, 0, 3, 40, 11, 11, spec, layer_of=lambda i: i)
    assert_close(out[:, 0], k_want)
    assert_close(out[:, 1], v_want)


# ----------------------------------------------------------------------------- Triton == torch path


@pytest.mark.parametrize("codec,head_dim,rotary_dim,layout", CASES)
def test_kernel_matches_reference_float32(triton_interpreted, codec, head_dim, rotary_dim, layout):
    """Contiguous rows of a prompt buffer, and slots of an SGLang-style pool (k_buffer[l]: [slots, H, D])."""
    src, _, _ = _entry(codec, torch.float32, shape=(3, 2, 2, 37, head_dim))  # 37 tokens: a partial block
    w = _inv_freq(rotary_dim)
    delta = torch.cat([torch.full((20,), 300), torch.full((17,), -2)])
    out = {b: torch.zeros(2, 2, 2, 50, head_dim) for b in ("torch", "triton")}
    for b, buf in out.items():
        decode_rerotate_scatter(src, buf[:, 0], buf[:, 1], layers=(1, 3), rows=5, delta=delta, inv_freq=w,
                                layout=layout, backend=b)
    assert_close(out["triton"], out["torch"], what="prompt buffer")
    slots = torch.randperm(64, generator=torch.Generator().manual_seed(2))[:37]
    pools = {b: (torch.zeros(64, 2, head_dim), torch.zeros(64, 2, head_dim)) for b in ("torch", "triton")}
    for b, (k_buffer, v_buffer) in pools.items():
        decode_rerotate_scatter(src, k_buffer.transpose(0, 1)[None], v_buffer.transpose(0, 1)[None], layers=(2, 3),
                                rows=slots, delta=77, inv_freq=w, layout=layout, backend=b)
    assert_close(pools["triton"][0], pools["torch"][0], what="pool K")
    assert_close(pools["triton"][1], pools["torch"][1], what="pool V")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_matches_reference_half_precision(triton_interpreted, dtype):
    """No rotation and a rotation; float16 bit-identical, bfloat16 within an ulp (the interpreter truncates
    float32 -> bfloat16 where a GPU rounds; a K value one ulp off turns into up to ~2 ulps of its pair)."""
    src, _, _ = _entry("int4-g8", dtype, shape=(2, 2, 2, 21, 16))
    ulps = 0 if dtype == torch.float16 else 2
    for delta in (None, 1000):
        got = {}
        for b in ("torch", "triton"):
            got[b] = decode_rerotate_scatter(src, delta=delta, inv_freq=_inv_freq(16), backend=b)
        assert_close(got["triton"][0], got["torch"][0], ulps=ulps, atol=ulps * 2**-8 * 4, what=f"K delta {delta}")
        assert_close(got["triton"][1], got["torch"][1], ulps=ulps / 2, atol=ulps * 2**-8, what="V")


# ----------------------------------------------------------------------------- validation


def test_bad_arguments_raise_clear_errors():
    src, tensors, _ = _entry("int8", torch.float32)
    w = _inv_freq(10)
    with pytest.raises(InputError, match="int8 and int4"):
        QuantKV.from_tensors(tensors, "fp8", torch.float32, (3, 2, 2, 21, 10))
    with pytest.raises(CorruptEntryError, match="expects tensors"):
        QuantKV.from_tensors({k: v for k, v in tensors.items() if k != "kv.v.min"}, "int8", torch.float32,
                             (3, 2, 2, 21, 10))
    with pytest.raises(CorruptEntryError, match="k_codes"):
        QuantKV.from_tensors(tensors, "int8", torch.float32, (3, 2, 2, 22, 10))
    k, v = torch.zeros(3, 2, 30, 10), torch.zeros(3, 2, 30, 10)
    with pytest.raises(InputError, match="do not fit"):
        decode_rerotate_scatter(src, k, v, rows=10)
    with pytest.raises(InputError, match="slots in"):
        decode_rerotate_scatter(src, k, v, rows=torch.arange(21) + 10)
    with pytest.raises(InputError, match="decodes to"):
        decode_rerotate_scatter(src, k.half(), v.half())
    with pytest.raises(InputError, match="layers=2"):
        decode_rerotate_scatter(src, k, v, layers=(0, 2))
    with pytest.raises(InputError, match="both"):
        decode_rerotate_scatter(src, k)
    with pytest.raises(InputError, match="inv_freq"):
        decode_rerotate_scatter(src, k, v, delta=3)
    with pytest.raises(InputError, match="rotary_dim"):
        decode_rerotate_scatter(src, k, v, delta=3, inv_freq=_inv_freq(12))
    decode_rerotate_scatter(src, k, v, delta=3, inv_freq=w)  # and the right call goes through
