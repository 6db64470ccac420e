"""Offline model loading: the bundled GGUF (converted once, cached) and local directories."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdn_hf import KDN, models
from kdn_hf.errors import ModelLoadError


def test_bundled_model_is_converted_once_and_cached(smol):
    model, tok = smol
    out = models.converted_dir("smollm2-135m")
    src = json.loads((out / models.CONVERTED_MARKER).read_text())
    assert src["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(src["xxh3_128"]) == 32
    assert not hasattr(model.config, "quantization_config")
    assert model.config.num_hidden_layers == 30 and next(model.parameters()).dtype == torch.float32
    assert tok.decode(tok("The capital of France", add_special_tokens=False)["input_ids"]) == "The capital of France"


def test_local_directory_and_loaded_pair(smol, tmp_path):
    _, tok = smol
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    kdn = KDN.from_pretrained(str(tmp_path / "tiny"), store="memory://")
    assert kdn.model.config.num_hidden_layers == 2
    chunks = ["a document. ", "a question?"]
    res = kdn.generate(chunks, max_new_tokens=3, mode="prefix")
    # the local model is the one that answers: its own stock greedy generate on the same ids
    ids = torch.tensor([res.prompt_ids])
    stock = kdn.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                               eos_token_id=None)[0, ids.shape[1]:].tolist()
    assert res.token_ids == stock[:len(res.token_ids)] and res.token_ids
    # and its chunks went to the store under its own fingerprint: a second request hits them
    kdn.generate(chunks, max_new_tokens=3, mode="reuse")
    again = kdn.generate(chunks, max_new_tokens=3, mode="reuse")
    assert again.stats.tokens_reused > 0 and sum(again.stats.hits.values()) >= 1
    with pytest.raises(ModelLoadError, match="config.json"):
        models.load(tmp_path)  # a directory that holds no model


@pytest.mark.slow
def test_conversion_from_scratch(tmp_path, monkeypatch):
    monkeypatch.setenv("KDN_HOME", str(tmp_path))
    model, tok = models.load("smollm2-135m")
    assert (tmp_path / "models" / "smollm2-135m" / models.CONVERTED_MARKER).is_file()
    again, _ = models.load("smollm2-135m")  # from the cache now
    a = dict(model.named_parameters())
    for name, p in again.named_parameters():
        assert torch.equal(p, a[name]), name
