"""The README demo: full prefill vs stored-KV reuse (cold and warm store) vs blend.

Runs on the bundled model and the embedded default store (a disk tier under
KDN_HOME). The demo's entries are deleted first so that the first reuse run
really is cold.
"""

from __future__ import annotations

import json
import statistics
from importlib import resources

from kdn_hf.prompt import chat_chunks

SYSTEM = ("You are the assistant of a research institute. Answer the question in one short sentence, "
          "using only the handbook below.")


def demo_data() -> dict:
    return json.loads(resources.files("kdn_hf").joinpath("data/demo_docs.json").read_text(encoding="utf-8"))


def demo_prompt(tokenizer, data: dict, question: str) -> list[str]:
    """[system, *handbook documents, question] in the model's chat format."""
    return chat_chunks(tokenizer, SYSTEM, [d.strip() for d in data["documents"].values()], question)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else repr(text)


def run_demo(store=None, model: str = "smollm2-135m", reps: int = 3) -> list[dict]:
    from kdn_hf import KDN

    print(f"loading {model} (the first run converts the bundled GGUF once, about 30 s) ...")
    kdn = KDN.from_pretrained(model, store=store, namespace="kdn-demo")
    data = demo_data()
    qa = data["questions"][1]
    chunks = demo_prompt(kdn.tokenizer, data, qa["q"])
    for chunk in chunks[:-1]:  # make the first reuse run cold
        kdn.store.delete(kdn.key_for(chunk))
    tiers = ", ".join(f"{t.name}" for t in kdn.store.tiers)
    print(f"store: {tiers} ({', '.join(str(getattr(t, 'root', 'memory')) for t in kdn.store.tiers)})")
    print(f"prompt: {len(chunks) - 1} chunks + question\n")

    rows = []

    def measure(label: str, mode: str, n: int) -> None:
        runs = [kdn.generate(chunks, max_new_tokens=24, mode=mode) for _ in range(n)]
        s = runs[-1].stats
        rows.append({
            "run": label, "mode": mode, "ttft_s": statistics.median(r.stats.ttft_s for r in runs),
            "hits": s.hit_count, "misses": s.misses, "tokens": s.tokens_total,
            "computed": s.tokens_computed + s.tokens_recomputed, "answer": _first_line(runs[-1].text),
        })

    kdn.generate(chunks[-1:], max_new_tokens=2, mode="full")  # warm up the model, not the store
    measure("full prefill", "full", reps)
    measure("reuse, cold store", "reuse", 1)
    measure("reuse, warm store", "reuse", reps)
    measure("blend, warm store", "blend", reps)
    base = rows[0]["ttft_s"]
    print(f"{'run':20s} {'TTFT':>9s} {'speedup':>8s} {'hits':>5s} {'computed':>10s}")
    for r in rows:
        print(f"{r['run']:20s} {r['ttft_s'] * 1000:7.0f}ms {base / r['ttft_s']:7.1f}x {r['hits']:5d} "
              f"{r['computed']:5d}/{r['tokens']:<4d}")
    print(f"\nquestion: {qa['q']}  (the handbook says: {qa['a']})")
    for r in rows:
        print(f"  {r['run']:20s} {r['answer']}")
    print("\nreuse skips the documents' prefill; its answers can drift from full prefill because chunks "
          "computed on their own miss each other's attention. blend (the default mode) recomputes 15% of the "
          "tokens against the whole context to win most of it back.")
    return rows
