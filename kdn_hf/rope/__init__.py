"""RoPE for stored KV: what a model's rotary embedding is, and moving cached K to new positions.

- ``spec``:   :class:`RopeSpec` / :class:`RopeFrequencies`, the per-layer description re-rotation needs.
- ``rotate``: ``rerotate`` / ``rerotate_layer``, exact re-rotation of post-RoPE K by a position delta.
- ``probe``:  ``rope_spec_from_model``, reading the spec from a loaded transformers model.
- ``config``: ``rope_spec_from_config``, the same spec from the model's config alone.

Imports go one way: spec <- rotate, spec <- probe <- config.
"""

from kdn_hf.rope.config import rope_spec_from_config
from kdn_hf.rope.probe import rope_spec_from_model
from kdn_hf.rope.rotate import rerotate, rerotate_layer
from kdn_hf.rope.spec import BOUNDED_ROPE_TYPES, LAYOUTS, STATIC_ROPE_TYPES, RopeFrequencies, RopeSpec

__all__ = [
    "BOUNDED_ROPE_TYPES",
    "LAYOUTS",
    "STATIC_ROPE_TYPES",
    "RopeFrequencies",
    "RopeSpec",
    "rerotate",
    "rerotate_layer",
    "rope_spec_from_config",
    "rope_spec_from_model",
]
