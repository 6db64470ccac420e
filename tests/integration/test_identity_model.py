"""Model identity without a module, on the real SmolLM2: the checkpoint directory gives the same
fingerprint and RoPE spec as the loaded model, so any engine holding the same checkpoint makes the
same keys."""

from __future__ import annotations

import torch

from kdn_hf import models
from kdn_hf.fingerprint import fingerprint_from_checkpoint, model_fingerprint
from kdn_hf.rope import rope_spec_from_config, rope_spec_from_model


def test_checkpoint_fingerprint_equals_the_model_fingerprint(smol):
    model, _ = smol
    path = models.resolve("smollm2-135m")
    fp32 = fingerprint_from_checkpoint(path, torch.float32, cache=False)
    assert fp32.digest == model_fingerprint(model).digest
    assert fp32.fields["architecture"] == "LlamaForCausalLM"
    fp16 = fingerprint_from_checkpoint(path, torch.float16, cache=False)
    half, _ = models.load("smollm2-135m", dtype=torch.float16)
    assert fp16.digest == model_fingerprint(half).digest != fp32.digest


def test_rope_spec_from_config_equals_the_spec_read_from_the_model(smol):
    model, _ = smol
    assert rope_spec_from_config(model.config).describe() == rope_spec_from_model(model).describe()
