"""The stored entry format: one ChunkKV as self-checking safetensors bytes.

An entry is the safetensors serialization (never pickle) of::

    kv*        the codec's tensors for ChunkKV.kv (codec "none": "kv", the raw
               [layers, 2, kv_heads, tokens, head_dim] tensor in model dtype)
    positions  [tokens] int64
    token_ids  [tokens] int64

with ``__metadata__`` (all strings)::

    format      "kdn_hf.entry"        version  FORMAT_VERSION
    key         the store key         fingerprint  the model fingerprint
    codec       a name in CODECS      dtype    kv dtype ("bfloat16", ...)
    shape       kv shape "L,2,H,T,D"  num_tokens  T
    meta.<k>    ChunkKV.meta[k]       checksum xxh3_64 hex, see _checksum

The checksum covers every tensor's name, dtype, shape and raw bytes (in
sorted name order) and every metadata field but itself, so any bit flip in
tensor data or metadata is caught. ``decode_entry`` raises CorruptEntryError
for anything it cannot fully trust; KVStore turns that into a logged miss.
``open_entry`` does the same checks but leaves the kv encoded, for decoding
layer by layer (``OpenEntry.layers``, layer-wise delivery).

Codecs live in ``kdn_hf.codec`` (``CODECS`` maps a name to a :class:`Codec`:
encode kv to named tensors, decode them back); they are re-exported here.
"""

from __future__ import annotations

import json
import struct
import safetensors
import safetensors.torch
from safetensors.torch import load as load_safetensors
import torch
import xxhash

from kdn_hf.codec import CODECS, Codec, get_codec, layer_decoder  # noqa: F401  (re-exported)
from kdn_hf.errors import ConfigError, CorruptEntryError, InputError
from kdn_hf.kv import ChunkKV

FORMAT = "kdn_hf.entry"
FORMAT_VERSION = "1"
META_PREFIX = "meta."

#: kv dtypes an entry may hold, by the name written in the metadata
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """xxh3_64 hex over tensors (sorted by name: name, dtype, shape, bytes) and metadata (sorted, minus checksum)."""
    h = xxhash.xxh3_64()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    for k in sorted(metadata):
        if k != "checksum":
            h.update(f"{k}={metadata[k]}\n".encode())
    return h.hexdigest()


def _shape_str(shape: tuple[int, ...]) -> str:
    return ",".join(str(d) for d in shape)


def encode_entry(key: str, chunk: ChunkKV, fingerprint: str, codec: str = "none") -> bytes:
    """Serialize ``chunk`` as an entry stored under ``key`` for the model ``fingerprint``.

    Raises ConfigError for an unknown codec or a kv dtype outside DTYPES, and
    InputError for non-string ChunkKV.meta items.
    """
    if get_codec(codec) is None:
        raise ConfigError(f"unknown codec {codec!r}; available: {sorted(CODECS)}")
    kv = chunk.kv.detach().to("cpu").contiguous()
    if kv.dtype not in _DTYPE_NAMES:
        raise ConfigError(f"kv dtype {kv.dtype} cannot be stored; supported: {sorted(DTYPES)}")
    for k, v in chunk.meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InputError(f"ChunkKV.meta must map str to str, got {k!r}: {v!r}")
    tensors = {name: t.contiguous() for name, t in get_codec(codec).encode(kv).items()}
    if not tensors or not all(name.startswith("kv") for name in tensors):
        raise ConfigError(f"codec {codec!r} must return tensors named 'kv...', got {sorted(tensors)}")
    tensors["positions"] = chunk.positions.detach().to("cpu", torch.int64).contiguous()
    tensors["token_ids"] = chunk.token_ids.detach().to("cpu", torch.int64).contiguous()
    metadata = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "key": key,
        "fingerprint": fingerprint,
        "codec": codec,
        "dtype": _DTYPE_NAMES[kv.dtype],
        "shape": _shape_str(tuple(kv.shape)),
        "num_tokens": str(chunk.num_tokens),
    }
    metadata.update({META_PREFIX + k: v for k, v in chunk.meta.items()})
    metadata["checksum"] = _checksum(tensors, metadata)
    return safetensors.torch.save(tensors, metadata)


def read_metadata(data: bytes) -> dict[str, str]:
    """The entry's metadata (unverified: check it with decode_entry); raises CorruptEntryError."""
    return _read_metadata(bytes(data))


def _read_metadata(data: bytes) -> dict[str, str]:
    """Parse the safetensors header ourselves: strict JSON, string-only metadata."""
    if len(data) < 8:
        raise CorruptEntryError(f"entry is {len(data)} bytes, shorter than the 8-byte safetensors header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise CorruptEntryError(f"entry header claims {n} bytes but only {len(data) - 8} follow (truncated?)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptEntryError(f"entry header is not valid JSON: {e}") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptEntryError("entry header has no string __metadata__; not a kdn_hf entry")
    return meta


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError as e:
        raise CorruptEntryError(f"entry shape {text!r} is not a comma-separated list of ints") from e
    if len(shape) != 5 or shape[1] != 2 or min(shape) < 0:
        raise CorruptEntryError(f"entry shape {shape} is not [layers, 2, kv_heads, tokens, head_dim]")
    return shape


class OpenEntry:
    """A verified entry whose kv is not decoded yet (see :func:`open_entry`).

    key, codec, dtype, shape ([layers, 2, kv_heads, tokens, head_dim]), positions, token_ids, meta:
    from the entry. ``decode()`` gives the ChunkKV (whole decode, exactly ``decode_entry``'s);
    ``layers(start, stop)`` gives kv[start:stop] only, decoding just those layers when the codec
    can (``Codec.layers``; the first call prepares the codec's per-layer decoder, later calls
    reuse it). Both raise CorruptEntryError for tensors that cannot make the metadata's kv.
    """

    def __init__(self, *, key: str, codec: str, dtype: torch.dtype, shape: tuple[int, ...],
                 tensors: dict[str, torch.Tensor], positions: torch.Tensor, token_ids: torch.Tensor,
                 meta: dict[str, str], device: str | torch.device) -> None:
        self.key, self.codec, self.dtype, self.shape = key, codec, dtype, shape
        self.positions, self.token_ids, self.meta, self.device = positions, token_ids, meta, device
        self._tensors = tensors
        self._decode_range = None

    @property
    def num_layers(self) -> int:
        return self.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded kv (what ``ChunkKV.nbytes`` will say)."""
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()

    def _codec_call(self, fn, *args):
        try:
            return fn(*args)
        except (RuntimeError, ValueError, IndexError) as e:  # a forged entry whose tensors cannot make the shape
            raise CorruptEntryError(f"entry kv cannot be decoded by codec {self.codec!r}: {e}") from e

    def _check(self, kv: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if kv.dtype != self.dtype or tuple(kv.shape) != shape:
            raise CorruptEntryError(
                f"entry kv is {kv.dtype} {tuple(kv.shape)} but its metadata says {self.dtype} {shape}"
            )
        return kv

    def prepare_layers(self) -> None:
        """Check the codec's tensors and build its per-layer decoder now (done by the first ``layers``)."""
        if self._decode_range is None:
            self._decode_range = self._codec_call(
                layer_decoder, get_codec(self.codec), self._tensors, self.dtype, self.shape)

    def codec_tensors(self, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """The codec's stored tensors (``kv*``; see the module docstring), unverified by the codec,
        on ``device`` (default: the entry's). For decoders that read the codec's layout themselves
        (``kdn_hf.kernels.QuantKV.from_tensors``); the dict is new, the tensors may be shared."""
        return {name: t if device is None else t.to(device) for name, t in self._tensors.items()}

    def layers(self, start: int, stop: int) -> torch.Tensor:
        """kv[start:stop] ([stop - start, 2, kv_heads, tokens, head_dim]), on the entry's device."""
        self.prepare_layers()
        kv = self._codec_call(self._decode_range, start, stop)
        return self._check(kv, (stop - start, *self.shape[1:])).to(self.device)

    def decode(self) -> ChunkKV:
        kv = self._codec_call(get_codec(self.codec).decode, self._tensors, self.dtype, self.shape)
        kv = self._check(kv, self.shape)
        return ChunkKV(kv=kv.to(self.device), positions=self.positions.to(self.device),
                       token_ids=self.token_ids.to(self.device), meta=self.meta)


def open_entry(data: bytes, *, key: str, fingerprint: str, device: str | torch.device = "cpu") -> OpenEntry:
    """Parse and verify an entry (everything ``decode_entry`` checks but the codec's own tensors),
    leaving its kv encoded: see :class:`OpenEntry`. Raises CorruptEntryError like ``decode_entry``."""
    data = bytes(data)
    meta = _read_metadata(data)
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CorruptEntryError(
            f"entry format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this kdn_hf reads {FORMAT!r} version {FORMAT_VERSION!r}"
        )
    try:
        tensors = load_safetensors(data)  # safetensors: a flat tensor format, no pickle
    except safetensors.SafetensorError as e:
        raise CorruptEntryError(f"entry tensors cannot be read: {e}") from e
    if _checksum(tensors, meta) != meta.get("checksum"):
        raise CorruptEntryError("entry checksum mismatch: the stored bytes were altered or damaged")
    if meta.get("key") != key:
        raise CorruptEntryError(f"entry was stored for key {meta.get('key')!r}, asked for {key!r}")
    if meta.get("fingerprint") != fingerprint:
        raise CorruptEntryError(
            f"entry fingerprint {meta.get('fingerprint')!r} differs from the model's {fingerprint!r}"
        )
    codec = get_codec(meta.get("codec", ""))
    if codec is None:
        raise CorruptEntryError(f"entry codec {meta.get('codec')!r} is unknown; available: {sorted(CODECS)}")
    dtype = DTYPES.get(meta.get("dtype", ""))
    if dtype is None:
        raise CorruptEntryError(f"entry dtype {meta.get('dtype')!r} is not one of {sorted(DTYPES)}")
    shape = _parse_shape(meta.get("shape", ""))
    if meta.get("num_tokens") != str(shape[3]):
        raise CorruptEntryError(f"entry num_tokens {meta.get('num_tokens')!r} disagrees with shape {shape}")
    positions, token_ids = tensors.pop("positions", None), tensors.pop("token_ids", None)
    for name, t in (("positions", positions), ("token_ids", token_ids)):
        if t is None or t.dtype != torch.int64 or tuple(t.shape) != (shape[3],):
            found = None if t is None else (t.dtype, tuple(t.shape))
            raise CorruptEntryError(f"entry {name} should be int64 [{shape[3]}], found {found}")
    tensors = {name: t.to(device) for name, t in tensors.items()}
    user_meta = {k[len(META_PREFIX) :]: v for k, v in meta.items() if k.startswith(META_PREFIX)}
    return OpenEntry(key=key, codec=meta["codec"], dtype=dtype, shape=shape, tensors=tensors,
                     positions=positions, token_ids=token_ids, meta=user_meta, device=device)


def decode_entry(data: bytes, *, key: str, fingerprint: str, device: str | torch.device = "cpu") -> ChunkKV:
    """Parse and verify an entry; return its ChunkKV on ``device``.

    Raises CorruptEntryError (saying what failed) when the bytes are
    truncated or unparsable, the checksum fails, the key or fingerprint is
    not the one asked for, the codec is unknown, or tensors disagree with the
    metadata.
    """
    return open_entry(data, key=key, fingerprint=fingerprint, device=device).decode()
