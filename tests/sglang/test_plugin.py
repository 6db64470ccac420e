"""Registration: the entry point in a fresh process, create_tree_cache with radix_cache_backend="kdn",
and the refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

HERE = Path(__file__).resolve().parent


def test_entry_point_registers_the_backend_in_a_fresh_process():
    code = (
        "from sglang.srt.plugins import load_plugins\n"
        "from sglang.srt.mem_cache.registry import get_radix_cache_factory\n"
        "load_plugins()\n"
        "f = get_radix_cache_factory('kdn')\n"
        "print(f.__module__, f.__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE / "stubs"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                         cwd="/")  # not the repo: the installed distribution's entry point, not a source tree
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "kdn_hf.integrations.sglang.plugin create_kdn_cache"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Llama saved as a transformers checkpoint directory (config.json + safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path, model


def _context(checkpoint, *, page_size=16, dtype=torch.float32, **overrides):
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext
    from sglang.srt.runtime_context import get_server_args

    pool = MHATokenToKVPool(size=256, page_size=page_size, dtype=dtype, head_num=2, head_dim=8, layer_num=2,
                            device="cpu", enable_memory_saver=False)
    alloc = PagedTokenToKVPoolAllocator(256, page_size, dtype, "cpu", pool, need_sort=False)
    params = CacheInitParams(disable=False, page_size=page_size, token_to_kv_pool_allocator=alloc,
                             req_to_token_pool=ReqToTokenPool(4, 512, "cpu", False))
    fields = dict(server_args=get_server_args(), params=params, is_hybrid_swa=False, is_hybrid_ssm=False,
                  enable_hierarchical_cache=False, disable_radix_cache=False, tp_worker=None,
                  model_config=SimpleNamespace(model_path=str(checkpoint), attention_arch=SimpleNamespace(name="MHA")),
                  tp_size=1, tp_rank=0, tp_group=None)
    fields.update(overrides)
    return TreeCacheBuildContext(**fields)


def test_create_tree_cache_builds_the_kdn_cache(tiny_checkpoint, tmp_path, monkeypatch):
    from sglang.srt.mem_cache.registry import create_tree_cache
    from sglang.srt.runtime_context import get_context

    from kdn_hf.fingerprint import model_fingerprint
    from kdn_hf.integrations.sglang.cache import KDNRadixCache
    from kdn_hf.integrations.sglang.plugin import register

    path, model = tiny_checkpoint
    monkeypatch.setenv("KDN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KDN_STORE", f"memory://,{tmp_path / 'store'}")
    monkeypatch.setenv("KDN_NAMESPACE", "team-a")
    monkeypatch.setenv("KDN_CODEC", "fp16")
    register()
    register()  # idempotent (SGLang may load plugins more than once per process)
    with get_context().override_server_args(radix_cache_backend="kdn"):
        cache = create_tree_cache(_context(path))
    assert isinstance(cache, KDNRadixCache)
    assert cache.fingerprint == model_fingerprint(model).digest  # the HF process's keys, same checkpoint + dtype
    assert (cache.settings.namespace, cache.settings.codec, cache.store.names) == ("team-a", "fp16", ["memory", "disk"])
    assert cache.settings.block_tokens % 16 == 0


def test_refusals_are_listed_at_start_up(tiny_checkpoint):
    from kdn_hf.errors import ConfigError
    from kdn_hf.integrations.sglang.plugin import create_kdn_cache

    path, _ = tiny_checkpoint
    ctx = _context(path, tp_size=2, is_hybrid_swa=True, is_hybrid_ssm=True, enable_hierarchical_cache=True,
                   is_dsa=True, dtype=torch.float8_e4m3fn)
    with pytest.raises(ConfigError) as e:
        create_kdn_cache(ctx)
    msg = str(e.value)
    for words in ("tensor/pipeline parallelism", "MLA/DSA", "sliding-window", "Mamba", "hierarchical-cache",
                  "KV pool dtype"):
        assert words in msg, words
    ctx = _context(path, model_config=SimpleNamespace(model_path=str(path), attention_arch=SimpleNamespace(name="MLA")))
    with pytest.raises(ConfigError, match="MLA"):
        create_kdn_cache(ctx)


def test_other_sglang_versions_are_refused(tiny_checkpoint, monkeypatch):
    import sglang

    from kdn_hf.integrations.sglang.settings import unsupported

    monkeypatch.setattr(sglang, "__version__", "0.5.24")
    assert any("0.5.24" in p for p in unsupported(_context(tiny_checkpoint[0])))
