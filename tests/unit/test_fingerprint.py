"""Model identity from a checkpoint directory equals model identity from the loaded model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import kdn_hf.fingerprint as fingerprint_mod
from kdn_hf.errors import ConfigError, ModelLoadError
from kdn_hf.fingerprint import fingerprint_cache_path, fingerprint_from_checkpoint, model_fingerprint


def tiny(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    if not tied:  # same values as the tied model: only the tying tells them apart
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    return model


def loaded(path, dtype):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()


@pytest.fixture
def kdn_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("KDN_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """{"tied"|"untied": checkpoint dir} of two tiny Llamas with equal values, saved with save_pretrained."""
    out = {}
    for name, tied in (("tied", True), ("untied", False)):
        path = tmp_path_factory.mktemp(name)
        tiny(tied).save_pretrained(path)
        out[name] = path
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["tied", "untied"])
def test_checkpoint_fingerprint_equals_the_loaded_model_fingerprint(pair, name, dtype, kdn_home):
    from safetensors import safe_open

    with safe_open(pair[name] / "model.safetensors", framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) == (name == "untied")  # the tied file leaves it out
    got = fingerprint_from_checkpoint(pair[name], dtype)
    want = model_fingerprint(loaded(pair[name], dtype))
    assert got.digest == want.digest
    assert got.fields == want.fields


def test_checkpoint_fingerprint_equals_the_saved_model_fingerprint(pair, kdn_home):
    assert fingerprint_from_checkpoint(pair["tied"], torch.float32).digest == model_fingerprint(tiny(True)).digest


def test_tying_and_dtype_change_the_fingerprint(pair, kdn_home):
    digests = {
        (name, dtype): fingerprint_from_checkpoint(pair[name], dtype).digest
        for name in pair for dtype in (torch.float32, torch.float16)
    }
    assert len(set(digests.values())) == 4
    assert fingerprint_from_checkpoint(pair["tied"], "float16").digest == digests["tied", torch.float16]
    assert fingerprint_from_checkpoint(pair["tied"], "torch.float16").digest == digests["tied", torch.float16]


def test_sharded_checkpoint_gives_the_same_fingerprint(pair, tmp_path, kdn_home):
    model = loaded(pair["untied"], torch.float32)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert fingerprint_from_checkpoint(sharded, torch.float32).digest == model_fingerprint(model).digest
    # a stray copy of the weights under other names (as Mistral's consolidated.safetensors) is not read
    (sharded / "consolidated.safetensors").write_bytes(b"not read")
    assert fingerprint_from_checkpoint(sharded, torch.float32, cache=False).digest == model_fingerprint(model).digest


def test_a_damaged_weights_file_is_a_clear_error(pair, tmp_path, kdn_home):
    broken = tmp_path / "damaged"
    broken.mkdir()
    (broken / "config.json").write_text((pair["tied"] / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="cannot read"):
        fingerprint_from_checkpoint(broken, torch.float32)


def test_the_weights_digest_is_cached_next_to_kdn_home_and_invalidated_by_a_changed_file(pair, kdn_home,
                                                                                          monkeypatch, tmp_path):
    path = tmp_path / "copy"
    tiny(True).save_pretrained(path)
    first = fingerprint_from_checkpoint(path, torch.float16)
    cache = fingerprint_cache_path(path)
    assert cache.parent == kdn_home / "fingerprints" and cache.is_file()
    assert set(json.loads(cache.read_text())["entries"]) == {"torch.float16"}
    assert not [p for p in path.iterdir() if "fingerprint" in p.name]  # the model dir is never written

    def recompute(*args):
        raise AssertionError("the cached digest should have been used")

    monkeypatch.setattr(fingerprint_mod, "_checkpoint_weights_digest", recompute)
    assert fingerprint_from_checkpoint(path, torch.float16) == first
    monkeypatch.undo()

    weights = path / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    calls = []
    real = fingerprint_mod._checkpoint_weights_digest
    monkeypatch.setattr(fingerprint_mod, "_checkpoint_weights_digest", lambda *a: calls.append(1) or real(*a))
    assert fingerprint_from_checkpoint(path, torch.float16) == first  # same bytes, new mtime: recomputed
    assert calls == [1]
    assert fingerprint_from_checkpoint(path, torch.float16, cache=False) == first


def test_an_unwritable_cache_is_only_logged(pair, tmp_path, monkeypatch, caplog):
    home = tmp_path / "home-file"
    home.write_text("not a directory")
    monkeypatch.setenv("KDN_HOME", str(home))
    want = model_fingerprint(tiny(True)).digest
    assert fingerprint_from_checkpoint(pair["tied"], torch.float32).digest == want
    assert "could not cache" in caplog.text


def test_a_checkpoint_missing_a_tensor_is_refused(pair, tmp_path, kdn_home):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((pair["untied"] / "config.json").read_text())
    tensors = load_file(pair["untied"] / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ModelLoadError, match="lm_head.weight"):
        fingerprint_from_checkpoint(broken, torch.float32)


def test_directories_without_safetensors_or_config_are_refused(pair, tmp_path, kdn_home):
    with pytest.raises(ModelLoadError, match="config.json"):
        fingerprint_from_checkpoint(tmp_path, torch.float32)
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "config.json").write_text((pair["tied"] / "config.json").read_text())
    (bare / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="safetensors.*pytorch_model.bin"):
        fingerprint_from_checkpoint(bare, torch.float32)
    with pytest.raises(ConfigError, match="dtype"):
        fingerprint_from_checkpoint(pair["tied"], "int8")
