"""The distractor workload's generator, without a model."""

from __future__ import annotations

import pytest

from kdn_hf.bench.distractor import QUESTIONS_PER_SPLIT, generate
from kdn_hf.bench.workload import _normal
from kdn_hf.errors import ConfigError


def _has(text: str, answer: str) -> bool:
    return f" {_normal(answer)} " in f" {_normal(text)} "


@pytest.mark.parametrize("split", ["dev", "test"])
def test_each_answer_sits_in_exactly_one_document_with_look_alikes_in_the_others(split):
    qs = generate(split)
    assert len(qs) == QUESTIONS_PER_SPLIT
    for q in qs:
        assert len(q.docs) == 4 and len({d.kind for d in q.docs}) == 1 and q.docs[q.gold].name in q.question
        holding = [i for i, d in enumerate(q.docs) if any(_has(d.text, a) for a in q.answers)]
        assert holding == [q.gold], (q.qid, q.answers, holding)
        # every other document states the same role with another value
        others = [d.values[q.role] for i, d in enumerate(q.docs) if i != q.gold]
        assert len(set(others)) == 3 and q.docs[q.gold].values[q.role] not in others
        assert all(_has(d.text, d.values[q.role]) for d in q.docs)
    # gold positions, kinds and asked roles all vary
    assert {q.gold for q in qs} == {0, 1, 2, 3}
    assert len({q.docs[0].kind for q in qs}) == 5 and len({q.role for q in qs}) >= 20


def test_generation_is_deterministic_and_the_splits_share_no_names():
    dev, test = generate("dev"), generate("test")
    assert [q.question for q in dev] == [q.question for q in generate("dev")]
    assert [d.text for q in dev for d in q.docs] == [d.text for q in generate("dev") for d in q.docs]
    names = lambda qs: {d.name for q in qs for d in q.docs} | {str(v) for q in qs for d in q.docs
                                                             for v in d.values.values() if not str(v)[0].isdigit()}
    shared = names(dev) & names(test)
    assert not {s for s in shared if s not in {"washing machines", "sewing machines", "vacuum cleaners",
                                              "coffee grinders", "bread ovens", "ceiling fans",
                                              "electric kettles", "typewriters", "January", "March", "April",
                                              "May", "June", "July", "August", "September", "October",
                                              "November"}}
    assert {q.question for q in dev}.isdisjoint(q.question for q in test)


def test_bad_arguments_say_what_is_allowed():
    with pytest.raises(ConfigError, match="dev"):
        generate("train")
    with pytest.raises(ConfigError, match=r"\[2, 8\]"):
        generate("dev", k=1)
