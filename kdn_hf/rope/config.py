"""Reading a model's RoPE from its config alone, for engines that hold no transformers module.

An SGLang worker has the checkpoint's config but runs its own model classes;
``rope_spec_from_config`` gives it the spec the HF engine reads from the loaded
model, so both re-rotate stored K the same way.
"""

from __future__ import annotations

from kdn_hf.errors import UnsupportedRopeError
from kdn_hf.models import meta_skeleton
from kdn_hf.rope.probe import find_rotary_module, text_config, check_rope_config, spec_from_rotary_module
from kdn_hf.rope.spec import RopeSpec


def rope_spec_from_config(config) -> RopeSpec:
    """The RopeSpec ``rope_spec_from_model`` reads from the causal LM built from ``config``
    (a transformers config), without building that model's weights.

    The model's module tree is built on the meta device (no memory) to find the class of its
    rotary module; that one module is then built for real from the config (transformers'
    ``ROPE_INIT_FUNCTIONS`` run inside it) and read exactly as ``rope_spec_from_model``
    reads the model's own. Raises UnsupportedRopeError as ``rope_spec_from_model`` does.
    """
    skeleton = meta_skeleton(config)
    where = type(skeleton).__name__
    check_rope_config(config, where)
    rotary_cls = type(find_rotary_module(skeleton))
    tc = text_config(config)
    try:
        module = rotary_cls(config=tc)
    except TypeError as e:
        raise UnsupportedRopeError(
            f"{where}: its rotary module {rotary_cls.__name__} cannot be built from the config alone ({e}); "
            "read the spec from the loaded model with rope_spec_from_model(model)"
        ) from e
    return spec_from_rotary_module(module.eval(), config, where)
