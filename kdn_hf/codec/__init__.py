"""KV codecs: how a chunk's KV is stored (``CODECS``, by name).

- ``none``: model dtype, bit-exact.          ``fp16`` / ``bf16``: cast.
- ``int8``: K per-channel, V per-token.      ``int4`` / ``int4-g<N>``: KIVI group-wise, packed nibbles.
- ``entropy``: int4 codes, token-delta, zstd (CacheGen-style); same error as ``int4``, fewer bytes.

Each lossy codec's module documents its error bound. A codec name is part of
every store key and entry, so entries of different codecs never mix.
"""

from kdn_hf.codec.base import CODECS, Codec, check_codec, get_codec, layer_decoder, register
from kdn_hf.codec import cast, entropy, quant  # noqa: F401  (register the built-in codecs)

__all__ = ["CODECS", "Codec", "check_codec", "get_codec", "layer_decoder", "register"]
