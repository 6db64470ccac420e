"""Bad input gets a clear KDNError subclass whose message says how to fix it."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdn_hf import KDN, models
from kdn_hf.errors import (
    ConfigError,
    ContextTooLongError,
    InputError,
    KDNError,
    ModelLoadError,
    StoreError,
    UnsupportedRopeError,
)


def test_empty_and_malformed_chunks(kdn):
    with pytest.raises(InputError, match="at least one chunk"):
        kdn.generate([])
    with pytest.raises(InputError, match=r"wrap a single text as \[text\]"):
        kdn.generate("just a string")
    with pytest.raises(InputError, match="chunk 1 is an empty string"):
        kdn.generate(["a document", "", "question?"])
    with pytest.raises(InputError, match=r"token ids must lie in \[0, "):
        kdn.generate([[1, 2, 10**9], "question?"])
    with pytest.raises(InputError, match="must be a str or a sequence of token ids"):
        kdn.generate([3.14, "question?"])
    with pytest.raises(InputError, match="list of texts"):
        kdn.ingest("a single text")


def test_bad_options(kdn):
    with pytest.raises(ConfigError, match="mode must be one of"):
        kdn.generate(["doc", "q"], mode="turbo")
    with pytest.raises(ConfigError, match=r"recompute_ratio must be a number in \[0, 1\]"):
        kdn.generate(["doc", "q"], mode="reuse", recompute_ratio=1.5)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        kdn.generate(["doc", "q"], max_new_tokens=0)
    with pytest.raises(ConfigError, match="namespace"):
        KDN(kdn.model, kdn.tokenizer, store="memory://", namespace="")


def test_prompt_longer_than_the_context(kdn):
    n = kdn.max_positions
    assert n is not None
    with pytest.raises(ContextTooLongError, match="lower max_new_tokens|shorten chunks"):
        kdn.generate([[42] * (n - 10), "question?"], max_new_tokens=64)
    with pytest.raises(ContextTooLongError, match="split it into smaller chunks"):
        kdn.ingest([[42] * (n + 1)])
    with pytest.raises(ContextTooLongError):
        kdn.prepare([[42] * (n + 1)])


def test_store_paths(smol, tmp_path):
    model, tok = smol
    with pytest.raises(StoreError, match="mkdir -p"):
        KDN(model, tok, store=tmp_path / "missing-parent" / "store")
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(StoreError):
        KDN(model, tok, store=tmp_path / "afile")
    with pytest.raises(StoreError, match="allowed"):
        KDN(model, tok, store="ftp://example/store")


def test_unsupported_rope_is_refused_when_rotation_is_needed(smol, tmp_path):
    _, tok = smol
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(cfg).eval()
    kdn = KDN(tiny, tok, store="memory://")
    chunks = ["first document. ", "second document. ", "question?"]
    assert kdn.generate(chunks, max_new_tokens=2, mode="full").token_ids  # no rotation: fine
    with pytest.raises(UnsupportedRopeError, match="dynamic") as e:
        kdn.generate(chunks, max_new_tokens=2, mode="reuse")
    assert "mode=" in str(e.value)


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="bundled names"):
        models.load("no-such-model-anywhere")
    assert issubclass(ModelLoadError, KDNError)
