"""``kdn bench``: TTFT and quality of full / prefix / reuse / blend on the rag or distractor workload.

Each result is one row (a plain dict) per (context length, method): timings from
``--timing-cases`` requests (median of ``--reps``, store warm), quality from
``--questions`` requests against full prefill on the same prompt ids, from the
QA split ``--split`` (test: reported figures; dev: the tuning split), peak memory
from one more untimed request per method (``kdn_hf.bench.memory``). Rows are
printed as a table, written to ``--json`` and plotted to ``--plot``; new
columns (store tier, codec, ...) are new keys of the same dicts. Each row with
quality also carries ``per_question`` (answer, correct, EM, F1, KLs, top-1 and
recomputed layer share per question), ``quality_layer_share`` (their mean, the
``q_layer%`` column: the work behind the quality figures, where ``layer%`` is
the timed prompt's) and ``flips`` against full prefill (question ids full answered and the
method did not: ``lost``; the reverse: ``gained``).

Methods:

- ``full``:   ordinary prefill of the whole prompt.
- ``prefix``: an exact-prefix cache (vLLM/SGLang style) warm for the system
  prompt only: the request's documents came in an order not seen before.
- ``reuse``:  stored chunk KV, re-rotated, no recompute (ratio 0).
- ``blend@r/sel``: reuse plus selective recompute of ratio r with selection sel.

Equal work (``layer_share``): instead of one ratio for every selection, each
blend selection gets the ratio whose share of recomputed (layer x context
token) rows, the ``layer%`` column, is closest to the target on the first
question's context (``at_layer_share``); rows carry the target and the ratio.

Workloads (``WORKLOADS``): ``rag`` (``workload.rag_cases``), ``distractor``
(``distractor.distractor_cases``: look-alike facts across the documents) and ``long``
(the rag prompt with documents filled to exactly ``doc_tokens``; ``kdn_hf.bench.long`` runs it
at several document counts).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kdn_hf.bench.distractor import distractor_cases
from kdn_hf.bench.memory import PeakMemory
from kdn_hf.bench.quality import _crop, greedy, score, stop_ids
from kdn_hf.bench.workload import RagCase, rag_cases
from kdn_hf.errors import ConfigError

METHODS = ("full", "prefix", "reuse", "blend")
WORKLOADS = ("rag", "distractor", "long")


def workload_cases(workload: str, tokenizer, k: int, doc_tokens: int, limit: int | None = None,
                   split: str = "dev") -> list[RagCase]:
    """The requests of ``workload`` (see ``WORKLOADS``) for ``k`` documents cut to ``doc_tokens`` tokens,
    from its ``split`` ("dev": tuning, "test": reporting)."""
    if workload in ("rag", "long"):
        return rag_cases(tokenizer, k=k, doc_tokens=doc_tokens, limit=limit, split=split, fill=workload == "long")
    if workload == "distractor":
        return distractor_cases(tokenizer, k=k, doc_tokens=doc_tokens, limit=limit, split=split)
    raise ConfigError(f"workload must be one of {WORKLOADS}, got {workload!r}")


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


def at_layer_share(kdn, methods: list[Method], case: RagCase, share: float) -> list[Method]:
    """``methods`` with each blend method's ratio replaced by the one whose layer share (recomputed
    layer x context-token rows over all of them) is closest to ``share`` on ``case``'s context, the
    question known (``kdn_hf.blend.ratio_for_layer_share``); duplicates (several ratios) dropped."""
    from kdn_hf.blend import get_selection, ratio_for_layer_share
    from kdn_hf.blend.runner import layer_runner

    layers = len(layer_runner(kdn.model).layers)
    tokens = sum(len(c) for c in case.context) + len(kdn.opener)
    out: dict[str, Method] = {}
    for m in methods:
        if m.mode == "blend":
            sel = get_selection(m.selection)
            if sel.adaptive:
                raise ConfigError(f"selection {m.selection!r} sizes its own budget per request, so no ratio gives it "
                                  f"a layer share in advance; bench it with --ratios (its ratio is the ceiling)")
            r = ratio_for_layer_share(sel, layers, tokens, share)
            m = Method(f"blend@{r:.3f}/{m.selection}", "blend", r, m.selection)
        out.setdefault(m.label if m.mode != "blend" else f"blend/{m.selection}", m)
    return list(out.values())


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


#: per-question measures (score's keys) kept in the rows' ``per_question`` and averaged into columns
MEASURES = ("kl", "answer_kl", "agree", "nll", "correct", "em", "f1")


def quality(kdn, methods: list[Method], cases: list[RagCase], tf_tokens: int, log=print,
            kl_tokens: int = 8) -> dict[str, dict]:
    """Per method label: mean measures over ``cases`` against full prefill (any RagCase list: rag, or another
    workload's), with ``per_question`` records and ``flips`` vs full. See ``quality.score``."""
    model, tok = kdn.model, kdn.tokenizer
    stop = stop_ids(model, tok)
    per: dict[str, list[dict]] = {m.label: [] for m in methods}
    for n, case in enumerate(cases):
        ctx = _chunk_lists(case)[:-1]
        full = kdn.prepare(ctx, mode="full")
        cont = greedy(model, full, list(case.suffix), tf_tokens, stop)
        _crop(full, sum(len(c) for c in ctx) + len(kdn.opener))
        ref = score(model, tok, full, case.suffix, cont, case.answers, kl_tokens=kl_tokens, stop=stop)
        for m in methods:
            if m.mode == "prefix":  # exact prefix KV: full prefill's quality by construction
                continue
            if m.mode == "full":
                r = ref
            else:
                # the question is known, as in generate: question-aware selections may use it
                cache = kdn.prepare(ctx, mode=m.mode, recompute_ratio=m.ratio, selection=m.selection,
                                    query=list(case.suffix))
                r = score(model, tok, cache, case.suffix, cont, case.answers, ref_logp=ref["logp"],
                          kl_tokens=kl_tokens, stop=stop)
            share = 0.0 if m.mode == "full" else float(cache.stats.recompute_share)
            per[m.label].append({"qid": case.qid, "kind": case.kind, "question": case.question,
                                 "gold": list(case.answers), "answer": r["answer"],
                                 **{k: float(r[k]) for k in MEASURES}, "recompute_share": share})
        if log:
            log(f"  quality {n + 1}/{len(cases)} [{case.kind}] full: {ref['answer'][:40]!r}")
    out = {}
    for label, qs in per.items():
        if not qs:
            continue
        col = lambda k: [q[k] for q in qs]  # noqa: E731
        out[label] = {"kl_mean": statistics.fmean(col("kl")), "kl_median": statistics.median(col("kl")),
                      "answer_kl_mean": statistics.fmean(col("answer_kl")),
                      "top1_agree": statistics.fmean(col("agree")), "answer_nll": statistics.fmean(col("nll")),
                      "accuracy": statistics.fmean(col("correct")), "em": statistics.fmean(col("em")),
                      "f1": statistics.fmean(col("f1")), "n_questions": len(qs), "per_question": qs,
                      # the work behind these figures (an adaptive selection's varies per question)
                      "quality_layer_share": statistics.fmean(col("recompute_share"))}
    if "full" in out:
        base = {q["qid"]: q["correct"] for q in out["full"]["per_question"]}
        for d in out.values():
            d["flips"] = flips(base, d["per_question"])
    return out


def flips(full_correct: dict[str, float], per_question: list[dict]) -> dict[str, list[str]]:
    """Question ids full prefill answered (lenient match) and the method did not (``lost``), and the reverse
    (``gained``)."""
    lost = [q["qid"] for q in per_question if full_correct[q["qid"]] and not q["correct"]]
    gained = [q["qid"] for q in per_question if q["correct"] and not full_correct[q["qid"]]]
    return {"lost": lost, "gained": gained}


def run_bench(*, kdn, methods: list[Method], k: int = 4, doc_tokens=(512,), reps: int = 3,
              timing_cases: int = 2, questions: int = 50, tf_tokens: int = 32, store_name: str = "memory",
              lead_in: str = "none", split: str = "test", workload: str = "rag",
              layer_share: float | None = None, log=print) -> list[dict]:
    """Rows of results, one per (doc_tokens, method), on ``workload``'s split ``split``. See the module
    docstring."""
    if timing_cases < 1 or reps < 1:
        raise ConfigError(f"--timing-cases and --reps must be >= 1 (every row reports a median TTFT), got "
                          f"{timing_cases} and {reps}; for a quick quality run use --timing-cases 1 --reps 1")
    rows = []
    asked = methods
    for n_tok in doc_tokens:
        cases = workload_cases(workload, kdn.tokenizer, k, n_tok, split=split)
        if not cases:
            raise ConfigError(f"no {split} {workload} question fits {k} documents cut to {n_tok} tokens; "
                              f"raise --doc-tokens or --k")
        if layer_share is not None:
            methods = at_layer_share(kdn, asked, cases[0], layer_share)
            log(f"[layer share {layer_share:g}] " + ", ".join(f"{m.selection}: ratio {m.ratio:.3f}"
                                                             for m in methods if m.mode == "blend"))
        timed = cases[:timing_cases]
        log(f"[{workload}/{split} k={k} doc_tokens={n_tok}] timing {len(methods)} methods on {len(timed)} prompts "
            f"x {reps} reps")
        # one untimed request first: lazy initialisation (kernels, allocator) is not TTFT
        kdn.generate(_chunk_lists(timed[0]), max_new_tokens=1, mode="full")
        times = time_methods(kdn, methods, timed, reps)
        for m in methods:
            log(f"  {m.label:24s} TTFT {times[m.label]['ttft_s'] * 1000:8.1f} ms")
        memory = peak_memory(kdn, methods, timed[0])
        qcases = workload_cases(workload, kdn.tokenizer, k, n_tok, limit=questions, split=split) if questions else []
        qual = quality(kdn, methods, qcases, tf_tokens, log=log) if qcases else {}
        base = times["full"]["ttft_s"] if "full" in times else None
        for m in methods:
            t = times[m.label]
            row = {"workload": workload, "split": split, "k": k, "doc_tokens": n_tok, "context_tokens": t["tokens_total"],
                   "store": store_name, "lead_in": lead_in, "method": m.label, "mode": m.mode,
                   "ratio": m.ratio if m.mode == "blend" else 0.0,
                   "selection": m.selection if m.mode == "blend" else None,
                   "ttft_ms": t["ttft_s"] * 1000, "speedup": (base / t["ttft_s"]) if base else None,
                   "tokens_recomputed": t["tokens_recomputed"], "recompute_share": t["recompute_share"],
                   "bytes_loaded": t["bytes_loaded"], "peak_mem_bytes": memory[m.label],
                   "layer_share_target": layer_share}
            q = qual.get(m.label) or (qual.get("full") if m.mode == "prefix" else None) or {}
            row.update({key: q.get(key) for key in QUALITY_KEYS})
            rows.append(row)
    return rows


#: the quality keys of a row (None where the method has no quality measured)
QUALITY_KEYS = ("kl_mean", "kl_median", "answer_kl_mean", "top1_agree", "answer_nll", "accuracy", "em", "f1",
                "n_questions", "flips", "per_question", "quality_layer_share")

COLUMNS = [("method", "{}", 24), ("doc_tokens", "{}", 6), ("context_tokens", "{}", 7), ("ttft_ms", "{:.0f}", 8),
           ("speedup", "{:.2f}x", 8), ("tokens_recomputed", "{}", 7),
           ("recompute_share", "{:.1%}", 7), ("quality_layer_share", "{:.1%}", 7), ("bytes_loaded", "{:.1f}", 8),
           ("peak_mem_bytes", "{:.0f}", 8),
           ("kl_mean", "{:.4f}", 8), ("answer_kl_mean", "{:.4f}", 8), ("top1_agree", "{:.1%}", 7),
           ("answer_nll", "{:.3f}", 7), ("accuracy", "{:.1%}", 7), ("em", "{:.1%}", 6), ("f1", "{:.1%}", 6)]
HEADERS = {"doc_tokens": "doc_tok", "context_tokens": "ctx_tok", "tokens_recomputed": "recomp", "recompute_share": "layer%",
           "quality_layer_share": "q_layer%",
           "bytes_loaded": "MiB_load", "peak_mem_bytes": "MiB_peak", "kl_mean": "KL", "answer_kl_mean": "ansKL",
           "top1_agree": "top1", "answer_nll": "ans_NLL", "accuracy": "acc", "em": "EM", "f1": "F1"}


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
    return "\n".join(lines + flips_summary(rows))


def flips_summary(rows: list[dict], show: int = 4) -> list[str]:
    """One line per row with flips vs full: how many questions it lost and gained (first ids shown)."""
    out = []
    for r in rows:
        f = r.get("flips")
        if not f or r["mode"] == "full":
            continue
        ids = lambda xs: (" " + ",".join(xs[:show]) + (",..." if len(xs) > show else "")) if xs else ""  # noqa: E731
        out.append(f"flips vs full  {r['method']} @{r['doc_tokens']}: lost {len(f['lost'])}{ids(f['lost'])}; "
                   f"gained {len(f['gained'])}{ids(f['gained'])}")
    return ["", *out] if out else []


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
        color = f"C{labels.index(label)}"  # one colour per method in every panel
        a1.plot(x, [r["ttft_ms"] for r in rs], "o-", label=label, color=color)
        # exact methods (KL 0: full, prefix) have no point on a log scale: named in the title instead
        if all(r.get("kl_mean") is not None for r in rs) and any(r["kl_mean"] > 0 for r in rs):
            a2.plot(x, [max(r["kl_mean"], 1e-6) for r in rs], "o-", label=label, color=color)
        if memory and all(r.get("peak_mem_bytes") is not None for r in rs):
            axes[2].plot(x, [r["peak_mem_bytes"] / 2**20 for r in rs], "o-", label=label, color=color)
    a1.set(xlabel="context tokens", ylabel="TTFT (ms, median)", title="time to first token")
    exact = [lb for lb in labels if all(r.get("kl_mean") == 0 for r in rows if r["method"] == lb)]
    a2.set(xlabel="context tokens", ylabel="first-token KL vs full (nats)", yscale="log",
           title="quality" + (f" ({', '.join(exact)}: KL 0, exact)" if exact else ""))
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
