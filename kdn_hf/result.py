"""Typed results: what a request produced and what it cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class PrepareStats:
    """How a prompt's KV was assembled.

    hits: chunk entries served, per tier name. misses: chunks computed (and stored).
    tokens_reused: prompt tokens whose KV came from the store.
    tokens_computed: prompt tokens prefilled by the model while preparing
    (misses and lead-in); the suffix that generate prefills is added by generate.
    bytes_loaded: bytes of KV read from the store.
    tokens_recomputed: context tokens the blend selected (recomputed from its first layer on).
    recompute_share: the blend's context token-layers recomputed over all of them (layers x
    context tokens): its real share of a prefill's layer work; below the ratio when the selection
    narrows in the upper layers (the default ``kdn`` does), 0 outside blend mode.
    """

    mode: str = "reuse"
    chunks: int = 0
    hits: dict[str, int] = field(default_factory=dict)
    misses: int = 0
    tokens_total: int = 0
    tokens_reused: int = 0
    tokens_computed: int = 0
    tokens_recomputed: int = 0
    recompute_share: float = 0.0
    bytes_loaded: int = 0
    prepare_s: float = 0.0
    #: what ran the data path: {"kernels": "triton" | "torch" (``kdn_hf.kernels``' choice for the
    #: model's device and dtype), "attention": the model's attention implementation ("sdpa",
    #: "flash_attention_2", ...)}; empty outside reuse/blend
    backends: dict[str, str] = field(default_factory=dict)

    @property
    def hit_count(self) -> int:
        return sum(self.hits.values())


@dataclass
class GenerateStats(PrepareStats):
    """PrepareStats plus the request's timings. ttft_s runs from the call to the
    first generated token (store lookups, compose and prefill included).
    first_token: what picked the first token: ``"generate"`` (stock generate), ``"blend"`` (greedy
    argmax of the blend's last row, which computed the whole question) or ``"prefix"`` (the same from
    the prefix prefill's last row).
    cold_full: a blend request none of whose chunks was stored, answered by full prefill (exact); its
    chunks (``misses``) were computed and stored after the answer (``KDN(cold_blend="full")``)."""

    tokens_generated: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    recompute_ratio: float = 0.0
    first_token: str = "generate"
    cold_full: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerateResult:
    """text: the decoded answer. token_ids: generated ids only.
    prompt_ids: exactly the ids full prefill would see."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    stats: GenerateStats
