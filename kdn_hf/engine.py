"""KDN: the front door. Ingest documents once, compose their KV into any prompt.

    kdn = KDN.from_pretrained("smollm2-135m", store="~/.cache/kdn_hf/store")
    kdn.ingest([doc_a, doc_b])
    res = kdn.generate([system, doc_b, doc_a, question], max_new_tokens=64, mode="reuse")
    cache = kdn.prepare([system, doc_b, doc_a])          # a KDNCache for stock generate
    kdn.key_for(doc_a)                                    # the store key ingest used for doc_a

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
The request flow itself lives in stages (``kdn_hf.pipeline`` names them).

Sharing: a KDN is read-only once built (model, tokenizer, store, key policy,
geometry, RoPE spec), so one instance serves many threads at once; every
request keeps its own state (its store-back, its stats). The store tiers are
thread-safe. A ``KDNCache`` belongs to the one request that uses it.
"""

from __future__ import annotations

import threading
from typing import Iterable, Sequence

from tqdm.auto import tqdm

from kdn_hf import env
from kdn_hf.blend import DEFAULT_SELECTION, get_selection
from kdn_hf.blend.runner import layer_runner
from kdn_hf.cache import KDNCache
from kdn_hf.codec import check_codec
from kdn_hf.compute import batches
from kdn_hf.errors import ConfigError, ContextTooLongError, InputError
from kdn_hf.fingerprint import model_fingerprint
from kdn_hf.generation import answer
from kdn_hf.pipeline import Request, compute_units, prepare_prompt
from kdn_hf.plan import KeyPolicy, Unit, plan_chunks, plan_prefix
from kdn_hf.prompt import build_prompt, opener_ids, tokenize_chunk
from kdn_hf.resolve import Geometry
from kdn_hf.result import GenerateResult
from kdn_hf.rope import RopeSpec, rope_spec_from_model
from kdn_hf.store import KVStore, open_store
from kdn_hf.store_back import StoreBack

MODES = ("full", "prefix", "reuse", "blend")


def _check_mode(mode: str, recompute_ratio: float, selection: str = DEFAULT_SELECTION) -> float:
    """Validate; returns the ratio that applies (``recompute_ratio`` for blend, else 0)."""
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
               fastest first), or None: ``$KDN_STORE``, else the disk store under KDN_HOME.
    namespace: tenant salt; entries of one namespace are invisible to another. None:
               ``$KDN_NAMESPACE``, else ``"default"``.
    codec:     how entries are stored (``kdn_hf.codec``; part of every key). None: ``$KDN_CODEC``,
               else ``"none"``.
    lead_in:   optional text (or ids) every chunk is computed after, following the opener (BOS), e.g.
               the system prompt your prompts open with ("offline KV editing" in the CacheBlend
               paper): chunks then carry attention to it. Part of every chunk key. A chunk equal
               to the lead-in itself is computed after the opener only. None: no lead-in.
    store_blends: also store the blended KV of each ``generate`` prompt in ``blend`` mode (with a
               selection given by name) under a ``blend`` key of its ids, question included, and
               the ratio and selection: the same prompt again is then one store hit, with no
               compose and no recompute. Off by default: an entry is the whole prompt's KV.
    layerwise: compose the prompt's KV layer by layer on a background thread (``kdn_hf.delivery``), so
               the decode and re-rotation of later layers overlap the blending of earlier ones; False:
               whole chunks, in prompt order (same bytes).
    cold_blend: a blend ``generate`` none of whose chunks is stored: ``"full"`` (default) answers it by
               full prefill (exact, full prefill's TTFT) and computes and stores its chunks after the
               answer; ``"blend"`` computes the chunks first and blends them (about 1.2x full prefill's
               TTFT). ``prepare``/``KDNCache`` always compute and blend.
    """

    def __init__(self, model, tokenizer, store=None, *, namespace: str | None = None, codec: str | None = None,
                 lead_in=None, store_blends: bool = False, layerwise: bool = True,
                 cold_blend: str = "full") -> None:
        namespace = env.namespace() if namespace is None else namespace
        codec = env.codec() if codec is None else codec
        if not isinstance(namespace, str) or not namespace:
            raise ConfigError(f"namespace must be a non-empty string, got {namespace!r}")
        for name, flag in (("store_blends", store_blends), ("layerwise", layerwise)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{name} must be True or False, got {flag!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.store: KVStore = open_store(store)
        self.codec = check_codec(codec)
        self.fingerprint = model_fingerprint(model)
        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.max_positions: int | None = getattr(text_cfg, "max_position_embeddings", None)
        #: the one key policy: opener (BOS or nothing), lead-in ids, namespace, codec, model fingerprint
        self.policy = KeyPolicy(self.fingerprint.digest, self.codec, namespace, opener_ids(tokenizer),
                                () if lead_in is None else tokenize_chunk(tokenizer, lead_in))
        self.geometry = Geometry.of(model)
        self.store_blends = store_blends
        self.layerwise = layerwise
        if cold_blend not in ("full", "blend"):
            raise ConfigError(f"cold_blend must be 'full' (a blend request none of whose chunks is stored is "
                              f"answered by full prefill, its chunks stored after the answer) or 'blend' "
                              f"(compute the chunks, then blend), got {cold_blend!r}")
        #: what a blend ``generate`` does when none of its chunks is stored (``kdn_hf.generation``)
        self.cold_blend = cold_blend
        self._rope: RopeSpec | None = None
        self._rope_lock = threading.Lock()
        # the layer runner's one-time check against the model's own forward, here rather than on the
        # first blend request's clock (once per model and process; it never raises)
        layer_runner(model).check()

    @classmethod
    def from_pretrained(cls, name_or_path: str = "smollm2-135m", store=None, **kwargs) -> "KDN":
        """Load a bundled model (``"smollm2-135m"``) or a local model directory, offline."""
        from kdn_hf import models

        load_kw = {k: kwargs.pop(k) for k in ("dtype", "device", "attn_implementation") if k in kwargs}
        model, tokenizer = models.load(name_or_path, **load_kw)
        return cls(model, tokenizer, store, **kwargs)

    @property
    def namespace(self) -> str:
        return self.policy.namespace

    @property
    def opener(self) -> tuple[int, ...]:
        """The ids opening every prompt: (BOS,) when the tokenizer adds BOS, else ()."""
        return self.policy.opener

    @property
    def lead_in(self) -> tuple[int, ...]:
        """The lead-in ids every chunk is computed after (``KDN(lead_in=...)``), or ()."""
        return self.policy.lead_in

    @property
    def rope_spec(self) -> RopeSpec:
        """The model's RoPE description; raises UnsupportedRopeError if K cannot be re-rotated exactly."""
        with self._rope_lock:
            if self._rope is None:
                self._rope = rope_spec_from_model(self.model)
            return self._rope

    # ------------------------------------------------------------------ keys
    def key_for(self, chunk) -> str:
        """The store key of ``chunk`` (text or token ids) as ``ingest`` stores it and every prompt finds it."""
        return self.policy.chunk_key(tokenize_chunk(self.tokenizer, chunk))

    def plan(self, chunks: Sequence, *, mode: str = "reuse") -> tuple[Unit, ...]:
        """The units (ids, context, store key, slot) of the prompt made of ``chunks``, as ``mode`` looks them
        up: position-independent chunk keys for ``reuse``/``blend``, exact prefix keys for ``prefix``.
        The opener, if any, is the first unit."""
        if mode not in ("prefix", "reuse", "blend"):
            raise ConfigError(f"plan's mode must be 'prefix', 'reuse' or 'blend' (full reads no store), got {mode!r}")
        prompt = build_prompt(self.tokenizer, chunks, max_positions=self.max_positions)
        return (plan_prefix if mode == "prefix" else plan_chunks)(self.policy, prompt)

    # ---------------------------------------------------------------- ingest
    def ingest(self, texts: Iterable, *, progress: bool | None = None) -> list[str]:
        """Compute and store each text's KV as one chunk; returns the keys, in order.

        Texts already stored are not computed again (nor a text given twice); the others are computed
        in batched forwards where their lengths allow, each stored as soon as its batch is done. A text longer than the
        model's context raises ContextTooLongError before anything is computed.
        """
        if isinstance(texts, (str, bytes)):
            raise InputError("ingest takes a list of texts; wrap a single text as [text]")
        ids_list = [tokenize_chunk(self.tokenizer, t, i) for i, t in enumerate(texts)]
        for i, ids in enumerate(ids_list):
            if self.max_positions and len(self.policy.context_of(ids)) + len(ids) > self.max_positions:
                raise ContextTooLongError(
                    f"text {i} has {len(ids)} tokens, more than the model's {self.max_positions} positions; "
                    f"split it into smaller chunks (e.g. `kdn ingest --max-tokens 512`)"
                )
        p = self.policy
        units = [Unit(ids, p.context_of(ids), p.chunk_key(ids), 0, False) for ids in ids_list]
        if p.opener:  # every prompt opens with the opener: store it too, so a warm prompt is all hits
            units.insert(0, Unit(p.opener, (), p.opener_key(), 0, True))
        show = progress if progress is not None else len(ids_list) > 1
        writes = StoreBack(self.store, p.fingerprint, self.codec, deferred=False)
        # each distinct missing text once, in batched forwards where lengths allow (kdn_hf.compute.batches)
        missing = list({u.key: u for u in units if not self.store.contains(u.key)}.values())
        with tqdm(total=len(units), desc="ingest", unit="chunk", disable=not show) as bar:
            bar.update(len(units) - len(missing))
            for batch in batches([len(u.context) + len(u.ids) for u in missing]):
                group = [missing[i] for i in batch]
                for unit, kv in zip(group, compute_units(self.model, group)):
                    writes.put(unit.key, kv)
                bar.update(len(group))
        return [u.key for u in units[1:]] if p.opener else [u.key for u in units]

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
        into the cache in place rather than by copying every layer per step (every mode but ``full``).
        Chunks computed on a miss are stored before this returns.
        """
        ratio = _check_mode(mode, recompute_ratio, selection)
        if not isinstance(reserve, int) or isinstance(reserve, bool) or reserve < 0:
            raise ConfigError(f"reserve must be a non-negative int (tokens to make room for), got {reserve!r}")
        parts = list(chunks) if query is None or isinstance(chunks, (str, bytes)) else [*chunks, query]
        prompt = build_prompt(self.tokenizer, parts, max_positions=self.max_positions)
        n = len(prompt.chunk_ids) - (query is not None)
        q = prompt.chunk_ids[-1] if query is not None else ()
        with StoreBack(self.store, self.policy.fingerprint, self.codec) as store_back:
            return prepare_prompt(self, Request(prompt, n, mode, ratio, selection, store_back, query=q,
                                                reserve=reserve))

    # -------------------------------------------------------------- generate
    def generate(self, chunks: Sequence, *, max_new_tokens: int = 64, mode: str = "blend",
                 recompute_ratio: float = 0.15, selection: str = DEFAULT_SELECTION,
                 **generate_kwargs) -> GenerateResult:
        """Answer the prompt made of ``chunks``; the last chunk (the question) is prefilled fresh.

        Extra keyword arguments go to ``model.generate`` (greedy by default). In ``blend`` mode with
        plain greedy decoding (no extra arguments), the question is computed inside the blend and the
        first token is taken from its last row (``stats.first_token == "blend"``); ``prefix`` likewise
        prefills the whole question and takes it from its last row (``"prefix"``). Stock generate then
        continues from it. Otherwise stock generate feeds the question's last token and picks every token.
        """
        ratio = _check_mode(mode, recompute_ratio, selection)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        return answer(self, chunks, max_new_tokens=max_new_tokens, mode=mode, ratio=ratio, selection=selection,
                      generate_kwargs=generate_kwargs)

    def __repr__(self) -> str:
        return (f"KDN(model={type(self.model).__name__}, store={self.store!r}, namespace={self.namespace!r}, "
                f"codec={self.codec!r})")

