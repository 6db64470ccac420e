"""The distractor workload in ``kdn bench`` and the equal-work (``--layer-share``) comparison."""

from __future__ import annotations

import json

import pytest

from kdn_hf.bench.distractor import distractor_cases
from kdn_hf.bench.run import workload_cases
from kdn_hf.cli import main


def test_distractor_cases_are_rag_requests_of_a_few_hundred_tokens_per_document(smol):
    _, tok = smol
    for split in ("dev", "test"):
        cases = distractor_cases(tok, split=split)
        assert len(cases) == 40 and all(len(c.chunks) == 6 and c.kind == "distractor" for c in cases)
        lengths = [len(doc) for c in cases for doc in c.chunks[1:-1]]
        assert 300 <= min(lengths) and max(lengths) <= 500, (min(lengths), max(lengths))
        for c in cases:  # the answer is in the gold document's tokens only
            texts = [tok.decode(doc) for doc in c.chunks[1:-1]]
            assert [i for i, t in enumerate(texts) if any(a in t for a in c.answers)] == [c.gold_index]
    assert workload_cases("distractor", tok, 4, 512, limit=3) == distractor_cases(tok)[:3]
    # a cut that drops the answer leaves the question out
    assert len(distractor_cases(tok, doc_tokens=40)) < 40


@pytest.mark.slow
def test_bench_at_equal_layer_share_gives_each_selection_its_own_ratio(tmp_path, capsys):
    out_json = tmp_path / "d.json"
    rc = main(["bench", "--workload", "distractor", "--methods", "full,blend", "--layer-share", "0.1",
               "--selection", "kdn,cacheblend,cacheblend-oneshot", "--reps", "1", "--timing-cases", "1",
               "--questions", "1", "--tf-tokens", "4", "--store", "memory://", "--json", str(out_json)])
    assert rc == 0
    rows = json.loads(out_json.read_text())["rows"]
    blends = {r["selection"]: r for r in rows if r["mode"] == "blend"}
    assert set(blends) == {"kdn", "cacheblend", "cacheblend-oneshot"} and rows[0]["workload"] == "distractor"
    # the timed request is the first question, whose context the ratios were fitted to: its layer% is the target
    for sel, r in blends.items():
        assert r["layer_share_target"] == 0.1 and r["recompute_share"] == pytest.approx(0.1, abs=0.002), sel
    # same work, different ratios: kdn narrows (ratio above the share), the probes pay a fresh layer 0
    assert blends["kdn"]["ratio"] > 0.1 > blends["cacheblend-oneshot"]["ratio"] > blends["cacheblend"]["ratio"]
