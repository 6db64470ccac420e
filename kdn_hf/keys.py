"""Store keys: ``xxh3_128`` over everything that changes a chunk's KV bytes.

A key covers the model fingerprint (``kdn_hf.fingerprint``), the codec, a
namespace (tenant salt), a kind (``chunk``: a chunk computed on its own,
position-independent; ``prefix``: a chunk computed after an exact prefix,
valid only after that prefix; ``blend``: the blended KV of a whole prompt,
with how it was blended) and the token ids. Every field is
length-prefixed, so no two field lists hash the same bytes. Keys are hex
digests: they carry no plaintext. Never Python's ``hash()`` (salted per
process).
"""

from __future__ import annotations

import struct
from typing import Sequence

import numpy as np
import xxhash

from kdn_hf.errors import InputError

KEY_VERSION = b"kdn-key-v1"
KINDS = ("chunk", "prefix", "blend")


def _field(h: xxhash.xxh3_128, data: bytes) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def make_key(
    *,
    fingerprint: str,
    codec: str,
    namespace: str,
    token_ids: Sequence[int] | np.ndarray,
    kind: str = "chunk",
    context_ids: Sequence[int] | np.ndarray = (),
    variant: str = "",
) -> str:
    """The store key of a chunk's KV, as 32 lowercase hex characters.

    token_ids:   the chunk's ids, [tokens] ints.
    context_ids: ids the chunk was computed after (a lead-in such as BOS, or
                 for ``prefix`` keys the exact prefix); empty for none.
    variant:     for ``blend`` keys (required there, refused elsewhere): how the KV was
                 blended (recompute ratio, selection and its parameters).
    """
    if kind not in KINDS:
        raise InputError(f"key kind must be one of {KINDS}, got {kind!r}")
    if (kind == "blend") != bool(variant):
        raise InputError(f"a {kind!r} key takes {'a' if kind == 'blend' else 'no'} variant, got {variant!r}")
    if not namespace or not isinstance(namespace, str):
        raise InputError(f"namespace must be a non-empty string, got {namespace!r}")
    h = xxhash.xxh3_128()
    _field(h, KEY_VERSION)
    _field(h, kind.encode())
    _field(h, fingerprint.encode())
    _field(h, codec.encode())
    _field(h, namespace.encode("utf-8"))
    _field(h, np.asarray(context_ids, dtype="<i8").tobytes())
    _field(h, np.asarray(token_ids, dtype="<i8").tobytes())
    if variant:  # blend keys only: chunk and prefix keys hash exactly the fields they always did
        _field(h, variant.encode("utf-8"))
    return h.hexdigest()
