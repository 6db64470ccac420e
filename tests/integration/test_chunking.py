"""Paragraph chunking with the real tokenizer: budgets hold, text is kept, results are stable."""

from __future__ import annotations

import pytest

from kdn_hf.chunking import chunk_text, collect_files
from kdn_hf.demo import demo_data
from kdn_hf.errors import InputError


def test_chunks_respect_the_budget_and_keep_every_paragraph(smol):
    _, tok = smol
    text = "\n\n".join(demo_data()["documents"].values())
    long_para = " ".join(["zebra"] * 700)  # one paragraph far over the budget is cut at token boundaries
    chunks = chunk_text(text + "\n\n" + long_para, tok, max_tokens=128)
    assert chunks == chunk_text(text + "\n\n" + long_para, tok, max_tokens=128)  # deterministic
    for c in chunks:
        assert len(tok(c, add_special_tokens=False)["input_ids"]) <= 128
        assert c.endswith("\n\n")
    joined = "".join(chunks)
    for para in demo_data()["documents"]["handbook_lab"].split("\n\n"):
        assert para.strip() in joined
    assert joined.count("zebra") == 700
    with pytest.raises(InputError, match="at least 8"):
        chunk_text(text, tok, max_tokens=2)


def test_collect_files(tmp_path):
    (tmp_path / "a.md").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("y")
    (tmp_path / "c.bin").write_bytes(b"z")
    assert [p.name for p in collect_files([tmp_path])] == ["a.md", "b.txt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .txt"):
        collect_files([tmp_path / "empty"])
