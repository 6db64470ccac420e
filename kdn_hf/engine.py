"""KDN: the front door. Ingest documents once, compose their KV into any prompt.

    kdn = KDN.from_pretrained("smollm2-135m", store="~/.cache/kdn_hf/store")
    kdn.ingest([doc_a, doc_b])
    res = kdn.generate([system, doc_b, doc_a, question], max_new_tokens=64, mode="reuse")
    cache = kdn.prepare([system, doc_b, doc_a])          # a KDNCache for stock generate

Modes (all through one code path, so a benchmark compares like with like):

- ``full``:   ordinary prefill of the whole prompt; the store is not touched.
- ``prefix``: reuse only KV whose whole left context matches (like vLLM's and
  SGLang's prefix caches): entries keyed by the exact prefix; the rest is
  prefilled after it and stored back. Same answers as ``full``.
- ``reuse``:  every chunk's stored KV (computed on its own) re-rotated to its
  position in this prompt; misses are computed on their own and stored. No
  cross-chunk attention (``recompute_ratio=0``).
- ``blend``:  ``reuse`` plus selective recompute of ``recompute_ratio`` of the
  tokens (``kdn_hf.blend``).

In every mode the last chunk of ``generate`` (the question) is prefilled fresh.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from kdn_hf.blend import DEFAULT_SELECTION
from kdn_hf.cache import KDNCache
from kdn_hf.codec import check_codec
from kdn_hf.delivery import ChunkLoader, start_loading
from kdn_hf.compat import cache_kwarg
from kdn_hf.compute import compute_chunk_kv, prefill, stack_cache
from kdn_hf.errors import ConfigError, InputError
from kdn_hf.fingerprint import model_fingerprint
from kdn_hf.keys import make_key
from kdn_hf.kv import ChunkKV
from kdn_hf.prompt import Prompt, build_prompt, lead_in_ids, tokenize_chunk
from kdn_hf.result import GenerateResult, GenerateStats, PrepareStats
from kdn_hf.rope import RopeSpec, rerotate, rope_spec_from_model
from kdn_hf.store import KVStore, open_store

log = logging.getLogger("kdn_hf")

MODES = ("full", "prefix", "reuse", "blend")


class _FirstTokenClock(BaseStreamer):
    """Notes when generate emits its first new token (the second ``put``: the first is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def _check_mode(mode: str, recompute_ratio: float, selection: str = DEFAULT_SELECTION) -> float:
    """Validate; returns the ratio that applies (``recompute_ratio`` for blend, else 0)."""
    from kdn_hf.blend import get_selection

    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(recompute_ratio, bool) or not isinstance(recompute_ratio, (int, float)) or not (
        0.0 <= recompute_ratio <= 1.0
    ):
        raise ConfigError(f"recompute_ratio must be a number in [0, 1], got {recompute_ratio!r}")
    get_selection(selection)  # raises ConfigError listing the allowed names
    return float(recompute_ratio) if mode == "blend" else 0.0


class KDN:
    """A model, its tokenizer and a KV store, composing stored chunk KV into prompts.

    model:     a transformers causal LM (RoPE attention), in eval mode.
    tokenizer: its tokenizer.
    store:     a KVStore, a store URL / path, a list of them (a tier chain,
               fastest first), or None for the default disk store under KDN_HOME.
    namespace: tenant salt; entries of one namespace are invisible to another.
    """

    def __init__(self, model, tokenizer, store=None, *, namespace: str = "default", codec: str = "none") -> None:
        if not isinstance(namespace, str) or not namespace:
            raise ConfigError(f"namespace must be a non-empty string, got {namespace!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.store: KVStore = open_store(store)
        self.namespace = namespace
        self.codec = check_codec(codec)
        self.fingerprint = model_fingerprint(model)
        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.max_positions: int | None = getattr(text_cfg, "max_position_embeddings", None)
        self.lead_in: tuple[int, ...] = lead_in_ids(tokenizer)
        self._rope: RopeSpec | None = None
        self._deferred: list[tuple[str, ChunkKV]] | None = None  # store writes held back during generate

    @classmethod
    def from_pretrained(cls, name_or_path: str = "smollm2-135m", store=None, **kwargs) -> "KDN":
        """Load a bundled model (``"smollm2-135m"``) or a local model directory, offline."""
        from kdn_hf import models

        load_kw = {k: kwargs.pop(k) for k in ("dtype", "device", "attn_implementation") if k in kwargs}
        model, tokenizer = models.load(name_or_path, **load_kw)
        return cls(model, tokenizer, store, **kwargs)

    @property
    def rope_spec(self) -> RopeSpec:
        """The model's RoPE description; raises UnsupportedRopeError if K cannot be re-rotated exactly."""
        if self._rope is None:
            self._rope = rope_spec_from_model(self.model)
        return self._rope

    # ------------------------------------------------------------------ keys
    def chunk_key(self, ids: Sequence[int], *, kind: str = "chunk", context: Sequence[int] = ()) -> str:
        return make_key(
            fingerprint=self.fingerprint.digest,
            codec=self.codec,
            namespace=self.namespace,
            token_ids=ids,
            kind=kind,
            context_ids=context,
        )

    # ---------------------------------------------------------------- ingest
    def ingest(self, texts: Iterable, *, progress: bool | None = None) -> list[str]:
        """Compute and store each text's KV as one chunk; returns the keys, in order.

        Texts already stored are not computed again. A text longer than the
        model's context raises ContextTooLongError before anything is computed.
        """
        if isinstance(texts, (str, bytes)):
            raise InputError("ingest takes a list of texts; wrap a single text as [text]")
        ids_list = [tokenize_chunk(self.tokenizer, t, i) for i, t in enumerate(texts)]
        for i, ids in enumerate(ids_list):
            if self.max_positions and len(self.lead_in) + len(ids) > self.max_positions:
                from kdn_hf.errors import ContextTooLongError

                raise ContextTooLongError(
                    f"text {i} has {len(ids)} tokens, more than the model's {self.max_positions} positions; "
                    f"split it into smaller chunks (e.g. `kdn ingest --max-tokens 512`)"
                )
        keys = [self.chunk_key(ids, context=self.lead_in) for ids in ids_list]
        if self.lead_in:  # every prompt opens with the lead-in: store it too, so a warm prompt is all hits
            lead_key = self.chunk_key(self.lead_in)
            if not self.store.contains(lead_key):
                self._compute_and_store(self.lead_in, lead_key, ())
        show = progress if progress is not None else len(ids_list) > 1
        for ids, key in tqdm(list(zip(ids_list, keys)), desc="ingest", unit="chunk", disable=not show):
            if not self.store.contains(key):
                self._compute_and_store(ids, key, self.lead_in)
        return keys

    def _compute_and_store(self, ids: Sequence[int], key: str, context: Sequence[int]) -> ChunkKV:
        """Compute a chunk on its own after ``context`` (the lead-in, or nothing) and store it."""
        lead = torch.tensor(context, dtype=torch.long) if context else None
        chunk = compute_chunk_kv(self.model, torch.tensor(ids, dtype=torch.long), lead_in=lead)
        self._put(key, chunk)
        return chunk

    def _put(self, key: str, chunk: ChunkKV) -> None:
        """Store ``chunk``; inside ``generate`` the write waits until the answer is out (off the TTFT path)."""
        if self._deferred is not None:
            self._deferred.append((key, chunk))
        else:
            self.store.put(key, chunk, self.fingerprint.digest, codec=self.codec)

    def _flush_deferred(self) -> None:
        pending, self._deferred = self._deferred or [], None
        for key, chunk in pending:
            self.store.put(key, chunk, self.fingerprint.digest, codec=self.codec)

    # --------------------------------------------------------------- prepare
    def prepare(self, chunks: Sequence, *, mode: str = "blend", recompute_ratio: float = 0.15,
                selection: str = DEFAULT_SELECTION) -> KDNCache:
        """A KDNCache holding the KV of ``chunks`` (all of them) composed at their prompt positions.

        Pass it to ``model.generate`` with prompt ids that extend ``cache.token_ids``
        by at least one token (the question), e.g. ``prepare(chunks[:-1])``.
        ``recompute_ratio`` and ``selection`` (a name in ``kdn_hf.blend.SELECTIONS``) apply to
        ``mode="blend"`` only (``mode="reuse"`` is ratio 0; blend at ratio 0 is reuse).
        """
        ratio = _check_mode(mode, recompute_ratio, selection)
        prompt = build_prompt(self.tokenizer, chunks, max_positions=self.max_positions)
        return self._prepare(prompt, len(prompt.chunk_ids), mode, ratio, selection)

    def _prepare(self, prompt: Prompt, n_chunks: int, mode: str, ratio: float,
                 selection: str = DEFAULT_SELECTION) -> KDNCache:
        t0 = time.perf_counter()
        sub = Prompt(prompt.lead_in, prompt.chunk_ids[:n_chunks])
        stats = PrepareStats(mode=mode, chunks=n_chunks, tokens_total=len(sub))
        if mode == "full":
            cache = self._prepare_full(sub, stats)
        elif mode == "prefix":
            cache = self._prepare_prefix(sub, stats)
        else:
            # longrope switches every frequency once a sequence passes a length: check the whole prompt
            self.rope_spec.check_positions(len(prompt) - 1)
            cache = self._prepare_reuse(sub, stats, ratio if mode == "blend" else 0.0, selection)
        cache.token_ids = torch.tensor(sub.prompt_ids, dtype=torch.long)
        cache.chunk_spans = sub.spans
        stats.prepare_s = time.perf_counter() - t0
        cache.stats = stats
        return cache

    def _prepare_full(self, prompt: Prompt, stats: PrepareStats) -> KDNCache:
        cache = KDNCache()
        ids = prompt.prompt_ids
        if ids:
            prefill(self.model, torch.tensor(ids), torch.arange(len(ids)), cache=cache)
        stats.tokens_computed = len(ids)
        return cache

    def _fetch(self, key: str, ids: Sequence[int], stats: PrepareStats,
               loader: ChunkLoader | None = None) -> ChunkKV | None:
        chunk, tier = loader.get(key) if loader is not None else self.store.get(key, self.fingerprint.digest)
        if chunk is None:
            return None
        if chunk.token_ids.tolist() != list(ids) or not self._geometry_ok(chunk):
            log.warning("entry %s does not hold the ids/geometry its key promises; recomputing", key)
            self.store.note_corrupt(key)
            return None
        stats.hits[tier] = stats.hits.get(tier, 0) + 1
        stats.bytes_loaded += chunk.nbytes
        stats.tokens_reused += chunk.num_tokens
        return chunk

    def _geometry_ok(self, chunk: ChunkKV) -> bool:
        p = next(self.model.parameters())
        return chunk.kv.dtype == p.dtype and chunk.kv.shape[0] == self._num_layers()

    def _num_layers(self) -> int:
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        return cfg.num_hidden_layers

    def _prepare_reuse(self, prompt: Prompt, stats: PrepareStats, ratio: float = 0.0,
                       selection: str = DEFAULT_SELECTION) -> KDNCache:
        device = self.model.device
        units: list[tuple[tuple[int, ...], tuple[int, ...]]] = []  # (ids, context they are computed after)
        if prompt.lead_in:
            units.append((prompt.lead_in, ()))
        units += [(ids, prompt.lead_in) for ids in prompt.chunk_ids]
        keys = [self.chunk_key(ids, context=context) for ids, context in units]
        # fetch + decode of the next chunks runs in the background while this loop re-rotates (kdn_hf.delivery)
        with start_loading(self.store, keys, self.fingerprint.digest) as loader:
            kv = self._compose(units, keys, loader, stats, device)
        if kv is None:
            return KDNCache()
        at = kv.shape[3]
        ids = torch.tensor(prompt.prompt_ids, dtype=torch.long)
        if ratio > 0:  # kv is a fresh buffer (never a stored entry): blend it in place
            from kdn_hf.blend import get_selection, recompute

            res = recompute(self.model, kv, ids, prompt.spans, ratio, get_selection(selection))
            stats.tokens_recomputed = int(res.selected.numel())
        return KDNCache(kv, torch.arange(at), ids)

    def _compose(self, units, keys, loader: ChunkLoader, stats: PrepareStats, device) -> torch.Tensor | None:
        """The prompt's KV [layers, 2, kv_heads, tokens, head_dim]: each unit's KV (stored, or computed and
        stored) re-rotated to its prompt position and written once into one buffer; None for no units."""
        fetched: dict[str, ChunkKV] = {}
        total = sum(len(ids) for ids, _ in units)
        out: torch.Tensor | None = None
        at = 0
        for (ids, context), key in zip(units, keys):
            chunk = fetched.get(key)
            if chunk is not None:  # the same chunk again in this prompt
                stats.tokens_reused += len(ids)
            else:
                chunk = self._fetch(key, ids, stats, loader)
                if chunk is None:
                    chunk = self._compute_and_store(ids, key, context)
                    stats.misses += 1
                    stats.tokens_computed += len(ids)
                fetched[key] = chunk
            target = torch.arange(at, at + len(ids))
            kv = chunk.kv.to(device)
            if out is None:
                out = kv.new_empty(*kv.shape[:3], total, kv.shape[4])
            dst = out[:, :, :, at : at + len(ids)]
            if torch.equal(chunk.positions, target):
                dst.copy_(kv)
            else:
                dst[:, 0] = rerotate(kv[:, 0], chunk.positions, target, self.rope_spec)
                dst[:, 1] = kv[:, 1]
            at += len(ids)
        return out

    def _prepare_prefix(self, prompt: Prompt, stats: PrepareStats) -> KDNCache:
        units = ([prompt.lead_in] if prompt.lead_in else []) + list(prompt.chunk_ids)
        keys, contexts, ctx = [], [], []
        for ids in units:
            keys.append(self.chunk_key(ids, kind="prefix", context=ctx))
            contexts.append(len(ctx))
            ctx = ctx + list(ids)
        parts, n_hit = [], 0
        for key, ids, start in zip(keys, units, contexts):
            chunk = self._fetch(key, ids, stats)
            if chunk is None:
                break
            if not torch.equal(chunk.positions, torch.arange(start, start + len(ids))):
                log.warning("prefix entry %s sits at other positions than its key promises; recomputing", key)
                break
            parts.append(chunk.kv.to(self.model.device))
            n_hit += 1
        if parts:
            kv = torch.cat(parts, dim=3)
            hit_len = kv.shape[3]
            cache = KDNCache(kv, torch.arange(hit_len), torch.tensor(ctx[:hit_len], dtype=torch.long))
        else:
            hit_len, cache = 0, KDNCache()
        rest = ctx[hit_len:]
        if rest:
            prefill(self.model, torch.tensor(rest), torch.arange(hit_len, len(ctx)), cache=cache)
            full = stack_cache(cache)
            for key, ids, start in zip(keys[n_hit:], units[n_hit:], contexts[n_hit:]):
                chunk = ChunkKV(
                    kv=full[:, :, :, start : start + len(ids)].contiguous(),
                    positions=torch.arange(start, start + len(ids)),
                    token_ids=torch.tensor(ids, dtype=torch.long),
                )
                self._put(key, chunk)
                stats.misses += 1
            stats.tokens_computed += len(rest)
        return cache

    # -------------------------------------------------------------- generate
    def generate(
        self,
        chunks: Sequence,
        *,
        max_new_tokens: int = 64,
        mode: str = "blend",
        recompute_ratio: float = 0.15,
        selection: str = DEFAULT_SELECTION,
        **generate_kwargs,
    ) -> GenerateResult:
        """Answer the prompt made of ``chunks``; the last chunk (the question) is prefilled fresh.

        Extra keyword arguments go to ``model.generate`` (greedy by default).
        """
        t0 = time.perf_counter()
        ratio = _check_mode(mode, recompute_ratio, selection)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        prompt = build_prompt(self.tokenizer, chunks, max_positions=self.max_positions, reserve=max_new_tokens)
        ids = prompt.prompt_ids
        if mode == "full":
            cache = None
            stats = GenerateStats(mode=mode, chunks=len(prompt.chunk_ids), tokens_total=len(ids))
        else:
            self._deferred = []
            try:
                cache = self._prepare(prompt, len(prompt.chunk_ids) - 1, mode, ratio, selection)
            except BaseException:
                self._flush_deferred()
                raise
            stats = GenerateStats(**vars(cache.stats))
            stats.chunks = len(prompt.chunk_ids)
            stats.tokens_total = len(ids)
        stats.tokens_computed += len(ids) - (cache.get_seq_length() if cache is not None else 0)
        stats.recompute_ratio = ratio
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False}
        if self.tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        kwargs.update(generate_kwargs)
        clock = None
        if kwargs.get("num_beams", 1) == 1 and "streamer" not in kwargs:
            clock = kwargs["streamer"] = _FirstTokenClock()
        if cache is not None:
            kwargs[cache_kwarg(self.model)] = cache
        input_ids = torch.tensor([ids], device=self.model.device)
        try:
            with torch.inference_mode():
                out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
            end = time.perf_counter()
        finally:
            self._flush_deferred()  # chunks computed for this request are stored after it answered
        new = out[0, len(ids):].tolist()
        stats.tokens_generated = len(new)
        stats.total_s = end - t0
        stats.ttft_s = (clock.first_token_at - t0) if clock and clock.first_token_at else stats.total_s
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return GenerateResult(text=text, token_ids=new, prompt_ids=ids, stats=stats)
