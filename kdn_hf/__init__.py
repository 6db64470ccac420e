"""kdn_hf: a Knowledge Delivery Network for LLM inference.

Turn documents into KV caches once, keep them in a tiered store, and compose
any set of them at any position in a prompt (exact RoPE re-rotation), through
stock ``model.generate(past_key_values=KDNCache(...))``.
"""

from kdn_hf.cache import KDNCache
from kdn_hf.engine import KDN, MODES
from kdn_hf.errors import (
    BlendUnsupportedError,
    ConfigError,
    ContextTooLongError,
    CorruptEntryError,
    InputError,
    KDNError,
    ModelLoadError,
    StoreError,
    UnsupportedRopeError,
)
from kdn_hf.result import GenerateResult, GenerateStats, PrepareStats

__version__ = "0.1.0"

__all__ = [
    "KDN",
    "KDNCache",
    "MODES",
    "GenerateResult",
    "GenerateStats",
    "PrepareStats",
    "KDNError",
    "BlendUnsupportedError",
    "ConfigError",
    "InputError",
    "ContextTooLongError",
    "UnsupportedRopeError",
    "ModelLoadError",
    "StoreError",
    "CorruptEntryError",
]
