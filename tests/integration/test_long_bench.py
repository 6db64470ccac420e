"""The long-context workload of `kdn bench`: documents filled to a length, cut to fit the model."""

from __future__ import annotations

import json

import pytest

from kdn_hf.bench import rag_cases
from kdn_hf.bench.long import fit_doc_tokens, max_positions
from kdn_hf.cli import main


def test_filled_documents_have_exactly_the_asked_length(smol):
    tok = smol[1]
    sep = len(tok("\n\n", add_special_tokens=False)["input_ids"])
    cases = rag_cases(tok, k=8, doc_tokens=512, fill=True)
    assert len(cases) >= 50
    for case in cases[:10]:
        assert [len(d) for d in case.chunks[1:-1]] == [512 + sep] * 8
    # unfilled: the dev documents are shorter than 512 tokens, most of them
    short = rag_cases(tok, k=8, doc_tokens=512)[0]
    assert sum(len(d) for d in short.chunks[1:-1]) < 8 * (512 + sep)
    # the gold document still holds the answer at the front: the same questions survive the cut
    assert [c.qid for c in cases] == [c.qid for c in rag_cases(tok, k=8, doc_tokens=512)]


def test_sixteen_documents_are_cut_to_fit_the_positions(smol):
    model, tok = smol
    limit = max_positions(model)
    assert limit == 8192
    n = fit_doc_tokens(tok, 16, 512, limit, reserve=33)
    assert n < 512
    longest = max(sum(len(c) for c in case.chunks) for case in rag_cases(tok, k=16, doc_tokens=n, fill=True))
    assert longest + 33 <= limit
    assert fit_doc_tokens(tok, 8, 512, limit, reserve=33) == 512  # 8 x 512 fits as asked


@pytest.mark.slow
def test_bench_long_workload_rows_memory_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "l.json", tmp_path / "l.png"
    rc = main(["bench", "--workload", "long", "--docs", "1,2", "--doc-tokens", "24", "--methods",
               "full,reuse,blend", "--selection", "kdn", "--reps", "1", "--timing-cases", "1", "--questions", "0",
               "--store", "memory://", "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["k"], r["method"]) for r in rows] == [(1, "full"), (1, "reuse"), (1, "blend@0.15/kdn"),
                                                    (2, "full"), (2, "reuse"), (2, "blend@0.15/kdn")]
    assert all(r["workload"] == "long" and r["doc_tokens"] == 24 for r in rows)
    assert rows[3]["context_tokens"] > rows[0]["context_tokens"]
    # memory: full prefill of 2 documents holds its KV cache at least (30 layers x 2 x 3 heads x 64 x fp32)
    kv_bytes = 30 * 2 * 3 * 64 * 4 * rows[3]["context_tokens"]
    assert all(r["peak_mem_bytes"] is not None for r in rows)
    assert rows[3]["peak_mem_bytes"] >= kv_bytes
    assert out_png.stat().st_size > 1000
    assert "MiB_peak" in capsys.readouterr().out
