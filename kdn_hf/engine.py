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
from kdn_hf.delivery import ChunkLoader, Composition, LayerSource, start_loading
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


def _layer_slicer(kv: torch.Tensor):
    """``layers(start, stop)`` of a computed chunk's kv (delivery's LayerSource.layers)."""
    return lambda start, stop: kv[start:stop]


class KDN:
    """A model, its tokenizer and a KV store, composing stored chunk KV into prompts.

    model:     a transformers causal LM (RoPE attention), in eval mode.
    tokenizer: its tokenizer.
    store:     a KVStore, a store URL / path, a list of them (a tier chain,
               fastest first), or None for the default disk store under KDN_HOME.
    namespace: tenant salt; entries of one namespace are invisible to another.
    codec:     how entries are stored (``kdn_hf.codec``; part of every key).
    lead_in:   optional text (or ids) every chunk is computed after, following BOS, e.g. the
               system prompt your prompts open with ("offline KV editing" in the CacheBlend
               paper): chunks then carry attention to it. Part of every chunk key. A chunk equal
               to the lead-in itself is computed after BOS only. None: BOS only.
    store_blends: also store the blended KV of each ``generate`` prompt in ``blend`` mode (with a
               selection given by name) under a ``blend`` key of its ids, question included, and
               the ratio and selection: the same prompt again is then one store hit, with no
               compose and no recompute. Off by default: an entry is the whole prompt's KV.
    """

    def __init__(self, model, tokenizer, store=None, *, namespace: str = "default", codec: str = "none",
                 lead_in=None, store_blends: bool = False) -> None:
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
        self.lead_in: tuple[int, ...] = lead_in_ids(tokenizer)  # BOS (or nothing): opens every prompt
        #: ids every chunk is computed after (``lead_in`` plus the optional lead-in text)
        self.lead_in_text: tuple[int, ...] = () if lead_in is None else tokenize_chunk(tokenizer, lead_in)
        self.chunk_context: tuple[int, ...] = self.lead_in + self.lead_in_text
        self._rope: RopeSpec | None = None
        self._deferred: list[tuple[str, ChunkKV]] | None = None  # store writes held back during generate
        if not isinstance(store_blends, bool):
            raise ConfigError(f"store_blends must be True or False, got {store_blends!r}")
        self.store_blends = store_blends

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
    def chunk_key(self, ids: Sequence[int], *, kind: str = "chunk", context: Sequence[int] = (),
                  variant: str = "") -> str:
        return make_key(
            fingerprint=self.fingerprint.digest,
            codec=self.codec,
            namespace=self.namespace,
            token_ids=ids,
            kind=kind,
            context_ids=context,
            variant=variant,
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
            if self.max_positions and len(self.context_of(ids)) + len(ids) > self.max_positions:
                from kdn_hf.errors import ContextTooLongError

                raise ContextTooLongError(
                    f"text {i} has {len(ids)} tokens, more than the model's {self.max_positions} positions; "
                    f"split it into smaller chunks (e.g. `kdn ingest --max-tokens 512`)"
                )
        keys = [self.chunk_key(ids, context=self.context_of(ids)) for ids in ids_list]
        if self.lead_in:  # every prompt opens with the lead-in: store it too, so a warm prompt is all hits
            lead_key = self.chunk_key(self.lead_in)
            if not self.store.contains(lead_key):
                self._compute_and_store(self.lead_in, lead_key, ())
        show = progress if progress is not None else len(ids_list) > 1
        for ids, key in tqdm(list(zip(ids_list, keys)), desc="ingest", unit="chunk", disable=not show):
            if not self.store.contains(key):
                self._compute_and_store(ids, key, self.context_of(ids))
        return keys

    def context_of(self, ids: Sequence[int]) -> tuple[int, ...]:
        """The ids chunk ``ids`` is computed after: BOS plus the lead-in text, or BOS alone for the
        lead-in text itself (which then sits where it is computed, at the start of a prompt)."""
        return self.lead_in if tuple(ids) == self.lead_in_text else self.chunk_context

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
                selection: str = DEFAULT_SELECTION, query=None, reserve: int = 0) -> KDNCache:
        """A KDNCache holding the KV of ``chunks`` (all of them) composed at their prompt positions.

        Pass it to ``model.generate`` with prompt ids that extend ``cache.token_ids``
        by at least one token (the question), e.g. ``prepare(chunks[:-1])``.
        ``recompute_ratio`` and ``selection`` (a name in ``kdn_hf.blend.SELECTIONS``) apply to
        ``mode="blend"`` only (``mode="reuse"`` is ratio 0; blend at ratio 0 is reuse).
        ``query`` (text or ids): the question that will follow, if known. Question-aware
        selections (``"kdn"``) use it to choose what to recompute; the cache still covers
        ``chunks`` only. Without it they fall back to ranking by deviation.
        ``reserve``: room for that many tokens appended later (question + generated tokens), written
        into the cache in place rather than by copying every layer per step (``reuse``/``blend``).
        """
        ratio = _check_mode(mode, recompute_ratio, selection)
        if not isinstance(reserve, int) or reserve < 0:
            raise ConfigError(f"reserve must be a non-negative int (tokens to make room for), got {reserve!r}")
        parts = list(chunks) if query is None or isinstance(chunks, (str, bytes)) else [*chunks, query]
        prompt = build_prompt(self.tokenizer, parts, max_positions=self.max_positions)
        n = len(prompt.chunk_ids) - (query is not None)
        q = prompt.chunk_ids[-1] if query is not None else ()
        return self._prepare(prompt, n, mode, ratio, selection, query=q, reserve=reserve)

    def _prepare(self, prompt: Prompt, n_chunks: int, mode: str, ratio: float,
                 selection: str = DEFAULT_SELECTION, query: Sequence[int] = (),
                 keep_query: bool = False, reserve: int = 0, first_token: bool = False) -> KDNCache:
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
            cache = self._prepare_reuse(sub, stats, ratio if mode == "blend" else 0.0, selection,
                                        query=query, keep_query=keep_query, reserve=reserve,
                                        first_token=first_token)
        if mode in ("full", "prefix"):
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
               loader: ChunkLoader | None = None, positions: torch.Tensor | None = None) -> ChunkKV | None:
        """The entry under ``key`` (a counted hit), or None: a miss, or an entry that does not hold ``ids``
        (at ``positions``, where given) in the model's geometry, which is counted corrupt and removed."""
        chunk, tier = loader.get(key) if loader is not None else self.store.get(key, self.fingerprint.digest)
        if chunk is None:
            return None
        if (chunk.token_ids.tolist() != list(ids) or not self._geometry_ok(chunk)
                or (positions is not None and not torch.equal(chunk.positions.cpu(), positions))):
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
                       selection: str = DEFAULT_SELECTION, query: Sequence[int] = (),
                       keep_query: bool = False, reserve: int = 0, first_token: bool = False) -> KDNCache:
        """Compose (and, for ratio > 0, blend) the KV of ``prompt``.

        query: the question that follows the prompt (ids), or empty. When blending, it is computed
               with the context (its attention guides question-aware selections); with
               ``keep_query`` the cache then also covers all of it but its last token (stock generate
               feeds that one), else the cache covers the prompt only.
        reserve: spare slots after the cached tokens, filled in place by what generate appends.
        first_token: (blend with ``keep_query``) the cache covers the whole question, and the next
               token's logits [vocab] (from the recompute's last row) are left in ``cache.next_logits``.
        """
        device = self.model.device
        units: list[tuple[tuple[int, ...], tuple[int, ...]]] = []  # (ids, context they are computed after)
        if prompt.lead_in:
            units.append((prompt.lead_in, ()))
        units += [(ids, self.context_of(ids)) for ids in prompt.chunk_ids]
        keys = [self.chunk_key(ids, context=context) for ids, context in units]
        query = tuple(query) if ratio > 0 else ()
        ids = torch.tensor(list(prompt.prompt_ids) + list(query), dtype=torch.long)
        blend_key = None
        if self.store_blends and query and keep_query and isinstance(selection, str):
            # the whole prompt's blended KV, question but its last token included (stock generate feeds that)
            from kdn_hf.blend import get_selection

            params = sorted((k, repr(v)) for k, v in vars(get_selection(selection)).items())
            # chunks computed after the lead-in text blend differently: it is part of the key
            blend_key = self.chunk_key(ids.tolist(), kind="blend", context=self.chunk_context,
                                       variant=f"ratio={ratio!r};{selection};{params}")
            cache = self._blend_hit(blend_key, ids[:-1], stats, device, reserve)
            if cache is not None:
                return cache
        blend = None
        first_layer = 0
        logits: torch.Tensor | None = None  # next-token logits from the blend's last row (first_token)
        if ratio > 0:  # kv is a fresh buffer (never a stored entry): blend it in place
            from kdn_hf.blend import get_selection, recompute

            sel = get_selection(selection)
            first_layer = sel.fresh_layers(bool(query))  # overwritten for every token: not composed

            def blend(kv, wait_layer):  # reads layer l of kv only after wait_layer(l)
                nonlocal logits
                res = recompute(self.model, kv[:, :, :, :len(ids)], ids, prompt.spans, ratio, sel,
                                wait_layer=wait_layer, query_rows=len(query),
                                last_hidden=first_token and keep_query and bool(query))
                stats.tokens_recomputed = int(res.selected.numel())
                context = len(ids) - len(query)
                if context and res.layer_rows:
                    stats.recompute_share = sum(res.layer_rows) / (len(res.layer_rows) * context)
                logits = None if res.last_hidden is None else self._lm_head(res.last_hidden)

        # fetches start now, in the background; composing then runs layer by layer in the background
        # while the blend reads the layers already composed (kdn_hf.delivery)
        with start_loading(self.store, keys, self.fingerprint.digest, decode=not self.layerwise) as loader:
            composed = self._compose(units, keys, loader, stats, device, first_layer=first_layer,
                                     extra=len(query) + reserve)
        if composed is None:
            return KDNCache()
        kv = composed.kv
        composed.run(blend)
        at = len(prompt)
        if query and keep_query:
            n = len(query) if logits is not None else len(query) - 1
            at += n
            stats.tokens_computed += n
        cache = KDNCache(kv[:, :, :, :at], torch.arange(at), ids[:at], capacity=kv)
        cache.next_logits = logits
        if blend_key is not None:
            # stored after the answer (generate defers it); generate only writes the slots after these
            held = len(ids) - 1
            self._put(blend_key, ChunkKV(kv[:, :, :, :held], torch.arange(held), ids[:held]))
        return cache

    def _blend_hit(self, key: str, ids: torch.Tensor, stats: PrepareStats, device, reserve: int) -> KDNCache | None:
        """The stored blended KV of a whole prompt (``store_blends``) as a KDNCache with room for ``reserve``
        more tokens, or None on a miss. An entry that does not hold exactly ``ids`` at positions
        0..n-1 in the model's geometry is counted corrupt, removed and treated as a miss.

        ids: [n] int64 the prompt's ids but the question's last token.
        """
        n = len(ids)
        chunk = self._fetch(key, ids.tolist(), stats, positions=torch.arange(n))
        if chunk is None:
            return None
        buf = torch.empty(*chunk.kv.shape[:3], n + 1 + reserve, chunk.kv.shape[4], dtype=chunk.kv.dtype,
                          device=device)
        buf[:, :, :, :n] = chunk.kv
        return KDNCache(buf[:, :, :, :n], torch.arange(n), ids, capacity=buf)

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits [vocab] float32 from the last layer's output [hidden] of one row
        (as the model computes them: kdn_hf.blend.runner.LayerRunner.logits)."""
        from kdn_hf.blend.runner import layer_runner

        return layer_runner(self.model).logits(hidden)

    #: generation settings that change which token greedy decoding picks first (any non-default one
    #: sends generate down the stock path)
    _FIRST_TOKEN_SETTINGS = (
        "num_beams", "num_return_sequences", "num_beam_groups", "diversity_penalty", "repetition_penalty",
        "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
        "force_words_ids", "constraints", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
        "forced_eos_token_id", "min_length", "min_new_tokens", "sequence_bias", "guidance_scale",
        "exponential_decay_length_penalty", "watermarking_config", "stop_strings",
    )

    def _greedy_first_token(self, mode: str, user_kwargs: dict) -> bool:
        """Whether generate may take its first token from the blend's last row: plain greedy decoding
        (no user generation arguments, default settings) on a model whose logits the layer runner
        computes exactly (``LayerRunner.logits_exact``). Otherwise stock generate computes the
        question's last token and picks the token."""
        from kdn_hf.blend.runner import layer_runner

        if mode != "blend" or user_kwargs or not layer_runner(self.model).logits_exact:
            return False
        from transformers import GenerationConfig

        cfg, default = self.model.generation_config, GenerationConfig()
        if getattr(cfg, "do_sample", False):
            return False
        return all(getattr(cfg, f, None) == getattr(default, f, None) for f in self._FIRST_TOKEN_SETTINGS)

    #: compose the prompt's KV layer by layer on a background thread (kdn_hf.delivery), so the decode and
    #: re-rotation of later layers overlap the blending of earlier ones; False: whole chunks, in prompt order
    layerwise: bool = True

    def _compose(self, units, keys, loader: ChunkLoader, stats: PrepareStats, device,
                 first_layer: int = 0, extra: int = 0) -> Composition | None:
        """The prompt's KV [layers, 2, kv_heads, tokens, head_dim] as a Composition (``.kv``; ``.run(consume)``
        fills it): each unit's KV (stored, or computed and stored) re-rotated to its prompt position and
        written once into one buffer; None for no units.

        With a loader that opens entries undecoded (``decode=False``): every unit's fetch is settled here
        (hits counted, misses computed and stored on this thread), and ``run`` decodes and re-rotates layers
        ``first_layer`` and up in the background (layers below are left unwritten: blending overwrites
        them). A stored entry that fails while composing is recomputed (then counted as a miss, not a hit)
        and the composition starts again. With a decoding loader: the whole-chunk path, complete on return.
        """
        if loader.decode:
            out = self._compose_chunks(units, keys, loader, stats, device, extra)
            return None if out is None else Composition(out)
        if not units:
            return None
        dtype, num_layers = next(self.model.parameters()).dtype, self._num_layers()
        placed: dict[str, tuple] = {}  # key -> (layers(start, stop), positions, stored)
        hits: dict[str, tuple[str, int, int]] = {}  # key -> (tier, bytes, tokens) counted for its hit
        unit_of: dict[str, tuple] = {}
        sources: list[LayerSource] = []
        geometry = None  # (kv_heads, head_dim) of the first unit; an entry disagreeing is unusable
        at = 0
        for (ids, context), key in zip(units, keys):
            if key in placed:  # the same chunk again in this prompt
                stats.tokens_reused += len(ids)
            else:
                unit_of[key] = (ids, context)
                entry, tier = loader.get(key)
                if entry is not None and (
                    entry.token_ids.tolist() != list(ids) or entry.dtype != dtype or entry.num_layers != num_layers
                    or (geometry is not None and (entry.shape[2], entry.shape[4]) != geometry)
                ):
                    log.warning("entry %s does not hold the ids/geometry its key promises; recomputing", key)
                    self.store.note_corrupt(key)
                    entry = None
                if entry is not None:
                    stats.hits[tier] = stats.hits.get(tier, 0) + 1
                    stats.bytes_loaded += entry.nbytes
                    stats.tokens_reused += entry.num_tokens
                    hits[key] = (tier, entry.nbytes, entry.num_tokens)
                    placed[key] = (entry.layers, entry.positions, True)
                    shape = entry.shape
                else:
                    chunk = self._compute_and_store(ids, key, context)
                    stats.misses += 1
                    stats.tokens_computed += len(ids)
                    placed[key] = (_layer_slicer(chunk.kv), chunk.positions, False)
                    shape = tuple(chunk.kv.shape)
                geometry = geometry or (shape[2], shape[4])
            layers, positions, stored = placed[key]
            sources.append(LayerSource(key, layers, positions, at, stored))
            at += len(ids)

        def replace(key: str):
            """The stored chunk under ``key`` failed while composing: a miss after all (as KVStore.get makes
            an entry that does not decode), so recompute it, store it, and count it as one."""
            self.store.note_corrupt(key)
            tier, nbytes, tokens = hits.pop(key)
            stats.hits[tier] -= 1
            if not stats.hits[tier]:
                del stats.hits[tier]
            stats.bytes_loaded -= nbytes
            stats.tokens_reused -= tokens
            ids, context = unit_of[key]
            chunk = self._compute_and_store(ids, key, context)
            stats.misses += 1
            stats.tokens_computed += len(ids)
            return _layer_slicer(chunk.kv), chunk.positions

        out = torch.empty(num_layers, 2, geometry[0], at + extra, geometry[1], dtype=dtype, device=device)
        return Composition(out, sources, self.rope_spec, first_layer, replace)

    def _compose_chunks(self, units, keys, loader: ChunkLoader, stats: PrepareStats, device,
                        extra: int = 0) -> torch.Tensor | None:
        """The whole-chunk path of ``_compose`` (the loader decodes whole entries): the prompt's KV, complete,
        each chunk re-rotated (all layers at once) into one buffer in prompt order; None for no units."""
        fetched: dict[str, ChunkKV] = {}
        total = sum(len(ids) for ids, _ in units) + extra
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

        Extra keyword arguments go to ``model.generate`` (greedy by default). In ``blend`` mode with
        plain greedy decoding (no extra arguments), the question is computed inside the blend and the
        first token is taken from its last row (``stats.first_token == "blend"``); stock generate then
        continues from it. Otherwise stock generate feeds the question's last token and picks every token.
        """
        t0 = time.perf_counter()
        ratio = _check_mode(mode, recompute_ratio, selection)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        prompt = build_prompt(self.tokenizer, chunks, max_positions=self.max_positions, reserve=max_new_tokens)
        ids = prompt.prompt_ids
        first_token = self._greedy_first_token(mode, generate_kwargs)
        if mode == "full":
            cache = None
            stats = GenerateStats(mode=mode, chunks=len(prompt.chunk_ids), tokens_total=len(ids))
        else:
            self._deferred = []
            try:
                # blend computes the question with the context (question-aware selection sees it); the
                # cache then covers all of it (first token taken from the blend) or all but its last token
                cache = self._prepare(prompt, len(prompt.chunk_ids) - 1, mode, ratio, selection,
                                      query=prompt.chunk_ids[-1], keep_query=True,
                                      reserve=max_new_tokens + len(prompt.chunk_ids[-1]), first_token=first_token)
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
        new: list[int] = []
        first_at = None
        if cache is not None and getattr(cache, "next_logits", None) is not None:
            # the blend computed the whole question: its last row's logits give the first token
            new.append(int(cache.next_logits.argmax()))
            first_at = time.perf_counter()
            stats.first_token = "blend"
            eos = self.model.generation_config.eos_token_id
            eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
            if max_new_tokens == 1 or new[0] in eos:
                kwargs = None  # done: generate would feed nothing new
            else:
                kwargs["max_new_tokens"] = max_new_tokens - 1
        clock = None
        if kwargs is not None and first_at is None and kwargs.get("num_beams", 1) == 1 and "streamer" not in kwargs:
            clock = kwargs["streamer"] = _FirstTokenClock()
        if cache is not None and kwargs is not None:
            kwargs[cache_kwarg(self.model)] = cache
        fed = ids + new
        input_ids = torch.tensor([fed], device=self.model.device)
        try:
            if kwargs is not None:
                with torch.inference_mode():
                    out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
                new += out[0, len(fed):].tolist()
            end = time.perf_counter()
        finally:
            self._flush_deferred()  # chunks computed for this request are stored after it answered
        stats.tokens_generated = len(new)
        stats.total_s = end - t0
        if first_at is None and clock is not None:
            first_at = clock.first_token_at
        stats.ttft_s = (first_at - t0) if first_at else stats.total_s
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return GenerateResult(text=text, token_ids=new, prompt_ids=ids, stats=stats)
