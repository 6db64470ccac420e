"""SQuAD exact match / F1 (the official evaluation script's normalisation) and the answer span that the
teacher-forced measures score (up to end-of-sequence)."""

from __future__ import annotations

import pytest

from kdn_hf.bench.quality import answer_length, normalize_answer, squad_em, squad_f1


@pytest.mark.parametrize("text, normal", [
    ("The Norman dynasty", "norman dynasty"),          # article and case
    ("  in the 10th and 11th centuries. ", "in 10th and 11th centuries"),
    ("Denver Broncos!", "denver broncos"),              # punctuation
    ("an apple a day", "apple day"),                    # a / an
    ("Theatre and anthem", "theatre and anthem"),       # articles only as whole words
    ("8,211 at the 2010 census", "8211 at 2010 census"),  # punctuation inside numbers goes, like the script
    ("Saint-Denis", "saintdenis"),
])
def test_normalisation_follows_the_squad_script(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_takes_the_best_gold_answer():
    golds = ["Denver Broncos", "The Denver Broncos"]
    assert squad_em("the denver broncos.", golds) == 1.0
    assert squad_em("Denver", golds) == 0.0
    assert squad_em("Broncos of Denver", golds) == 0.0


def test_f1_over_tokens_max_over_golds():
    # SQuAD example: prediction "Denver Broncos" against "Broncos": precision 1/2, recall 1 -> F1 2/3
    assert squad_f1("Denver Broncos", ["Broncos"]) == pytest.approx(2 / 3)
    # repeated tokens count once per occurrence in both (Counter intersection)
    assert squad_f1("the the cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert squad_f1("Santa Clara, California", ["Santa Clara", "Levi's Stadium"]) == pytest.approx(0.8)
    assert squad_f1("nothing in common", ["Broncos"]) == 0.0
    assert squad_f1("The", ["a"]) == 1.0  # both normalise to empty: the script counts them equal
    assert squad_f1("", ["Broncos"]) == 0.0


def test_answer_length_ends_at_the_first_stop_token():
    assert answer_length([5, 6, 2, 9, 9], {2}) == 3  # the stop token is part of the answer
    assert answer_length([2, 5], {2, 7}) == 1
    assert answer_length([5, 6, 9], {2}) == 3  # no stop token: everything
    assert answer_length([5, 6, 9], frozenset()) == 3
