"""KDNSettings: what the ``kdn`` backend is configured with, and what it refuses.

SGLang has no command-line flags for a registered radix-cache backend, so the
settings come from the environment (``kdn_hf.env``: ``KDN_STORE``,
``KDN_NAMESPACE``, ``KDN_CODEC``), the same variables the CLI and HF users
read, so a server and ``kdn ingest`` started alike share entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kdn_hf import env
from kdn_hf.codec import check_codec
from kdn_hf.errors import ConfigError

SGLANG_VERSION = "0.5.23"
#: pool dtypes whose bytes an entry can hold as they are (fp8/fp4 pools are refused)
POOL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class KDNSettings:
    """store:        store URLs / paths, fastest first (None: the default disk store under KDN_HOME).
    namespace:    tenant namespace of requests without ``extra_key``/``cache_salt`` (with them, a
                  namespace derived from both, see ``request_namespace``).
    codec:        how entries are stored (part of every key).
    block_tokens: entry size for prompts without chunk hints (a multiple of the page size).
    max_inflight: store-backs in flight before ``checkpoint`` waits for the oldest (slots stay locked
                  while a store reads them, so this bounds the pool they hold).
    reuse:        load stored chunks at new positions, re-rotated, into request-owned slots (opt-in,
                  approximate: see the README); off: exact entries only.
    """

    store: tuple[str, ...] | None = None
    namespace: str = "default"
    codec: str = "none"
    block_tokens: int = 256
    max_inflight: int = 16
    reuse: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str) or not self.namespace:
            raise ConfigError(f"KDNSettings.namespace must be a non-empty string, got {self.namespace!r}")
        check_codec(self.codec)
        for name in ("block_tokens", "max_inflight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"KDNSettings.{name} must be a positive int, got {value!r}")
        if not isinstance(self.reuse, bool):
            raise ConfigError(f"KDNSettings.reuse must be True or False, got {self.reuse!r}")

    @classmethod
    def from_env(cls, **overrides: Any) -> "KDNSettings":
        """Store, namespace, codec and reuse from KDN_STORE / KDN_NAMESPACE / KDN_CODEC / KDN_SGLANG_REUSE;
        the rest as given."""
        spec = env.store_spec()
        fields = dict(store=None if spec is None else tuple(spec), namespace=env.namespace(), codec=env.codec(),
                      reuse=env.sglang_reuse())
        return cls(**{**fields, **overrides})


def request_namespace(base: str, extra_key: str | None, cache_salt: str | None) -> str:
    """The KDN namespace of a request: ``base`` when it has neither ``extra_key`` (which carries the
    LoRA id) nor ``cache_salt``; else ``base`` joined with SGLang's own ``storage_namespace_seed``
    of both, which keeps absent, empty and joined values distinct."""
    from sglang.srt.mem_cache.utils import storage_namespace_seed

    seed = storage_namespace_seed(extra_key, cache_salt or None)
    return base if seed is None else f"{base}/sglang-ns-{seed}"


def unsupported(ctx) -> list[str]:
    """What the ``kdn`` backend cannot serve in this SGLang setup (``TreeCacheBuildContext``): one line each."""
    import sglang

    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    problems = []
    sa = ctx.server_args
    if sglang.__version__ != SGLANG_VERSION:
        problems.append(f"SGLang {sglang.__version__} (the backend is written against {SGLANG_VERSION} only)")
    if ctx.tp_size > 1 or (getattr(sa, "pp_size", 1) or 1) > 1:
        problems.append(f"tensor/pipeline parallelism (tp_size={ctx.tp_size}, pp_size={getattr(sa, 'pp_size', 1)}): "
                        "entries hold every KV head of every layer; run one GPU per server")
    arch = getattr(getattr(ctx.model_config, "attention_arch", None), "name", None)
    if arch == "MLA" or ctx.is_dsa:
        problems.append("MLA/DSA attention (compressed latent KV, not per-head K and V)")
    if ctx.is_hybrid_swa:
        problems.append("sliding-window hybrid models (their SWA pool is not kept in entries)")
    if ctx.is_hybrid_ssm:
        problems.append("Mamba/SSM hybrid models (recurrent state is not kept in entries)")
    if ctx.enable_hierarchical_cache:
        problems.append("--enable-hierarchical-cache (HiCache): kdn is the external tier; drop the flag")
    if ctx.disable_radix_cache:
        problems.append("--disable-radix-cache (kdn is a radix cache backend)")
    if ctx.params.is_eagle:
        problems.append("EAGLE speculative decoding (bigram radix keys)")
    kv_dtype = str(getattr(sa, "kv_cache_dtype", "auto") or "auto")
    if kv_dtype.startswith(("fp8", "fp4")):
        problems.append(f"--kv-cache-dtype {kv_dtype} (fp8/fp4 KV); use auto")
    pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    if type(pool) is not MHATokenToKVPool:
        problems.append(f"KV pool {type(pool).__name__} (only MHATokenToKVPool is supported)")
    elif pool.dtype not in POOL_DTYPES:
        problems.append(f"KV pool dtype {pool.dtype} (only float32, float16, bfloat16)")
    return problems


def check_supported(ctx) -> None:
    """Raise ConfigError listing everything :func:`unsupported` finds."""
    problems = unsupported(ctx)
    if problems:
        raise ConfigError("--radix-cache-backend kdn cannot serve this setup:\n  - " + "\n  - ".join(problems)
                          + "\nremove those options, or run without --radix-cache-backend kdn")
