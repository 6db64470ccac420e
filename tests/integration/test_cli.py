"""The kdn command line on the real model: ingest a folder, ask over it, inspect the store."""

from __future__ import annotations

import json

import pytest

from kdn_hf.cli import main
from kdn_hf.demo import demo_data


@pytest.fixture
def docs_dir(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for name, text in list(demo_data()["documents"].items())[:2]:
        (d / f"{name}.md").write_text(text)
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    return d


def test_ingest_ask_and_store_stats(docs_dir, tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["ingest", str(docs_dir), "--store", store, "--max-tokens", "128"]) == 0
    out = capsys.readouterr().out
    n_chunks = int(out.split("ingested ")[1].split(" chunks")[0])
    assert n_chunks >= 4  # two ~250-token documents in chunks of <= 128 tokens

    assert main(["store", "stats", "--store", store, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["disk"]["entries"] == n_chunks

    q = "What is the daily meal allowance abroad?"
    args = ["ask", q, "--doc", str(docs_dir), "--store", store, "--max-tokens", "128", "--max-new-tokens", "8"]
    assert main(args + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["stats"]["hits"] == {"disk": n_chunks} and res["stats"]["misses"] == 0
    assert res["stats"]["ttft_s"] > 0 and res["text"]

    assert main(args) == 0  # human-readable form: answer on stdout, stats on stderr
    captured = capsys.readouterr()
    assert captured.out.strip() == res["text"].strip()
    assert "TTFT" in captured.err and "misses 0" in captured.err


def test_cli_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["ingest", str(tmp_path / "nope"), "--store", str(tmp_path / "s")]) == 2
    assert "neither a file nor a folder" in capsys.readouterr().err
    assert main(["store", "stats", "--store", "gopher://x"]) == 2
    assert "unknown store scheme" in capsys.readouterr().err


def test_demo_runs_cold_then_warm(tmp_path, capsys):
    from kdn_hf.demo import run_demo

    rows = {r["run"]: r for r in run_demo(store=str(tmp_path / "store"), reps=1)}
    assert list(rows) == ["full prefill", "reuse, cold store", "reuse, warm store", "blend, warm store"]
    assert rows["reuse, cold store"]["hits"] == 0 and rows["reuse, cold store"]["misses"] == 5
    warm = rows["reuse, warm store"]
    assert warm["hits"] == 5 and warm["misses"] == 0 and warm["computed"] < warm["tokens"] // 10
    assert rows["blend, warm store"]["hits"] == 5
    assert rows["full prefill"]["computed"] == rows["full prefill"]["tokens"]
    assert "speedup" in capsys.readouterr().out
