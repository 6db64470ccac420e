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
    assert reuse["recompute_share"] == 0.0 and 0.0 < rows[3]["recompute_share"] <= rows[4]["recompute_share"]
    assert out_png.stat().st_size > 1000


def test_bench_store_is_an_alias_of_bench_codec():
    from kdn_hf.cli import build_parser, cmd_bench, cmd_bench_store

    ap = build_parser()
    assert ap.parse_args(["bench-store"]).func is cmd_bench_store
    args = ap.parse_args(["bench", "--codec", "int4,entropy", "--store", "memory://", "--store", "/tmp/x"])
    assert args.func is cmd_bench and args.codec == "int4,entropy" and args.store == ["memory://", "/tmp/x"]
    assert ap.parse_args(["bench"]).codec is None  # no --codec: the method bench


@pytest.mark.slow
def test_bench_codec_reports_size_decode_kl_ttft_and_ingest(tmp_path, capsys):
    out_json = tmp_path / "c.json"
    rc = main(["bench", "--codec", "none,fp16,int4,entropy", "--k", "2", "--doc-tokens", "48", "--reps", "1",
               "--questions", "2", "--store", "memory://", "--store", str(tmp_path / "disk"),
               "--json", str(out_json)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "dec_MB/s" in table and "dKL_full" in table
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["store"], r["codec"]) for r in rows] == [(s, c) for s in ("memory", "disk")
                                                        for c in ("none", "fp16", "int4", "entropy")]
    by = {(r["store"], r["codec"]): r for r in rows}
    none, fp16, int4, ent = (by["memory", c] for c in ("none", "fp16", "int4", "entropy"))
    assert fp16["vs_fp16"] == 1.0 and none["vs_fp16"] < 0.6  # fp32 model: 'none' is twice fp16
    assert int4["vs_fp16"] > 3.3 and ent["bytes_per_token"] < int4["bytes_per_token"]  # 48-token groups
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["decode_mb_s"] > 0 and r["ttft_ms"] > 0
        assert r["ingest_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["kl_questions"] == 2
        assert r["kl_full_increase_max"] >= r["kl_full_increase_median"] - 1e-12
        assert sum(r["hits"].values()) >= 2  # every unit of the timed prompt came from the store
    assert none["kl_vs_none"] == 0.0 and ent["kl_vs_none"] == pytest.approx(int4["kl_vs_none"], abs=1e-6)
    assert by["disk", "int4"]["vs_memory"] > 0


def test_bench_prompts_follow_the_models_chat_format(smol):
    """The rag prompts use the model's own turns: SmolLM2's chat template renders exactly the ChatML
    strings the README's figures were measured with; a tokenizer without a template but with Gemma's turn
    markers gets Gemma's turns (its GGUF ships no template); documents sit in the user turn."""
    from kdn_hf.bench.workload import QUESTION, SYSTEM, chat_format

    tok = smol[1]
    assert chat_format(tok) == (SYSTEM, QUESTION)
    case = rag_cases(tok, k=2, doc_tokens=32, limit=1)[0]
    assert tok.decode(case.chunks[0]).endswith("<|im_start|>user\n")
    assert tok.decode(case.chunks[-1]).endswith("<|im_start|>assistant\n")

    class GemmaLike:
        chat_template = None

        def get_vocab(self):
            return {"<start_of_turn>": 105, "<end_of_turn>": 106}

    system, question = chat_format(GemmaLike())
    assert system.startswith("<start_of_turn>user\n") and question.endswith("<start_of_turn>model\n")
    assert "<|im_start|>" not in system + question
