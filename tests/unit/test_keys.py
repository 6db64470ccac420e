"""Keys and fingerprints: same text + same model = same key; anything that changes KV bytes changes it."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdn_hf.errors import InputError
from kdn_hf.fingerprint import model_fingerprint
from kdn_hf.keys import make_key


def tiny(seed=0, **rope):
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **rope})
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def key(fp, ids=(1, 2, 3), **kw):
    args = dict(fingerprint=fp, codec="none", namespace="default", token_ids=list(ids))
    args.update(kw)
    return make_key(**args)


def test_fingerprint_is_stable_and_separates_models():
    a, a2 = tiny(0), tiny(0)
    fa = model_fingerprint(a).digest
    assert fa == model_fingerprint(a2).digest  # same weights, different objects
    assert len(fa) == 32 and int(fa, 16) >= 0
    assert model_fingerprint(tiny(1)).digest != fa  # other weights
    assert model_fingerprint(copy.deepcopy(a).half()).digest != fa  # other dtype
    assert model_fingerprint(tiny(0, rope_theta=500000.0)).digest != fa  # other RoPE
    b = tiny(0)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # one weight changed
    assert model_fingerprint(b).digest != fa


def test_keys_separate_every_field_and_carry_no_plaintext():
    fp = model_fingerprint(tiny(0)).digest
    base = key(fp)
    assert base == key(fp)  # deterministic, position-free
    others = {
        key(model_fingerprint(tiny(1)).digest),
        key(fp, codec="int4"),
        key(fp, namespace="tenant-b"),
        key(fp, ids=(1, 2, 4)),
        key(fp, ids=(1, 2)),
        key(fp, kind="prefix"),
        key(fp, context_ids=[0]),
        key(fp, ids=(1,), context_ids=[2, 3]) ,
    }
    assert base not in others and len(others) == 8
    # length-prefixed fields: moving ids between context and chunk changes the key
    assert key(fp, ids=(2, 3), context_ids=[1]) != key(fp, ids=(3,), context_ids=[1, 2])
    secret = "tenant-with-a-secret-name"
    assert secret not in key(fp, namespace=secret)
    assert all(c in "0123456789abcdef" for c in base) and len(base) == 32


def test_key_inputs_are_validated():
    with pytest.raises(InputError, match="kind"):
        key("f", kind="other")
    with pytest.raises(InputError, match="namespace"):
        key("f", namespace="")


def test_blend_keys_carry_their_variant_and_others_refuse_one():
    fp = model_fingerprint(tiny(0)).digest
    a = key(fp, kind="blend", variant="ratio=0.15;kdn")
    assert a == key(fp, kind="blend", variant="ratio=0.15;kdn")
    assert len({a, key(fp, kind="blend", variant="ratio=0.2;kdn"), key(fp, kind="blend", variant="ratio=0.15;cb"),
                key(fp), key(fp, kind="prefix")}) == 5
    with pytest.raises(InputError, match="variant"):
        key(fp, kind="blend")
    with pytest.raises(InputError, match="variant"):
        key(fp, variant="ratio=0.15")
