"""Differences between transformers versions, detected once, in one place.

transformers 5.24 renamed the cache argument of ``forward``/``generate`` from
``past_key_values`` to ``cache``; earlier 5.x releases only know the old name.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def _cache_kwarg_for(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(f"{cls.__name__}.forward takes neither `cache` nor `past_key_values`; it cannot use a KV cache")


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword under which ``model.forward``/``model.generate`` take a Cache."""
    return _cache_kwarg_for(type(model))


def output_cache(outputs) -> object:
    """The cache object of a model output, under either name."""
    for name in ("cache", "past_key_values"):
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    return None
