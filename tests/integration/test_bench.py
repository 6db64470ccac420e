"""`kdn bench` end to end at a tiny size: rows, table, JSON and plot; the dev/test QA splits; the quality
harness's measures against the engine and against each other."""

from __future__ import annotations

import json

import pytest

from kdn_hf import KDN
from kdn_hf.bench import Method, dev_qa, qa_set, rag_cases
from kdn_hf.bench.quality import _crop, greedy, score, stop_ids
from kdn_hf.bench.run import quality
from kdn_hf.cli import main
from kdn_hf.errors import ConfigError


def test_dev_qa_set_is_shipped_with_licence_and_enough_questions(smol):
    data = dev_qa()
    assert "CC BY-SA" in data["license"] and "SQuAD" in data["source"]
    assert len(data["questions"]) >= 50
    cases = rag_cases(smol[1], k=4, doc_tokens=512)
    assert len(cases) >= 50 and all(len(c.chunks) == 6 for c in cases)
    assert {c.gold_index for c in cases} == {0, 1, 2, 3}


def test_test_split_is_held_out_has_hotpotqa_and_its_answers_sit_in_the_prompts(smol):
    """The test split shares no question (by id or text) and no SQuAD article with dev, has a source
    besides SQuAD, and every question's answer is in its own prompt's documents (decoded, after the cut)."""
    tok = smol[1]
    dev, test = dev_qa(), qa_set("test")
    assert "CC BY-SA" in test["license"] and "HotpotQA" in test["source"] and "SQuAD" in test["source"]
    assert not {q["id"] for q in dev["questions"]} & {q["id"] for q in test["questions"]}
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    assert not {norm(q["question"]) for q in dev["questions"]} & {norm(q["question"]) for q in test["questions"]}
    dev_titles = {d["title"] for d in dev["documents"]}
    assert not dev_titles & {d["title"] for d in test["documents"] if not d["id"].startswith("hp")}
    cases = rag_cases(tok, k=4, doc_tokens=512, split="test")
    kinds = {c.kind for c in cases}
    assert len(cases) >= 80 and {"squad", "hotpotqa"} <= kinds
    for c in cases:
        docs = tok.decode([t for chunk in c.context[1:] for t in chunk])
        assert any(a in docs for a in c.answers), (c.qid, c.answers)
        gold = tok.decode(c.context[1 + c.gold_index])
        assert any(a in gold for a in c.answers), c.qid  # gold_index is the document holding the answer
        if c.kind == "hotpotqa":  # both gold paragraphs' documents are in the prompt
            assert len(c.gold_indices) == 2 and c.gold_index in c.gold_indices
    assert {c.gold_index for c in cases} == {0, 1, 2, 3}
    with pytest.raises(ConfigError, match="dev, test|'dev', 'test'"):
        rag_cases(tok, split="validation")


def test_answer_top1_stops_at_end_of_sequence(smol):
    """Full prefill's greedy answer ends at the model's end-of-turn; top-1 agreement of full against itself
    is exactly 1 over the answer even when tokens follow the end-of-sequence token (which the model would
    not predict): only the answer's tokens are scored. Without the stop those tokens count and it drops."""
    model, tok = smol
    kdn = KDN(model, tok, store="memory://")
    case = rag_cases(tok, k=2, doc_tokens=96, split="test", limit=1)[0]
    ctx = [list(c) for c in case.context]
    stop = stop_ids(model, tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop
    cache = kdn.prepare(ctx, mode="full")
    n_ctx = cache.get_seq_length()
    cont = greedy(model, cache, list(case.suffix), 32, stop)
    _crop(cache, n_ctx)
    assert cont[-1] in stop and len(cont) < 32 and not set(cont[:-1]) & stop
    junk = tok(" zebra quantum 1848 Vaduz", add_special_tokens=False)["input_ids"] * 3
    scored = score(model, tok, cache, case.suffix, cont + junk, case.answers, stop=stop)
    assert scored["agree"] == 1.0
    assert scored["logp"].shape[0] == min(8, len(cont))  # answer KL positions stop at the end too
    unstopped = score(model, tok, cache, case.suffix, cont + junk, case.answers, stop=frozenset())
    assert unstopped["agree"] < 1.0


def test_quality_measures_against_generate_and_across_methods(smol):
    """On test-split questions: the harness's full answers are stock generate's (mode full); blend at ratio
    1.0 recomputes everything, so it answers as full on every question (same text, same EM, no flips) with
    answer-token KL ~0, while naive reuse has a clearly larger answer-token KL."""
    model, tok = smol
    kdn = KDN(model, tok, store="memory://")
    cases = rag_cases(tok, k=3, doc_tokens=128, split="test", limit=2)  # one SQuAD, one HotpotQA
    assert {c.kind for c in cases} == {"squad", "hotpotqa"}
    methods = [Method("full", "full"), Method("reuse", "reuse"), Method("blend@1/kdn", "blend", 1.0, "kdn")]
    q = quality(kdn, methods, cases, tf_tokens=20, log=None)
    full, reuse, blend = (q[m.label] for m in methods)
    for case, row in zip(cases, full["per_question"]):
        res = kdn.generate([list(c) for c in case.chunks], max_new_tokens=20, mode="full")
        assert row["qid"] == case.qid and row["answer"] == res.text.strip().split("\n")[0]
    for f, b in zip(full["per_question"], blend["per_question"]):
        assert b["answer"] == f["answer"] and b["em"] == f["em"] and b["f1"] == f["f1"]
        assert b["answer_kl"] < 1e-3 and b["agree"] == 1.0
    assert blend["flips"] == {"lost": [], "gained": []} and blend["em"] == full["em"]
    assert reuse["answer_kl_mean"] > 10 * max(blend["answer_kl_mean"], 1e-4)
    assert set(reuse["flips"]["lost"]) <= {r["qid"] for r in full["per_question"] if r["correct"]}


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
    assert all(r["split"] == "test" for r in rows)  # the default split: reported figures
    assert full["bytes_loaded"] == 0 and full["recompute_share"] == 0.0  # full reads nothing from the store
    assert reuse["bytes_loaded"] > 0 and reuse["tokens_recomputed"] == 0
    for r in rows[2:]:  # per-question records for every measured method, one per question
        assert [p["qid"] for p in r["per_question"]] == [p["qid"] for p in full["per_question"]]
        assert 0.0 <= r["em"] <= r["f1"] <= 1.0 and r["answer_kl_mean"] >= 0.0
    assert "EM" in table and "ansKL" in table
    assert rows[3]["tokens_recomputed"] > 0 and rows[3]["kl_mean"] is not None
    assert reuse["recompute_share"] == 0.0 and 0.0 < rows[3]["recompute_share"] <= rows[4]["recompute_share"]
    # the quality question's work: the same prompt as the timed one here (one case)
    assert [r["quality_layer_share"] for r in rows[2:]] == pytest.approx([r["recompute_share"] for r in rows[2:]])
    assert "q_layer%" in table
    assert out_png.stat().st_size > 1000


def test_bench_refuses_no_timing_and_an_adaptive_selection_at_equal_work(capsys):
    """Every row reports a median TTFT, so no timed prompt is a clear error, not a crash; an adaptive
    selection sizes its budget per request, so ``--layer-share`` (a ratio fixed in advance) refuses it."""
    base = ["bench", "--methods", "full,blend", "--k", "2", "--doc-tokens", "48", "--questions", "0",
            "--store", "memory://"]
    assert main(base + ["--timing-cases", "0"]) == 2
    assert "--timing-cases and --reps must be >= 1" in capsys.readouterr().err
    assert main(base + ["--reps", "1", "--timing-cases", "1", "--selection", "kdn-adaptive", "--layer-share", "0.1"]) == 2
    assert "sizes its own budget" in capsys.readouterr().err


def test_bench_store_is_an_alias_of_bench_codec():
    from kdn_hf.cli import build_parser, cmd_bench, cmd_bench_store

    ap = build_parser()
    assert ap.parse_args(["bench-store"]).func is cmd_bench_store
    args = ap.parse_args(["bench", "--codec", "int4,entropy", "--store", "memory://", "--store", "/tmp/x"])
    assert args.func is cmd_bench and args.codec == "int4,entropy" and args.store == ["memory://", "/tmp/x"]
    assert ap.parse_args(["bench"]).codec is None  # no --codec: the method bench
    # both report on the test split unless told otherwise
    assert ap.parse_args(["bench-store"]).split == ap.parse_args(["bench", "--codec", "int4"]).split == "test"
    assert ap.parse_args(["bench-store", "--split", "dev"]).split == "dev"


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
        assert r["split"] == "test"
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
