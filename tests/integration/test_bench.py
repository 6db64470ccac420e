"""`kdn bench` end to end at a tiny size: rows, table, JSON and plot."""

from __future__ import annotations

import json

import pytest

from kdn_hf.bench import dev_qa, rag_cases
from kdn_hf.cli import main


def test_dev_qa_set_is_shipped_with_licence_and_enough_questions(smol):
    data = dev_qa()
    assert "CC BY-SA" in data["license"] and "SQuAD" in data["source"]
    assert len(data["questions"]) >= 50
    cases = rag_cases(smol[1], k=4, doc_tokens=512)
    assert len(cases) >= 50 and all(len(c.chunks) == 6 for c in cases)
    assert {c.gold_index for c in cases} == {0, 1, 2, 3}


@pytest.mark.slow
def test_bench_cli_writes_table_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", "--methods", "full,prefix,reuse,blend", "--ratios", "0.2", "--selection", "kdn,cacheblend",
               "--k", "2", "--doc-tokens", "48", "--reps", "1", "--timing-cases", "1", "--questions", "1",
               "--tf-tokens", "4", "--store", "memory://", "--json", str(out_json), "--plot", str(out_png)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "blend@0.2/kdn" in table and "blend@0.2/cacheblend" in table
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["method"] for r in rows] == ["full", "prefix", "reuse", "blend@0.2/kdn", "blend@0.2/cacheblend"]
    full, reuse = rows[0], rows[2]
    assert full["speedup"] == 1.0 and full["kl_mean"] == 0.0 and full["top1_agree"] >= 0.75
    assert reuse["bytes_loaded"] > 0 and reuse["tokens_recomputed"] == 0
    assert rows[3]["tokens_recomputed"] > 0 and rows[3]["kl_mean"] is not None
    assert out_png.stat().st_size > 1000
