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


def test_store_verify_checks_fingerprints_from_the_checkpoint(smol, tmp_path, make_chunk, capsys):
    from kdn_hf.cli import main
    from kdn_hf.store import DiskTier, encode_entry

    disk = DiskTier(tmp_path / "s", 1 << 24)
    mine = model_fingerprint(smol[0]).digest
    disk.put("a" * 32, encode_entry("a" * 32, make_chunk(), mine))
    disk.put("b" * 32, encode_entry("b" * 32, make_chunk(), "fingerprint-of-another-model"))
    assert main(["store", "verify", "--keep", "--store", str(tmp_path / "s"), "--model", "smollm2-135m"]) == 1
    out = capsys.readouterr()
    assert "b" * 32 in out.out and "a" * 32 not in out.out and "checked 2 entries: 1 bad" in out.err
