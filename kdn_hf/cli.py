"""The ``kdn`` command line.

    kdn ingest docs/ --max-tokens 512          store every chunk's KV
    kdn ask --doc a.md --doc b.md "question"   answer, TTFT and hit stats
    kdn store stats|ls|verify|gc|rm            what the store holds; check, trim, remove entries
    kdn demo                                   full vs reuse, cold and warm store

Every command takes ``--store`` (a path, ``file://``, ``memory://``; repeat it
for a tier chain, fastest first), ``--model`` (a bundled name or a local
model directory) and ``--namespace``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from kdn_hf import env
from kdn_hf.errors import KDNError


def _common(p: argparse.ArgumentParser, model: bool = True, codec: bool = True) -> None:
    p.add_argument("--store", action="append", default=None,
                   help="store URL or path (repeat for a tier chain, fastest first); "
                        "default: $KDN_STORE (comma-separated), else KDN_HOME/store")
    if model:
        p.add_argument("--model", default="smollm2-135m", help="bundled model name or local model directory")
        p.add_argument("--namespace", default=env.namespace(),
                       help="tenant namespace of the stored entries; default: $KDN_NAMESPACE or 'default'")
    if model and codec:
        p.add_argument("--codec", default=env.codec(),
                       help="stored KV codec: none, fp16, bf16, int8, int4, int4-g<N>, entropy (part of the key); "
                            "default: $KDN_CODEC or 'none'")


def _kdn(args):
    from kdn_hf import KDN

    return KDN.from_pretrained(args.model, store=args.store, namespace=args.namespace, codec=args.codec)


def _doc_chunks(kdn, paths, max_tokens: int) -> list[str]:
    from kdn_hf.chunking import chunk_text, collect_files, read_text

    chunks: list[str] = []
    for f in collect_files(paths):
        chunks += chunk_text(read_text(f), kdn.tokenizer, max_tokens)
    return chunks


def cmd_ingest(args) -> int:
    kdn = _kdn(args)
    chunks = _doc_chunks(kdn, args.paths, args.max_tokens)
    before = {k: v.entries for k, v in kdn.store.stats().items()}
    keys = kdn.ingest(chunks, progress=True)
    after = kdn.store.stats()
    new = sum(after[k].entries - before.get(k, 0) for k in after)
    print(f"ingested {len(chunks)} chunks ({len(set(keys))} distinct, {max(new, 0)} new entries) into "
          f"{', '.join(after)}")
    return 0


def cmd_ask(args) -> int:
    kdn = _kdn(args)
    chunks = _doc_chunks(kdn, args.doc, args.max_tokens) if args.doc else []
    if args.system:
        chunks.insert(0, args.system.rstrip() + "\n\n")
    chunks.append(args.question if args.raw else f"Question: {args.question.strip()}\nAnswer:")
    res = kdn.generate(chunks, max_new_tokens=args.max_new_tokens, mode=args.mode,
                       recompute_ratio=args.recompute_ratio, selection=args.selection)
    s = res.stats
    if args.json:
        print(json.dumps({"text": res.text, "stats": s.as_dict()}, indent=1))
        return 0
    print(res.text.strip())
    print(f"\n[{s.mode}] TTFT {s.ttft_s * 1000:.0f} ms | prompt {s.tokens_total} tokens, "
          f"{s.tokens_reused} reused, {s.tokens_computed} computed | hits {s.hits or 0}, misses {s.misses}, "
          f"{s.bytes_loaded / 2**20:.1f} MiB loaded", file=sys.stderr)
    return 0


def cmd_store_stats(args) -> int:
    from kdn_hf.store import open_store

    store = open_store(args.store)
    stats = {name: st.as_dict() for name, st in store.stats().items()}
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0
    for (name, st), tier in zip(stats.items(), store.tiers):
        print(f"{name:10s} {st['entries']:6d} entries  {st['bytes_used'] / 2**20:9.1f} MiB used of "
              f"{st['byte_budget'] / 2**20:.0f} MiB"
              + (f"  {st['repairs']} repair(s) on open" if st["repairs"] else "")
              + (f"  NOT READABLE: {tier.unreadable}" if tier.unreadable else ""))
    return 0


def cmd_store_ls(args) -> int:
    from kdn_hf.store import open_store
    from kdn_hf.store.entry import read_metadata
    from kdn_hf.errors import CorruptEntryError

    store = open_store(args.store)
    rows = []
    for name, tier in zip(store.names, store.tiers):
        for key in tier.keys():
            data = tier.peek(key)
            if data is None:
                continue
            try:
                meta = read_metadata(data)
            except CorruptEntryError:
                meta = {"codec": "?", "num_tokens": "?", "dtype": "unreadable", "fingerprint": "?"}
            rows.append({"tier": name, "key": key, "bytes": len(data), "codec": meta.get("codec", "?"),
                         "tokens": meta.get("num_tokens", "?"), "dtype": meta.get("dtype", "?"),
                         "fingerprint": meta.get("fingerprint", "?")})
            if args.limit and len(rows) >= args.limit:
                break
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        print(f"{r['tier']:8s} {r['key']}  {r['bytes'] / 2**10:9.1f} KiB  {r['codec']:8s} {r['tokens']:>6} tok  "
              f"{r['dtype']:9s} fp {r['fingerprint'][:12]}")
    print(f"{len(rows)} entries", file=sys.stderr)
    return 0


def cmd_store_verify(args) -> int:
    from kdn_hf.store import open_store

    fingerprint = None
    if args.model:
        from kdn_hf import models
        from kdn_hf.errors import ModelLoadError
        from kdn_hf.fingerprint import fingerprint_from_checkpoint, model_fingerprint

        try:  # the checkpoint gives the loaded model's fingerprint without loading it
            fingerprint = fingerprint_from_checkpoint(models.resolve(args.model), "float32").digest
        except ModelLoadError:
            fingerprint = model_fingerprint(models.load(args.model)[0]).digest
    store = open_store(args.store)
    report = store.verify(fingerprint, remove=not args.keep)
    for tier, n in report.repairs:
        print(f"{tier:8s} repaired on open: {n} (a damaged store marker was rewritten; entries are verified below)")
    for tier, why in report.unreadable:
        print(f"{tier:8s} NOT READABLE by this version: {why}; its entries were not checked, and it is served "
              "as all-miss and never written")
    for tier, key, reason in report.bad:
        print(f"{tier:8s} {key}  {'kept' if args.keep else 'removed'}: {reason}")
    print(f"checked {report.checked} entries: {len(report.bad)} bad"
          + (f", {len(report.unreadable)} tier(s) not readable" if report.unreadable else "")
          + (f", {sum(n for _, n in report.repairs)} repair(s)" if report.repairs else "")
          + ("" if fingerprint else " (fingerprints not checked: pass --model to check them)"), file=sys.stderr)
    return 1 if report.bad or report.unreadable else 0


def cmd_store_gc(args) -> int:
    from kdn_hf.store import open_store

    kw = {"disk_budget": args.budget, "memory_budget": args.budget} if args.budget else {}
    store = open_store(args.store, **kw)  # opening a disk tier already trims it to its budget
    store.trim()
    for name, st in store.stats().items():
        print(f"{name:10s} {st.entries:6d} entries  {st.bytes_used / 2**20:9.1f} MiB of "
              f"{st.byte_budget / 2**20:.0f} MiB  ({st.evictions} evicted)")
    return 0


def cmd_store_rm(args) -> int:
    from kdn_hf.store import open_store

    if not args.keys and not args.all:
        raise SystemExit("kdn store rm: name the keys to remove (see `kdn store ls`), or pass --all")
    store = open_store(args.store)
    keys = sorted({k for t in store.tiers for k in t.keys()}) if args.all else args.keys
    removed = sum(store.delete(k) for k in keys)
    print(f"removed {removed} of {len(keys)} keys")
    return 0


def cmd_demo(args) -> int:
    from kdn_hf.demo import run_demo

    run_demo(store=args.store, model=args.model, reps=args.reps)
    return 0


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def cmd_bench(args) -> int:
    from kdn_hf import KDN
    from kdn_hf.bench import format_table, methods_from, plot, run_bench, write_json

    from kdn_hf.bench.run import WORKLOADS

    if args.workload not in WORKLOADS:
        raise SystemExit(f"kdn bench: unknown workload {args.workload!r}; available: {', '.join(WORKLOADS)}")
    if args.layer_share is not None and not 0.0 < args.layer_share <= 1.0:
        raise SystemExit(f"kdn bench: --layer-share must lie in (0, 1], got {args.layer_share}")
    if args.codec is not None:  # the storage/codec bench (kdn bench-store)
        return cmd_bench_store(args)
    args.questions = 50 if args.questions is None else args.questions
    args.reps = 3 if args.reps is None else args.reps
    methods = methods_from(_names(args.methods), _floats(args.ratios), _names(args.selection))
    from kdn_hf import models
    from kdn_hf.bench.workload import chat_format

    model, tokenizer = models.load(args.model)
    lead_in = chat_format(tokenizer)[0] if args.lead_in == "system" else None
    kdn = KDN(model, tokenizer, store=args.store or ["memory://?budget=4GiB"], namespace=args.namespace,
              lead_in=lead_in)
    store_name = "+".join(t.name for t in kdn.store.tiers)
    doc_tokens = [int(x) for x in _names(args.doc_tokens)]
    common = dict(kdn=kdn, methods=methods, reps=args.reps, timing_cases=args.timing_cases, questions=args.questions,
                  tf_tokens=args.tf_tokens, store_name=store_name, lead_in=args.lead_in, split=args.split,
                  layer_share=args.layer_share, log=lambda m: print(m, file=sys.stderr))
    if args.workload == "long":
        from kdn_hf.bench.long import run_long

        if len(doc_tokens) != 1:
            raise SystemExit("kdn bench --workload long: --doc-tokens takes one length (the context grows with --docs)")
        rows = run_long(docs=[int(x) for x in _names(args.docs)], doc_tokens=doc_tokens[0], **common)
    else:
        rows = run_bench(k=args.k, doc_tokens=doc_tokens, workload=args.workload, **common)
    print(format_table(rows))
    config = {k: v for k, v in vars(args).items() if k != "func"}
    if args.json:
        write_json(rows, args.json, config)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_bench_store(args) -> int:
    """``kdn bench --codec ...`` / ``kdn bench-store``: bytes/token, decode, KL, TTFT per store, ingest."""
    from kdn_hf import models
    from kdn_hf.bench.storage import CODECS, format_table, run_delivery_bench
    from kdn_hf.bench.run import write_json

    codecs = _names(args.codec or ",".join(CODECS))
    args.questions = 10 if args.questions is None else args.questions
    args.reps = 5 if args.reps is None else args.reps
    if getattr(args, "plot", None):
        print("kdn bench: --plot draws the method bench; it is ignored with --codec", file=sys.stderr)
    model, tok = models.load(args.model)
    rows = []
    for n_tok in (int(x) for x in _names(str(args.doc_tokens))):
        rows += run_delivery_bench(model, tok, codecs=codecs, stores=args.store, k=args.k, doc_tokens=n_tok,
                                   reps=args.reps, questions=args.questions, split=args.split,
                                   log=lambda m: print(m, file=sys.stderr))
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json, {k: v for k, v in vars(args).items() if k != "func"})
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kdn", description="kdn_hf: reusable KV caches for LLM knowledge")
    ap.add_argument("-v", "--verbose", action="store_true", help="log store and cache events")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="chunk files and store each chunk's KV")
    p.add_argument("paths", nargs="+", help="files or folders (.txt/.md/.rst, recursive)")
    p.add_argument("--max-tokens", type=int, default=512, help="chunk size limit in tokens (paragraphs are packed)")
    _common(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("ask", help="answer a question over documents, reusing stored KV")
    p.add_argument("question")
    p.add_argument("--doc", action="append", default=[], help="a document file or folder (repeatable)")
    p.add_argument("--system", default=None, help="system prompt placed before the documents")
    p.add_argument("--mode", default="blend", choices=["full", "prefix", "reuse", "blend"])
    p.add_argument("--recompute-ratio", type=float, default=0.15, help="blend: fraction of tokens recomputed")
    p.add_argument("--selection", default="kdn",
                   help="blend: token selection strategy (kdn: question-aware, the default; cacheblend: the paper's "
                        "gradual filtering; cacheblend-oneshot: LMCache's; kdn-adaptive: kdn recomputing only what "
                        "holds 90%% of the question's attention, the ratio as a ceiling)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=512, help="chunk size used when the docs were ingested")
    p.add_argument("--json", action="store_true", help="print the answer and stats as JSON")
    p.add_argument("--raw", action="store_true", help="send the question as is (default: 'Question: ...\\nAnswer:')")
    _common(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("store", help="inspect the store")
    ssub = p.add_subparsers(dest="store_command", required=True)
    q = ssub.add_parser("stats", help="entries and bytes per tier")
    q.add_argument("--json", action="store_true")
    _common(q, model=False)
    q.set_defaults(func=cmd_store_stats)
    q = ssub.add_parser("ls", help="list entries: tier, key, size, codec, tokens, dtype, fingerprint")
    q.add_argument("--json", action="store_true")
    q.add_argument("--limit", type=int, default=0, help="list at most this many per tier (0: all)")
    _common(q, model=False)
    q.set_defaults(func=cmd_store_ls)
    q = ssub.add_parser("verify", help="read every entry, check checksum/key/codec/shape; remove bad ones; report "
                        "repaired and unreadable (newer-format) tiers (exit 1 if an entry is bad or a tier unreadable)")
    q.add_argument("--model", default=None, help="also check fingerprints against this model")
    q.add_argument("--keep", action="store_true", help="report bad entries without removing them")
    _common(q, model=False)
    q.set_defaults(func=cmd_store_verify)
    q = ssub.add_parser("gc", help="evict least recently used entries down to each tier's budget")
    q.add_argument("--budget", default=None, help="budget for tiers whose URL names none, e.g. 2GiB")
    _common(q, model=False)
    q.set_defaults(func=cmd_store_gc)
    q = ssub.add_parser("rm", help="remove entries by key (or all of them)")
    q.add_argument("keys", nargs="*", help="store keys (see `kdn store ls`)")
    q.add_argument("--all", action="store_true", help="remove every entry of every tier")
    _common(q, model=False)
    q.set_defaults(func=cmd_store_rm)

    p = sub.add_parser("bench", help="TTFT and quality of full / prefix / reuse / blend (rag workload); "
                                     "with --codec: the storage/codec bench")
    p.add_argument("--workload", default="rag",
                   help="rag: k documents + system prompt + question; distractor: k generated documents with "
                        "look-alike facts, the answer in one of them; long: the rag prompt with --docs documents "
                        "of exactly --doc-tokens tokens each, one row set per count")
    p.add_argument("--docs", default="4,8,16",
                   help="long workload: documents per prompt, comma list (16 x 512 is cut to fit 8192 positions)")
    p.add_argument("--layer-share", type=float, default=None,
                   help="compare blend selections at equal work: each gets the ratio whose layer%% (recomputed "
                        "layer x context-token rows) is closest to this share, e.g. 0.10 (replaces --ratios)")
    p.add_argument("--methods", default="full,prefix,reuse,blend", help="comma list from full,prefix,reuse,blend")
    p.add_argument("--ratios", default="0.15", help="blend recompute ratios, comma list")
    p.add_argument("--selection", default="kdn,cacheblend,cacheblend-oneshot",
                   help="blend selection strategies, comma list (see kdn_hf.blend.SELECTIONS)")
    p.add_argument("--k", type=int, default=4, help="documents per prompt")
    p.add_argument("--doc-tokens", default="512", help="document length(s) in tokens, comma list")
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions per timed prompt (median reported; default 3, with --codec 5)")
    p.add_argument("--timing-cases", type=int, default=2, help="prompts timed per method")
    p.add_argument("--questions", type=int, default=None,
                   help="QA questions for quality (0: timing only; default 50, with --codec 10)")
    p.add_argument("--split", default="test", choices=["dev", "test"],
                   help="QA split of the method and codec benches: test (reported figures, never tuned on) or dev "
                        "(tuning)")
    p.add_argument("--tf-tokens", type=int, default=32,
                   help="most tokens of full prefill's greedy answer scored (it ends at end-of-sequence)")
    p.add_argument("--lead-in", default="none", choices=["none", "system"],
                   help="what chunks are computed after: BOS only (none) or BOS + the workload's system prompt "
                        "(KDN(lead_in=...): lead-in precompute)")
    p.add_argument("--json", default=None, help="write rows + config as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG plot (TTFT and KL by method and length)")
    p.add_argument("--codec", default=None,
                   help="codecs, comma list (e.g. none,fp16,int8,int4,entropy): run the storage/codec bench instead "
                        "(as `kdn bench-store`): bytes/token, ratio vs fp16, decode tokens/s and MB/s, first-token "
                        "KL vs the uncompressed entry, TTFT per --store (each --store is timed on its own), "
                        "ingest vs raw prefill")
    _common(p, codec=False)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bench-store", help="storage/codec bench (= kdn bench --codec): bytes/token, decode, KL, "
                                           "TTFT per store, ingest")
    p.add_argument("--codec", default="none,fp16,int8,int4,entropy", help="codecs, comma list")
    p.add_argument("--k", type=int, default=4, help="documents per prompt")
    p.add_argument("--doc-tokens", default="512", help="document length(s) in tokens, comma list")
    p.add_argument("--reps", type=int, default=5, help="repetitions per timing (median reported)")
    p.add_argument("--questions", type=int, default=10, help="QA questions for the KL columns (0: none)")
    p.add_argument("--split", default="test", choices=["dev", "test"],
                   help="QA split: test (reported figures, never tuned on) or dev (tuning)")
    p.add_argument("--json", default=None, help="write rows + config as JSON here")
    p.add_argument("--store", action="append", default=None,
                   help="store URL or path to time (repeatable, one row per store; default: memory + temp disk)")
    p.add_argument("--model", default="smollm2-135m", help="bundled model name or local model directory")
    p.set_defaults(func=cmd_bench_store)

    p = sub.add_parser("demo", help="full vs reuse on the bundled model, cold and warm store")
    p.add_argument("--reps", type=int, default=3, help="repetitions per measurement (median reported)")
    _common(p)
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "store", "absent") is None:  # argparse's append would extend a list default in place
        args.store = env.store_spec()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KDNError as e:
        print(f"kdn: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
