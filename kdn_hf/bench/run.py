"""``kdn bench``: TTFT and quality of full / prefix / reuse / blend on the rag workload.

Each result is one row (a plain dict) per (context length, method): timings from
``--timing-cases`` requests (median of ``--reps``, store warm), quality from
``--questions`` requests against full prefill on the same prompt ids, peak memory
from one more untimed request per method (``kdn_hf.bench.memory``). Rows are
printed as a table, written to ``--json`` and plotted to ``--plot``; new
columns (store tier, codec, ...) are new keys of the same dicts.

Methods:

- ``full``:   ordinary prefill of the whole prompt.
- ``prefix``: an exact-prefix cache (vLLM/SGLang style) warm for the system
  prompt only: the request's documents came in an order not seen before.
- ``reuse``:  stored chunk KV, re-rotated, no recompute (ratio 0).
- ``blend@r/sel``: reuse plus selective recompute of ratio r with selection sel.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kdn_hf.bench.memory import PeakMemory
from kdn_hf.bench.quality import _crop, greedy, score
from kdn_hf.bench.workload import RagCase, rag_cases
from kdn_hf.errors import ConfigError

METHODS = ("full", "prefix", "reuse", "blend")


@dataclass(frozen=True)
class Method:
    label: str
    mode: str
    ratio: float = 0.0
    selection: str = "kdn"


def methods_from(names, ratios, selections) -> list[Method]:
    """Expand --methods x --ratios x --selection into Methods (blend only takes ratios/selections)."""
    from kdn_hf.blend import get_selection

    out = []
    for name in names:
        if name not in METHODS:
            raise ConfigError(f"--methods takes names from {METHODS}, got {name!r}")
        if name != "blend":
            out.append(Method(name, name))
            continue
        for r in ratios:
            if not 0.0 < r <= 1.0:
                raise ConfigError(f"--ratios must lie in (0, 1], got {r}")
            for s in selections:
                get_selection(s)
                out.append(Method(f"blend@{r:g}/{s}", "blend", r, s))
    return out


def _chunk_lists(case: RagCase):
    return [list(c) for c in case.chunks]


def _drop_prefix_entries(kdn, chunks) -> None:
    units = kdn.plan(chunks, mode="prefix")[1 if kdn.opener else 0:]
    for unit in units[1:]:  # keep the opener's and the system prompt's entries: the prefix cache is warm for them
        kdn.store.delete(unit.key)


def time_methods(kdn, methods: list[Method], cases: list[RagCase], reps: int) -> dict[str, dict]:
    """Per method label: median TTFT (s) over cases x reps, with the stats of its last request.

    Methods take turns within each repetition, so a change in machine load hits all of them.
    """
    ttfts: dict[str, list[float]] = {m.label: [] for m in methods}
    last = {}
    for case in cases:
        chunks = _chunk_lists(case)
        kdn.ingest(chunks[:-1], progress=False)  # warm store
        kdn.generate(chunks[:1] + ["x"], max_new_tokens=1, mode="prefix")  # prefix cache: system prompt
        for _ in range(reps):
            for m in methods:
                if m.mode == "prefix":  # documents in an order the prefix cache has not seen
                    _drop_prefix_entries(kdn, chunks[:-1])
                res = kdn.generate(chunks, max_new_tokens=1, mode=m.mode, recompute_ratio=m.ratio,
                                   selection=m.selection)
                ttfts[m.label].append(res.stats.ttft_s)
                last[m.label] = res.stats
    return {label: {"ttft_s": statistics.median(ts), "tokens_recomputed": last[label].tokens_recomputed,
                    "recompute_share": last[label].recompute_share,
                    "bytes_loaded": last[label].bytes_loaded, "tokens_total": last[label].tokens_total}
            for label, ts in ttfts.items()}


def peak_memory(kdn, methods: list[Method], case: RagCase) -> dict[str, int | None]:
    """Per method label: peak memory growth (bytes) during one untimed request on ``case`` (store warm,
    as when timed), or None where it cannot be measured (``kdn_hf.bench.memory``)."""
    chunks = _chunk_lists(case)
    out = {}
    for m in methods:
        if m.mode == "prefix":
            _drop_prefix_entries(kdn, chunks[:-1])
        with PeakMemory(kdn.model.device) as peak:
            kdn.generate(chunks, max_new_tokens=1, mode=m.mode, recompute_ratio=m.ratio, selection=m.selection)
        out[m.label] = peak.bytes
    return out


def quality(kdn, methods: list[Method], cases: list[RagCase], tf_tokens: int, log=print) -> dict[str, dict]:
    """Per method label: mean KL, agreement, answer NLL and accuracy over ``cases`` (vs full)."""
    model, tok = kdn.model, kdn.tokenizer
    acc: dict[str, dict[str, list]] = {m.label: {"kl": [], "agree": [], "nll": [], "correct": []} for m in methods}
    for n, case in enumerate(cases):
        ctx = _chunk_lists(case)[:-1]
        full = kdn.prepare(ctx, mode="full")
        cont = greedy(model, full, list(case.suffix), tf_tokens)
        _crop(full, sum(len(c) for c in ctx) + len(kdn.opener))
        ref = score(model, tok, full, case.suffix, cont, case.answers)
        for m in methods:
            if m.mode == "prefix":  # exact prefix KV: full prefill's quality by construction
                continue
            if m.mode == "full":
                r = ref
            else:
                # the question is known, as in generate: question-aware selections may use it
                cache = kdn.prepare(ctx, mode=m.mode, recompute_ratio=m.ratio, selection=m.selection,
                                    query=list(case.suffix))
                r = score(model, tok, cache, case.suffix, cont, case.answers, ref_first=ref["first_logp"])
            for k in ("kl", "agree", "nll", "correct"):
                acc[m.label][k].append(float(r[k]))
        if log:
            log(f"  quality {n + 1}/{len(cases)} [{case.kind}] full: {ref['answer'][:40]!r}")
    out = {}
    for label, d in acc.items():
        if not d["kl"]:
            continue
        out[label] = {"kl_mean": statistics.fmean(d["kl"]), "kl_median": statistics.median(d["kl"]),
                      "top1_agree": statistics.fmean(d["agree"]), "answer_nll": statistics.fmean(d["nll"]),
                      "accuracy": statistics.fmean(d["correct"]), "n_questions": len(d["kl"])}
    return out


def run_bench(*, kdn, methods: list[Method], k: int = 4, doc_tokens=(512,), reps: int = 3,
              timing_cases: int = 2, questions: int = 50, tf_tokens: int = 32, store_name: str = "memory",
              lead_in: str = "none", fill: bool = False, log=print) -> list[dict]:
    """Rows of results, one per (doc_tokens, method). See the module docstring.

    fill: documents filled to exactly ``doc_tokens`` (``rag_cases(fill=True)``; the long workload)."""
    rows = []
    workload = "long" if fill else "rag"
    for n_tok in doc_tokens:
        cases = rag_cases(kdn.tokenizer, k=k, doc_tokens=n_tok, fill=fill)
        if not cases:
            raise ConfigError(f"no dev QA question fits documents cut to {n_tok} tokens")
        timed = cases[:timing_cases]
        log(f"[{workload} k={k} doc_tokens={n_tok}] timing {len(methods)} methods on {len(timed)} prompts x {reps} reps")
        # one untimed request first: lazy initialisation (kernels, allocator) is not TTFT
        kdn.generate(_chunk_lists(timed[0]), max_new_tokens=1, mode="full")
        times = time_methods(kdn, methods, timed, reps)
        for m in methods:
            log(f"  {m.label:24s} TTFT {times[m.label]['ttft_s'] * 1000:8.1f} ms")
        memory = peak_memory(kdn, methods, timed[0])
        qcases = rag_cases(kdn.tokenizer, k=k, doc_tokens=n_tok, limit=questions, fill=fill) if questions else []
        qual = quality(kdn, methods, qcases, tf_tokens, log=log) if qcases else {}
        base = times["full"]["ttft_s"] if "full" in times else None
        for m in methods:
            t = times[m.label]
            row = {"workload": workload, "k": k, "doc_tokens": n_tok, "context_tokens": t["tokens_total"],
                   "store": store_name, "lead_in": lead_in, "method": m.label, "mode": m.mode,
                   "ratio": m.ratio if m.mode == "blend" else 0.0,
                   "selection": m.selection if m.mode == "blend" else None,
                   "ttft_ms": t["ttft_s"] * 1000, "speedup": (base / t["ttft_s"]) if base else None,
                   "tokens_recomputed": t["tokens_recomputed"], "recompute_share": t["recompute_share"],
                   "bytes_loaded": t["bytes_loaded"], "peak_mem_bytes": memory[m.label]}
            q = qual.get(m.label) or (qual.get("full") if m.mode == "prefix" else None) or {}
            row.update({key: q.get(key) for key in ("kl_mean", "kl_median", "top1_agree", "answer_nll",
                                                    "accuracy", "n_questions")})
            rows.append(row)
    return rows


COLUMNS = [("method", "{}", 24), ("doc_tokens", "{}", 6), ("context_tokens", "{}", 7), ("ttft_ms", "{:.0f}", 8),
           ("speedup", "{:.2f}x", 8), ("tokens_recomputed", "{}", 7),
           ("recompute_share", "{:.1%}", 7), ("bytes_loaded", "{:.1f}", 8), ("peak_mem_bytes", "{:.0f}", 8),
           ("kl_mean", "{:.4f}", 8), ("top1_agree", "{:.1%}", 7), ("answer_nll", "{:.3f}", 7),
           ("accuracy", "{:.1%}", 7)]
HEADERS = {"doc_tokens": "doc_tok", "context_tokens": "ctx_tok", "tokens_recomputed": "recomp", "recompute_share": "layer%",
           "bytes_loaded": "MiB_load", "peak_mem_bytes": "MiB_peak", "kl_mean": "KL", "top1_agree": "top1", "answer_nll": "ans_NLL",
           "accuracy": "acc"}


def format_table(rows: list[dict]) -> str:
    lines = ["  ".join(f"{HEADERS.get(c, c):>{w}}" for c, _, w in COLUMNS)]
    for r in rows:
        cells = []
        for c, fmt, w in COLUMNS:
            v = r.get(c)
            if c in ("bytes_loaded", "peak_mem_bytes") and v is not None:
                v = v / 2**20
            cells.append(f"{('-' if v is None else fmt.format(v)):>{w}}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """TTFT, first-token KL and (where measured) peak memory by method and context length (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["method"] for r in rows))
    memory = any(r.get("peak_mem_bytes") is not None for r in rows)
    fig, axes = plt.subplots(1, 3 if memory else 2, figsize=(16 if memory else 11, 4))
    a1, a2 = axes[0], axes[1]
    for label in labels:
        rs = sorted((r for r in rows if r["method"] == label), key=lambda r: r["context_tokens"])
        x = [r["context_tokens"] for r in rs]
        a1.plot(x, [r["ttft_ms"] for r in rs], "o-", label=label)
        if all(r.get("kl_mean") is not None for r in rs):
            a2.plot(x, [max(r["kl_mean"], 1e-6) for r in rs], "o-", label=label)
        if memory and all(r.get("peak_mem_bytes") is not None for r in rs):
            axes[2].plot(x, [r["peak_mem_bytes"] / 2**20 for r in rs], "o-", label=label)
    a1.set(xlabel="context tokens", ylabel="TTFT (ms, median)", title="time to first token")
    a2.set(xlabel="context tokens", ylabel="first-token KL vs full (nats)", title="quality", yscale="log")
    if memory:
        axes[2].set(xlabel="context tokens", ylabel="peak memory growth (MiB)", title="memory per request")
    for a in axes:
        if a.get_legend_handles_labels()[0]:  # a panel without data (no quality run) gets no legend
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(rows: list[dict], path: str, config: dict) -> None:
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(path).write_text(json.dumps({"config": config, "env": env, "rows": rows}, indent=1) + "\n")
