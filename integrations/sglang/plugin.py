"""The ``kdn`` backend's registration: an ``sglang.srt.plugins`` entry point and the factory.

SGLang calls every ``sglang.srt.plugins`` entry point in each of its processes
(``load_plugins``, scheduler processes included), so installing kdn_hf is enough
for ``--radix-cache-backend kdn``. The factory gets SGLang's
``TreeCacheBuildContext`` (server args, the real pools, the model config),
refuses what the backend cannot serve (``settings.unsupported``), and builds
``KDNRadixCache`` with the store, namespace and codec from ``KDN_STORE``,
``KDN_NAMESPACE`` and ``KDN_CODEC``.

The model fingerprint is computed from the checkpoint directory and the dtype
SGLang serves (``fingerprint_from_checkpoint``), so the keys equal those of a
HuggingFace process running the same checkpoint in the same dtype. SGLang's
``--dtype auto`` serves fp32 checkpoints in fp16: pass the dtype explicitly
(``--dtype float32``) to share entries with an fp32 HF process.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from kdn_hf.errors import ConfigError

BACKEND = "kdn"
log = logging.getLogger("kdn_hf.sglang")


def register() -> None:
    """Register the ``kdn`` radix-cache backend with SGLang (idempotent)."""
    from sglang.srt.mem_cache.registry import register_radix_cache_backend, registered_radix_cache_backends

    if BACKEND not in registered_radix_cache_backends():
        register_radix_cache_backend(BACKEND, create_kdn_cache)


def served_fingerprint(ctx, dtype) -> str:
    """The fingerprint digest of the model SGLang serves in ``dtype`` (its KV pool dtype)."""
    from kdn_hf.fingerprint import fingerprint_from_checkpoint

    model_dir = Path(getattr(ctx.model_config, "model_path", None) or ctx.server_args.model_path).expanduser()
    if not model_dir.is_dir():
        raise ConfigError(f"--radix-cache-backend kdn needs a local checkpoint directory (--model-path DIR) to "
                          f"fingerprint the model; {str(model_dir)!r} is not one (download it first)")
    return fingerprint_from_checkpoint(model_dir, dtype).digest


def create_kdn_cache(ctx):
    """SGLang's radix-cache factory for ``--radix-cache-backend kdn``."""
    from kdn_hf.store import open_store

    from kdn_hf.integrations.sglang.cache import KDNRadixCache
    from kdn_hf.integrations.sglang.settings import KDNSettings, check_supported

    check_supported(ctx)
    pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    settings = KDNSettings.from_env()
    page = ctx.params.page_size
    if settings.block_tokens % page:  # blocks are whole pages
        settings = dataclasses.replace(settings, block_tokens=page * max(1, settings.block_tokens // page))
    fingerprint = served_fingerprint(ctx, pool.dtype)
    rope_spec = None
    if settings.reuse:  # re-rotation must be exact for this model, or the server does not start
        from kdn_hf.rope import rope_spec_from_config

        rope_spec = rope_spec_from_config(ctx.model_config.hf_config)
    store = open_store(None if settings.store is None else list(settings.store))
    log.info("kdn radix cache: store %s, namespace %r, codec %s, fingerprint %s, dtype %s, reuse %s", store,
             settings.namespace, settings.codec, fingerprint, pool.dtype, settings.reuse)
    return KDNRadixCache(ctx.params, store=store, fingerprint=fingerprint, settings=settings, rope_spec=rope_spec)
