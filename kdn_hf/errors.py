"""The kdn_hf exception hierarchy, rooted at :class:`KDNError`.

Building fails fast (bad config or input raises one of these at once, with a
message that says what was expected, what was found and how to fix it);
serving degrades (a bad stored entry is a logged miss, never an exception that
reaches the user).
"""

from __future__ import annotations


class KDNError(Exception):
    """Base class of every error kdn_hf raises on purpose."""


class ConfigError(KDNError, ValueError):
    """A configuration value is invalid (unknown mode, negative budget, ...)."""


class BlendUnsupportedError(ConfigError):
    """The model has something the blend cannot recompute exactly (an unknown attention type, missing
    pieces, a forward that differs from the layer runner's); reuse and full prefill still work."""


class InputError(KDNError, ValueError):
    """The caller passed input kdn_hf cannot use (empty chunk list, wrong type, ...)."""


class ContextTooLongError(InputError):
    """The composed prompt (plus the tokens to generate) exceeds the model's context window."""


class UnsupportedRopeError(KDNError, NotImplementedError):
    """The model's rotary embedding cannot be re-rotated exactly (e.g. dynamic NTK)."""


class KDNCacheError(KDNError, ValueError):
    """A KDNCache was fed tokens that do not extend the ids it holds."""


class ModelLoadError(KDNError, RuntimeError):
    """A model could not be found or loaded."""


class StoreError(KDNError, RuntimeError):
    """A store URL or directory cannot be opened (bad scheme, missing or unwritable path)."""


class CorruptEntryError(KDNError):
    """A stored entry failed its checksum, fingerprint or shape check.

    Raised by the entry decoder only; the store turns it into a logged miss,
    removes the entry and counts it, so callers never see it.
    """
