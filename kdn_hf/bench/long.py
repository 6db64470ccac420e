"""The ``long`` workload: the rag prompt at several context lengths (``kdn bench --workload long``).

For each document count k in ``--docs`` (default 4, 8, 16) a prompt holds k documents of
exactly ``--doc-tokens`` tokens (default 512): the QA set's documents (``--split``) are filled up
with the next documents of their article (``rag_cases(fill=True)``), so 4 / 8 / 16 documents give
about 2K / 4K / 8K context tokens. Where k full documents, the system prompt, the longest question
and the quality measures' continuation (``reserve`` tokens) would pass the model's
``max_position_embeddings``, the documents are cut to the longest length that fits, and the rows
say so (``doc_tokens`` is the length used, ``doc_tokens_asked`` the one asked). SmolLM2-135M
(8192 positions): 16 x 512 does not fit, 16 x 500 does (about 8.06K context tokens).
"""

from __future__ import annotations

from kdn_hf.bench.workload import rag_cases
from kdn_hf.errors import ConfigError

DEFAULT_DOCS = (4, 8, 16)


def max_positions(model) -> int | None:
    """The model's ``max_position_embeddings`` (None if its config has none)."""
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def fit_doc_tokens(tokenizer, k: int, doc_tokens: int, limit: int | None, reserve: int, split: str = "dev") -> int:
    """The longest document length <= ``doc_tokens`` at which every prompt of k filled documents, plus
    ``reserve`` more tokens, stays within ``limit`` positions (None: no limit)."""
    if limit is None:
        return doc_tokens
    n = doc_tokens
    while n > 0:
        cases = rag_cases(tokenizer, k=k, doc_tokens=n, fill=True, split=split)
        longest = max((sum(len(c) for c in case.chunks) for case in cases), default=0)
        over = longest + reserve - limit
        if over <= 0:
            return n
        n -= -(-over // k)  # ceil: every document gives up its share
    raise ConfigError(f"{k} documents do not fit in {limit} positions; use fewer (--docs)")


def run_long(*, kdn, methods, docs=DEFAULT_DOCS, doc_tokens: int = 512, tf_tokens: int = 32,
             split: str = "test", log=print, **bench_kwargs) -> list[dict]:
    """Rows of ``run_bench`` (workload "long") for each document count in ``docs``; documents filled to
    ``doc_tokens`` and cut to fit the model's positions (see the module docstring)."""
    from kdn_hf.bench.quality import ANSWER_TOKENS
    from kdn_hf.bench.run import run_bench

    if not docs or any(k < 1 for k in docs):
        raise ConfigError(f"--docs takes document counts >= 1, got {docs!r}")
    rows = []
    limit = max_positions(kdn.model)
    for k in docs:
        n = fit_doc_tokens(kdn.tokenizer, k, doc_tokens, limit, reserve=max(tf_tokens, ANSWER_TOKENS) + 1,
                           split=split)
        if n != doc_tokens:
            log(f"[long k={k}] {k} x {doc_tokens} tokens do not fit in {limit} positions: documents cut to {n}")
        for row in run_bench(kdn=kdn, methods=methods, k=k, doc_tokens=(n,), tf_tokens=tf_tokens,
                             split=split, workload="long", log=log, **bench_kwargs):
            row["doc_tokens_asked"] = doc_tokens
            rows.append(row)
    return rows
