"""``kdn bench --codec ...`` (alias ``kdn bench-store``): what storage and codecs cost and save, on the rag workload.

For each codec (``--codec``) and store (``--store``, repeatable: one row per
store, not a chain; default memory and a temp disk tier) one row (a plain
dict) with:

- ``bytes_per_token``: encoded entry bytes per context token; ``vs_fp16``: the
  fp16 entry's size over this one's (compression ratio);
- ``decode_tok_s`` / ``decode_mb_s``: entry decode throughput (checksum +
  codec, ``decode_entry`` on the CPU) in context tokens/s and stored MB/s
  (10^6 bytes of entry read per second): the median of ``decode_reps`` timed
  passes over every entry of one prompt, after one untimed warm-up pass;
- ``kl_vs_none``: mean first-token KL(reuse with uncompressed entries ||
  reuse with this codec), and ``kl_full_increase``: mean KL(full || codec) -
  KL(full || uncompressed), both in nats, over ``--questions`` questions of ``--split``
  (``_median`` / ``_max`` keys: their median and maximum; ``kl_questions``:
  how many);
- ``ttft_ms``: median TTFT of ``reuse`` with every chunk stored (warm store:
  a memory tier holds it, a disk tier has it in the page cache, Redis holds
  it), and ``vs_memory``: its ratio to the memory store's TTFT;
- ``ingest_tok_s`` / ``prefill_tok_s``: tokens/s stored by ``KDN.ingest`` on
  this store vs raw prefill of the same documents (no store), measured
  alternately in the same run; ``ingest_vs_prefill`` their ratio (the
  paper's "time to inject new knowledge").

Quality reuses one set of computed chunk KV for every codec: each entry is
transcoded from the uncompressed one, so only the codec differs; full prefill
and uncompressed reuse are computed once per question for all codecs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdn_hf.bench.quality import _crop, _forward
from kdn_hf.bench.workload import rag_cases
from kdn_hf.pipeline import compute_unit
from kdn_hf.store.entry import decode_entry, encode_entry

CODECS = ("none", "fp16", "int8", "int4", "entropy")


def _units(kdn, context):
    """The stored units (opener included) of a prompt made of ``context``, as ``reuse`` looks them up."""
    return kdn.plan([list(c) for c in context], mode="reuse")


def _transcode(src, dst, context) -> None:
    """Store src's uncompressed entries of ``context`` into dst with dst's codec (no recompute)."""
    for s, d in zip(_units(src, context), _units(dst, context)):
        chunk = src.store.get(s.key, src.fingerprint.digest).chunk
        if chunk is None:
            raise RuntimeError("transcode source entry missing; ingest it first")
        dst.store.put(d.key, chunk, dst.fingerprint.digest, codec=dst.codec)


@torch.no_grad()  # not inference_mode: prepare may compose on another thread, outside this one's mode
def _first_logp(kdn, context, suffix, mode: str) -> torch.Tensor:
    cache = kdn.prepare([list(c) for c in context], mode=mode, recompute_ratio=0.0)
    n = cache.get_seq_length()
    logp = F.log_softmax(_forward(kdn.model, cache, list(suffix), n)[-1], dim=-1)
    _crop(cache, n)
    return logp


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return max(float(F.kl_div(q, p, log_target=True, reduction="sum")), 0.0)


def _median_time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _summary(name: str, xs: list[float]) -> dict:
    """{name: mean, name_median, name_max} of ``xs`` (None when there are none)."""
    if not xs:
        return {name: None, f"{name}_median": None, f"{name}_max": None}
    return {name: statistics.fmean(xs), f"{name}_median": statistics.median(xs), f"{name}_max": max(xs)}


def codec_sizes_and_decode(base, kdns: dict, context, reps: int) -> dict[str, dict]:
    """Per codec: entry bytes/token of one prompt's units, and decode throughput of those entries
    (median of ``reps`` passes over all of them, after one untimed warm-up pass)."""
    chunks = [base.store.get(u.key, base.fingerprint.digest).chunk for u in _units(base, context)]
    out = {}
    for codec, kc in kdns.items():
        entries = []
        for unit, chunk in zip(_units(kc, context), chunks):
            entries.append((unit.key, encode_entry(unit.key, chunk, kc.fingerprint.digest, codec)))
        size = sum(len(d) for _, d in entries)
        toks = sum(c.num_tokens for c in chunks)

        def decode_all(entries=entries, fingerprint=kc.fingerprint.digest):
            for key, data in entries:
                decode_entry(data, key=key, fingerprint=fingerprint)

        decode_all()  # warm-up: allocator, zstd contexts, first-call overheads
        t = _median_time(decode_all, reps)
        out[codec] = {"bytes_per_token": size / toks, "decode_tok_s": toks / t, "decode_mb_s": size / t / 1e6}
    return out


def codec_quality(base, kdns: dict, qcases, log=print) -> dict[str, dict]:
    """Per codec: first-token KL vs uncompressed reuse and the KL increase vs full prefill, over ``qcases``
    (full prefill and uncompressed reuse computed once per question)."""
    kl_none = {c: [] for c in kdns}
    kl_inc = {c: [] for c in kdns}
    for n, c in enumerate(qcases):
        base.ingest([list(x) for x in c.context], progress=False)
        full = _first_logp(base, c.context, c.suffix, "full")
        ref = _first_logp(base, c.context, c.suffix, "reuse")
        kl_ref = _kl(full, ref)
        for codec, kc in kdns.items():
            if codec == "none":  # the uncompressed entries themselves
                got = ref
            else:
                _transcode(base, kc, c.context)
                got = _first_logp(kc, c.context, c.suffix, "reuse")
            kl_none[codec].append(_kl(ref, got))
            kl_inc[codec].append(_kl(full, got) - kl_ref)
        if log:
            log(f"  quality {n + 1}/{len(qcases)}: KL(full||none) {kl_ref:.4f}  increase "
                + " ".join(f"{codec} {kl_inc[codec][-1]:+.4f}" for codec in kdns))
    return {codec: {**_summary("kl_vs_none", kl_none[codec]), **_summary("kl_full_increase", kl_inc[codec]),
                    "kl_questions": len(kl_none[codec])} for codec in kdns}


def run_delivery_bench(model, tokenizer, *, codecs=CODECS, stores=None, k: int = 4, doc_tokens: int = 512,
                       reps: int = 5, questions: int = 10, ingest_rounds: int = 2, decode_reps: int | None = None,
                       split: str = "test", log=print) -> list[dict]:
    """Rows, one per (codec, store). ``stores``: URLs/paths (None: memory and a temp disk tier).
    ``decode_reps``: timed decode passes (default ``max(reps, 5)``). ``split``: the QA split the prompts
    come from ("test": reporting, "dev": tuning)."""
    from kdn_hf import KDN
    from kdn_hf.codec import check_codec

    codecs = [check_codec(c) for c in codecs]
    tmp = tempfile.TemporaryDirectory(prefix="kdn-bench-store-")
    stores = list(stores) if stores else ["memory://?budget=8GiB", str(Path(tmp.name) / "disk")]
    cases = rag_cases(tokenizer, k=k, doc_tokens=doc_tokens, split=split)
    if not cases:
        from kdn_hf.errors import ConfigError

        raise ConfigError(f"no {split} QA question fits documents cut to {doc_tokens} tokens")
    case = cases[0]
    qcases = rag_cases(tokenizer, k=k, doc_tokens=doc_tokens, limit=questions, split=split) if questions else []
    base = KDN(model, tokenizer, store="memory://?budget=4GiB")
    base.ingest([list(x) for x in case.context], progress=False)
    kdns = {codec: KDN(model, tokenizer, store="memory://?budget=1GiB", codec=codec) for codec in codecs}
    sized = kdns if "fp16" in kdns else {**kdns, "fp16": KDN(model, tokenizer, store="memory://", codec="fp16")}
    sizes = codec_sizes_and_decode(base, sized, case.context, decode_reps or max(reps, 5))
    fp16 = sizes["fp16"]["bytes_per_token"]  # vs_fp16 needs no fp16 row
    per_codec = {codec: sizes[codec] for codec in codecs}
    for codec, pc in per_codec.items():
        log(f"  codec {codec:8s} {pc['bytes_per_token']:9.0f} B/token  decode {pc['decode_tok_s']:9.0f} tok/s "
            f"{pc['decode_mb_s']:8.1f} MB/s")
    quality = codec_quality(base, kdns, qcases, log=log)
    for codec in codecs:
        per_codec[codec].update(quality[codec])
    for kc in kdns.values():
        kc.store.close()
    base.store.close()

    rows = []
    chunks = [list(x) for x in case.chunks]
    docs = [list(x) for x in case.context]
    for spec in stores:
        for codec in codecs:
            kdn = KDN(model, tokenizer, store=spec, codec=codec)
            store_name = "+".join(t.name for t in kdn.store.tiers)
            # ingest vs raw prefill, alternating so machine noise hits both alike
            ingest_t, prefill_t = [], []
            for _ in range(ingest_rounds):
                for unit in _units(kdn, case.context):
                    kdn.store.delete(unit.key)
                t0 = time.perf_counter()
                kdn.ingest(docs, progress=False)
                ingest_t.append(time.perf_counter() - t0)
                units = _units(kdn, case.context)[1 if kdn.opener else 0:]
                t0 = time.perf_counter()
                with torch.inference_mode():
                    for unit in units:
                        compute_unit(model, unit)
                prefill_t.append(time.perf_counter() - t0)
            n_tok = sum(len(d) for d in docs)
            kdn.generate(chunks, max_new_tokens=1, mode="reuse")  # every unit stored (the lead-in too), warm
            ttfts = []
            for _ in range(reps):
                res = kdn.generate(chunks, max_new_tokens=1, mode="reuse")
                ttfts.append(res.stats.ttft_s)
            hits = dict(res.stats.hits)
            ttft = statistics.median(ttfts)
            pc = per_codec[codec]
            row = {"suite": "delivery", "split": split, "k": k, "doc_tokens": doc_tokens,
                   "context_tokens": res.stats.tokens_total,
                   "store": store_name, "codec": codec, "hits": hits, **pc,
                   "vs_fp16": (fp16 / pc["bytes_per_token"]) if fp16 else None, "ttft_ms": ttft * 1000,
                   "ingest_tok_s": n_tok / statistics.median(ingest_t),
                   "prefill_tok_s": n_tok / statistics.median(prefill_t)}
            row["ingest_vs_prefill"] = row["ingest_tok_s"] / row["prefill_tok_s"]
            rows.append(row)
            log(f"  {store_name:8s} {codec:8s} TTFT {ttft * 1000:7.1f} ms  ingest {row['ingest_vs_prefill']:.0%} of prefill")
            kdn.store.close()
    mem = {r["codec"]: r["ttft_ms"] for r in rows if r["store"] == "memory"}
    for r in rows:
        r["vs_memory"] = (r["ttft_ms"] / mem[r["codec"]]) if r["codec"] in mem else None
    tmp.cleanup()
    return rows


COLUMNS = [("store", "{}", 8), ("codec", "{}", 8), ("bytes_per_token", "{:.0f}", 9), ("vs_fp16", "{:.2f}x", 7),
           ("decode_tok_s", "{:.0f}", 9), ("decode_mb_s", "{:.0f}", 7), ("kl_vs_none", "{:.5f}", 8),
           ("kl_full_increase", "{:+.5f}", 9), ("kl_full_increase_max", "{:+.4f}", 8),
           ("ttft_ms", "{:.0f}", 7), ("vs_memory", "{:.2f}x", 7), ("ingest_tok_s", "{:.0f}", 8),
           ("prefill_tok_s", "{:.0f}", 8), ("ingest_vs_prefill", "{:.0%}", 7)]
HEADERS = {"bytes_per_token": "B/token", "decode_tok_s": "dec_tok/s", "decode_mb_s": "dec_MB/s",
           "kl_vs_none": "KL_none", "kl_full_increase": "dKL_full", "kl_full_increase_max": "dKL_max",
           "ttft_ms": "TTFT_ms", "vs_memory": "vs_mem", "ingest_tok_s": "ingest/s", "prefill_tok_s": "prefil/s",
           "ingest_vs_prefill": "ing/pf"}


def format_table(rows: list[dict]) -> str:
    lines = ["  ".join(f"{HEADERS.get(c, c):>{w}}" for c, _, w in COLUMNS)]
    for r in rows:
        lines.append("  ".join(f"{('-' if r.get(c) is None else fmt.format(r[c])):>{w}}" for c, fmt, w in COLUMNS))
    return "\n".join(lines)
