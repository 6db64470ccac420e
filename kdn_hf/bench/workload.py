"""The ``rag`` workload: k documents of real text, a system prompt and a question.

Documents and questions come from the dev QA set shipped in
``kdn_hf/data/dev_qa.json`` (SQuAD v2.0 passages, CC BY-SA 4.0, plus planted
facts; see its ``source``/``license`` fields and ``scripts/make_dev_qa.py``).
Each question's prompt holds its gold document and ``k - 1`` distractors from
other articles, the gold one at a position that cycles with the question index,
so every layout is deterministic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from kdn_hf.prompt import opener_ids

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


@lru_cache(maxsize=1)
def dev_qa() -> dict:
    """The dev QA set: {"documents": [{id, title, text}], "questions": [{id, doc, kind, question, answers}]}."""
    return json.loads(resources.files("kdn_hf").joinpath("data/dev_qa.json").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class RagCase:
    """One request. chunks: [system, doc_1..doc_k, question] as token-id tuples (the question
    last, prefilled fresh). answers: accepted answer strings. kind: "squad" or "planted"."""

    qid: str
    chunks: tuple[tuple[int, ...], ...]
    answers: tuple[str, ...]
    kind: str
    gold_index: int

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


def rag_cases(tokenizer, k: int = 4, doc_tokens: int = 512, limit: int | None = None,
              kinds: tuple[str, ...] = ("squad", "planted"), fill: bool = False) -> list[RagCase]:
    """The rag requests for ``k`` documents cut to at most ``doc_tokens`` tokens each.

    fill: bring each document to exactly ``doc_tokens`` tokens by appending the next documents of
    its article (``\n\n`` between them, cycling through the article's documents), so that a prompt
    holds ``k * doc_tokens`` document tokens (the long-context workload); else documents shorter
    than the cut stay as they are (the dev documents hold 218-517 tokens).
    Questions whose answer falls past the cut (in the question's own document) are left out. ``limit`` keeps the first
    ones after interleaving kinds (planted, squad, planted, ...), so a small limit
    still mixes both.
    """
    data = dev_qa()
    docs = data["documents"]
    by_id = {d["id"]: i for i, d in enumerate(docs)}
    enc = lambda s: tuple(tokenizer(s, add_special_tokens=False)["input_ids"])
    sep = enc("\n\n")
    cut = {}
    texts = {d["id"]: enc(d["text"]) for d in docs}
    for d in docs:
        ids = texts[d["id"]][:doc_tokens]
        own = tokenizer.decode(ids)
        if fill:
            article = d["id"].split("-")[0]
            same = [e["id"] for e in docs if e["id"].split("-")[0] == article]
            at = same.index(d["id"])
            j = 1
            while len(ids) < doc_tokens:
                ids = (ids + sep + texts[same[(at + j) % len(same)]])[:doc_tokens]
                j += 1
        cut[d["id"]] = (ids + sep, own)
    system_text, question_format = chat_format(tokenizer)
    system = enc(system_text)
    cases = []
    for n, q in enumerate(data["questions"]):
        if q["kind"] not in kinds:
            continue
        gold = by_id[q["doc"]]
        if not any(a in cut[q["doc"]][1] for a in q["answers"]):
            continue
        article = q["doc"].split("-")[0]
        others = [d["id"] for d in docs[gold + 1:] + docs[:gold] if d["id"].split("-")[0] != article]
        step = max(1, len(others) // max(1, k - 1))
        picked = [others[(n * 5 + j * step) % len(others)] for j in range(k - 1)]
        at = n % k
        layout = picked[:at] + [q["doc"]] + picked[at:]
        question = enc(question_format.format(question=q["question"]))
        chunks = (system, *(cut[i][0] for i in layout), question)
        cases.append(RagCase(q["id"], chunks, tuple(q["answers"]), q["kind"], at))
    if limit is not None:
        planted = [c for c in cases if c.kind == "planted"]
        squad = [c for c in cases if c.kind != "planted"]
        mixed = [c for pair in zip(planted, squad) for c in pair]
        mixed += planted[len(squad):] + squad[len(planted):]
        cases = mixed[:limit]
    return cases
