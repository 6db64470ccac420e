"""The ``rag`` workload: k documents of real text, a system prompt and a question.

Documents and questions come from one of two QA sets shipped in ``kdn_hf/data/``
(see their ``source``/``license`` fields and ``kdn_hf/data/README.md``):

- ``dev`` (``dev_qa.json``, ``scripts/make_dev_qa.py``): SQuAD v2.0 passages plus
  planted facts. Settings are tuned on it.
- ``test`` (``test_qa.json``, ``scripts/make_test_qa.py``): SQuAD v2.0 questions from
  other articles and HotpotQA multi-hop questions, never used for tuning; reported
  figures come from it.

Each question's prompt holds its gold document(s) (HotpotQA questions have two)
and distractors from other articles up to ``k`` documents, the gold ones at
positions that cycle with the question index, so every layout is deterministic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from kdn_hf.errors import ConfigError
from kdn_hf.prompt import opener_ids

#: QA set name -> file under kdn_hf/data/
SPLITS = {"dev": "dev_qa.json", "test": "test_qa.json"}

INSTRUCTION = "You are a helpful assistant. Answer the question with a few words, using only the documents."
# SmolLM2-Instruct's chat format (what chat_format gives for it): the documents sit in the user turn, the
# question closes it.
SYSTEM = f"<|im_start|>system\n{INSTRUCTION}<|im_end|>\n<|im_start|>user\n"
QUESTION = "Question: {question}<|im_end|>\n<|im_start|>assistant\n"
#: Gemma's turns (its GGUF carries no chat template): no system role, the instruction opens the user turn
_GEMMA = (f"<start_of_turn>user\n{INSTRUCTION}\n\n", "Question: {question}<end_of_turn>\n<start_of_turn>model\n")


def chat_format(tokenizer) -> tuple[str, str]:
    """(system chunk, question template with ``{question}``) in the model's chat format, the documents
    sitting between them in the user turn: rendered from the tokenizer's chat template where it has one
    (BOS left out: it is the prompt's opener), else Gemma's or ChatML turns when the vocabulary has their
    markers, else plain text."""
    mark = "\x00KDN_USER\x00"
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": mark}],
            tokenize=False, add_generation_prompt=True)
        head, tail = rendered.split(mark)
        bos = getattr(tokenizer, "bos_token", None)
        if bos and head.startswith(bos) and opener_ids(tokenizer):  # BOS the tokenizer adds: the opener
            head = head[len(bos):]
        return head, "Question: {question}" + tail.replace("{", "{{").replace("}", "}}")
    vocab = tokenizer.get_vocab()
    if "<start_of_turn>" in vocab:
        return _GEMMA
    if "<|im_start|>" in vocab:
        return SYSTEM, QUESTION
    return INSTRUCTION + "\n\n", "Question: {question}\nAnswer:"


@lru_cache(maxsize=None)
def qa_set(split: str = "dev") -> dict:
    """A QA set: {"name", "source", "license", "documents": [{id, title, text}], "questions": [{id, doc or
    docs, kind, question, answers}]}. ``doc`` names the gold document; ``docs`` lists several, the one holding
    the answer first. split: "dev" (tune on it) or "test" (report on it)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown QA split {split!r}; choose one of {sorted(SPLITS)} (dev: tuning, test: reporting)")
    return json.loads(resources.files("kdn_hf").joinpath(f"data/{SPLITS[split]}").read_text(encoding="utf-8"))


def dev_qa() -> dict:
    """The dev QA set (``qa_set("dev")``)."""
    return qa_set("dev")


def gold_docs(question: dict) -> list[str]:
    """Ids of a question's gold documents, the one holding the answer first."""
    return list(question["docs"]) if "docs" in question else [question["doc"]]


@dataclass(frozen=True)
class RagCase:
    """One request. chunks: [system, doc_1..doc_k, question] as token-id tuples (the question
    last, prefilled fresh). answers: accepted answer strings. kind: the question's source ("squad",
    "planted", "hotpotqa", ...). gold_index: position among the documents of the one holding the answer;
    gold_indices: positions of all gold documents (empty: just gold_index). question: its text."""

    qid: str
    chunks: tuple[tuple[int, ...], ...]
    answers: tuple[str, ...]
    kind: str
    gold_index: int
    gold_indices: tuple[int, ...] = ()
    question: str = ""

    @property
    def context(self) -> tuple[tuple[int, ...], ...]:
        return self.chunks[:-1]

    @property
    def suffix(self) -> tuple[int, ...]:
        return self.chunks[-1]


def _normal(s: str) -> str:
    return " ".join("".join(c.lower() if c.isalnum() else " " for c in s).split())


def answer_found(text: str, answers) -> bool:
    """True if any answer appears in the first line of ``text`` (case and punctuation ignored)."""
    line = _normal(text.strip().split("\n")[0])
    return any(_normal(a) and _normal(a) in line for a in answers)


def gold_positions(n: int, k: int, golds: int) -> list[int]:
    """Positions among ``k`` documents of a prompt's ``golds`` gold documents for question index ``n``:
    spread evenly, rotating with ``n`` (one gold document: ``n % k``)."""
    step = max(1, k // golds)
    return [(n + i * step) % k for i in range(golds)]


def interleave(cases: list[RagCase]) -> list[RagCase]:
    """Cases reordered to take turns by kind (kinds in order of first appearance), so a prefix mixes them."""
    by_kind: dict[str, list[RagCase]] = {}
    for c in cases:
        by_kind.setdefault(c.kind, []).append(c)
    groups = list(by_kind.values())
    return [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]


def rag_cases(tokenizer, k: int = 4, doc_tokens: int = 512, limit: int | None = None,
              kinds: tuple[str, ...] | None = None, split: str = "dev", fill: bool = False) -> list[RagCase]:
    """The rag requests of QA set ``split`` for ``k`` documents cut to at most ``doc_tokens`` tokens each.

    Questions whose answer falls past the cut of every gold document, or with more gold documents than
    ``k``, are left out. ``kinds``: keep only these question kinds (None: all). ``limit`` keeps the first
    ones after interleaving kinds (planted, squad, planted, ...), so a small limit still mixes them.
    The default split is dev, the tuning split (scripts that choose settings use it); ``kdn bench``
    reports on test.

    fill: bring each document to exactly ``doc_tokens`` tokens by appending the next documents of its
    article, then of the set (``\n\n`` between them), so that a prompt holds ``k * doc_tokens`` document
    tokens (the long-context workload); the answer must still sit in the gold document's own text.
    Else documents shorter than the cut stay as they are.
    """
    data = qa_set(split)
    docs = data["documents"]
    by_id = {d["id"]: i for i, d in enumerate(docs)}
    enc = lambda s: tuple(tokenizer(s, add_special_tokens=False)["input_ids"])
    sep = enc("\n\n")
    texts = {d["id"]: enc(d["text"]) for d in docs}
    cut = {}
    for i, d in enumerate(docs):
        ids = texts[d["id"]][:doc_tokens]
        own = tokenizer.decode(ids)
        if fill:
            article = d["id"].split("-")[0]
            rest = docs[i + 1:] + docs[:i]
            after = [e["id"] for e in rest if e["id"].split("-")[0] == article]
            after += [e["id"] for e in rest if e["id"].split("-")[0] != article]
            for nxt in after:
                if len(ids) >= doc_tokens:
                    break
                ids = (ids + sep + texts[nxt])[:doc_tokens]
        cut[d["id"]] = (ids + sep, own)
    system_text, question_format = chat_format(tokenizer)
    system = enc(system_text)
    cases = []
    for n, q in enumerate(data["questions"]):
        golds = gold_docs(q)
        if (kinds is not None and q["kind"] not in kinds) or len(golds) > k:
            continue
        if not any(a in cut[g][1] for g in golds for a in q["answers"]):
            continue
        gold = by_id[golds[0]]
        articles = {g.split("-")[0] for g in golds}
        others = [d["id"] for d in docs[gold + 1:] + docs[:gold] if d["id"].split("-")[0] not in articles]
        n_other = k - len(golds)
        step = max(1, len(others) // max(1, n_other))
        layout = [others[(n * 5 + j * step) % len(others)] for j in range(n_other)]
        at = gold_positions(n, k, len(golds))
        for pos, g in sorted(zip(at, golds)):
            layout.insert(pos, g)
        question = enc(question_format.format(question=q["question"]))
        chunks = (system, *(cut[i][0] for i in layout), question)
        cases.append(RagCase(q["id"], chunks, tuple(q["answers"]), q["kind"], at[0], tuple(sorted(at)),
                             q["question"]))
    if limit is not None:
        cases = interleave(cases)[:limit]
    return cases
