"""KDN_STORE / KDN_NAMESPACE / KDN_CODEC: the readers and the CLI defaults they feed."""

from __future__ import annotations

import pytest

from kdn_hf import env
from kdn_hf.cli import build_parser, main
from kdn_hf.errors import ConfigError


def test_readers_default_when_unset_or_empty(monkeypatch):
    for name in ("KDN_STORE", "KDN_NAMESPACE", "KDN_CODEC"):
        monkeypatch.setenv(name, "  ")
    assert env.store_spec() is None
    assert env.namespace() == "default"
    assert env.codec() == "none"
    for name in ("KDN_STORE", "KDN_NAMESPACE", "KDN_CODEC"):
        monkeypatch.delenv(name)
    assert (env.store_spec(), env.namespace(), env.codec()) == (None, "default", "none")


def test_store_is_a_comma_separated_chain(monkeypatch):
    monkeypatch.setenv("KDN_STORE", "memory://, /tmp/kdn-store")
    assert env.store_spec() == ["memory://", "/tmp/kdn-store"]
    monkeypatch.setenv("KDN_STORE", "memory://,,/tmp/x")
    with pytest.raises(ConfigError, match="empty entry"):
        env.store_spec()


def test_cli_defaults_follow_the_environment(monkeypatch):
    monkeypatch.setenv("KDN_NAMESPACE", "tenant-a")
    monkeypatch.setenv("KDN_CODEC", "fp16")
    args = build_parser().parse_args(["ingest", "doc.txt"])
    assert (args.namespace, args.codec) == ("tenant-a", "fp16")
    args = build_parser().parse_args(["ingest", "doc.txt", "--namespace", "b", "--codec", "int8"])
    assert (args.namespace, args.codec) == ("b", "int8")


def test_cli_store_default_is_kdn_store(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KDN_STORE", f"memory://,{tmp_path / 'store'}")
    assert main(["store", "stats"]) == 0
    out = capsys.readouterr().out
    assert "memory" in out and "disk" in out
    # a --store on the command line replaces the environment's chain instead of extending it
    assert main(["store", "stats", "--store", "memory://"]) == 0
    assert "disk" not in capsys.readouterr().out


def test_sglang_reuse_flag(monkeypatch):
    for raw, want in [("", False), ("0", False), ("off", False), ("1", True), ("true", True)]:
        monkeypatch.setenv("KDN_SGLANG_REUSE", raw)
        assert env.sglang_reuse() is want
    monkeypatch.setenv("KDN_SGLANG_REUSE", "maybe")
    with pytest.raises(ConfigError, match="KDN_SGLANG_REUSE"):
        env.sglang_reuse()


def test_library_defaults_follow_the_environment(monkeypatch, tmp_path):
    """open_store(None) opens $KDN_STORE, and KDN(...) takes $KDN_NAMESPACE / $KDN_CODEC into its keys."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdn_hf import KDN
    from kdn_hf.store import open_store

    monkeypatch.setenv("KDN_STORE", f"memory://,{tmp_path / 'store'}")
    assert [t.name for t in open_store(None).tiers] == ["memory", "disk"]
    monkeypatch.setenv("KDN_NAMESPACE", "tenant-a")
    monkeypatch.setenv("KDN_CODEC", "fp16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))

    class Tok:  # the few tokenizer calls KDN makes at construction
        bos_token_id = None

    from kdn_hf.blend.runner import layer_runner

    assert not layer_runner(model).checked
    kdn = KDN(model, Tok())
    # the layer runner's one-time self-check ran at construction, off the first blend request's clock
    assert layer_runner(model).checked and layer_runner(model).blend_error is None
    assert (kdn.namespace, kdn.codec, [t.name for t in kdn.store.tiers]) == ("tenant-a", "fp16", ["memory", "disk"])
    explicit = KDN(model, Tok(), store="memory://", namespace="b", codec="none")
    assert (explicit.namespace, explicit.codec) == ("b", "none")
    assert kdn.policy.chunk_key([1, 2, 3]) != explicit.policy.chunk_key([1, 2, 3])
