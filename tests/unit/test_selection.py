"""Selection strategies and the recompute mask, without a model."""

from __future__ import annotations

import pytest
import torch

from kdn_hf.blend import (
    SELECTIONS,
    AdaptiveKDNSelection,
    CacheBlendSelection,
    KDNSelection,
    SelectionInput,
    causal_mask,
    get_selection,
    layer_share,
    ratio_for_layer_share,
)
from kdn_hf.errors import ConfigError


def _input(seed: int = 0, tokens: int = 200, budget: int = 30) -> SelectionInput:
    g = torch.Generator().manual_seed(seed)
    dev = torch.randint(0, 5, (tokens,), generator=g).float()  # many ties on purpose
    return SelectionInput(dev, dev.flip(0), ((0, 50), (50, 120), (120, 200)), budget)


@pytest.mark.parametrize("name", sorted(SELECTIONS))
def test_every_strategy_is_deterministic_and_respects_the_budget(name):
    inp = _input()
    sel = get_selection(name)
    a = sel.select(inp)
    b = get_selection(name).select(_input())
    assert torch.equal(a, b)
    assert a.numel() == sel.first_rows(inp.budget, inp.num_tokens) >= inp.budget and a.dtype == torch.long
    assert torch.equal(a, torch.sort(a).values) and a.unique().numel() == a.numel()
    assert int(a.min()) >= 0 and int(a.max()) < inp.num_tokens


def test_kdn_selection_takes_each_later_chunks_first_tokens():
    sel = KDNSelection(sink_tokens=3).select(_input())
    chosen = set(sel.tolist())
    assert {50, 51, 52, 120, 121, 122} <= chosen
    # the first chunk is exact (nothing before it): it gets no forced sinks
    small = KDNSelection(sink_tokens=3).select(_input(budget=4))
    assert small.tolist() == [50, 51, 52, 120]


def test_oneshot_cacheblend_selection_is_top_k_by_k_deviation_and_never_narrows():
    dev = torch.tensor([0.0, 5.0, 1.0, 9.0, 5.0])
    sel = get_selection("cacheblend-oneshot")
    assert sel.select(SelectionInput(dev, torch.zeros(5), ((0, 5),), 2)).tolist() == [1, 3]  # tie: earlier
    assert sel.rows_per_layer(30, 100, 15) == (100,) + (15,) * 29


def test_paper_cacheblend_picks_more_by_kv_deviation_then_filters_down_to_the_budget():
    sel = get_selection("cacheblend")
    dev_k = torch.tensor([0.0, 5.0, 1.0, 9.0, 5.0, 0.0, 2.0, 0.0])
    dev_v = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 8.0, 0.0, 0.0])
    # budget 2, first_factor 2: the 4 largest K+V deviations (5, 9, 6, 8) at the check layer
    assert sel.select(SelectionInput(dev_k, dev_v, ((0, 8),), 2)).tolist() == [1, 3, 4, 5]
    rows = sel.rows_per_layer(30, 1000, 150)
    assert rows[0] == 1000 and rows[1] == 300  # layer 0 fresh for all, 2x the budget at the check layer
    steps = rows[1:6]
    assert all(a > b for a, b in zip(steps, steps[1:])) and rows[5:] == (150,) * 25  # gradual, then the budget
    assert sel.narrow_layers(30) == (1, 2, 3, 4)
    # a shallow model: fewer steps, the budget still reached before the last layer
    assert sel.narrow_layers(4) == (1, 2) and sel.rows_per_layer(4, 100, 10)[-1] == 10
    # ratio 1: every token at every layer, nothing narrowed
    assert set(sel.rows_per_layer(30, 200, 200)) == {200}
    assert CacheBlendSelection(first_factor=1.0).rows_per_layer(30, 100, 15) == (100,) + (15,) * 29
    with pytest.raises(ConfigError, match="first_factor"):
        CacheBlendSelection(first_factor=0.5)
    with pytest.raises(ConfigError, match="filter_steps"):
        CacheBlendSelection(filter_steps=0)


@pytest.mark.parametrize("name", sorted(SELECTIONS))
@pytest.mark.parametrize("share", [0.05, 0.1, 0.15, 0.3])
def test_ratio_for_layer_share_hits_the_target_share(name, share):
    sel = get_selection(name)
    tokens, layers = 1500, 30
    ratio = ratio_for_layer_share(sel, layers, tokens, share)
    got = layer_share(sel, layers, tokens, ratio)
    floor = layer_share(sel, layers, tokens, 1 / tokens)  # a probe's fresh layers cost that much at least
    if share < floor:
        assert ratio == 1 / tokens
    else:
        assert abs(got - share) <= 1.5 / tokens, (name, share, ratio, got)  # within about one token's rows
    assert layer_share(sel, layers, tokens, 1.0) == 1.0
    with pytest.raises(ConfigError, match="layer share"):
        ratio_for_layer_share(sel, layers, tokens, 0.0)


def test_unknown_selection_lists_the_allowed_names():
    with pytest.raises(ConfigError, match="cacheblend"):
        get_selection("nope")


def test_causal_mask_lets_a_row_see_only_keys_at_or_before_its_position():
    rows = torch.tensor([0, 3, 7])
    mask = causal_mask(rows, 9, torch.float32, "cpu")
    assert mask.shape == (1, 1, 3, 9) and mask.dtype == torch.float32
    allowed = mask[0, 0] == 0
    for r, pos in enumerate(rows.tolist()):
        assert allowed[r].tolist() == [k <= pos for k in range(9)]
    assert (mask[0, 0][~allowed] == torch.finfo(torch.float32).min).all()


def test_kdn_selection_with_the_question_takes_what_its_last_token_attends_to():
    layers, q, tokens = 4, 3, 10
    att = torch.zeros(layers, q, tokens)
    att[:, -1, 7] = 0.5   # the last question token looks at 7 and 2
    att[:, -1, 2] = 0.3
    att[:, 0, 5] = 0.9    # an earlier question token looks at 5
    inp = SelectionInput(None, None, ((0, 10),), 2, att)
    assert KDNSelection().select(inp).tolist() == [2, 7]
    assert KDNSelection(query_tokens="mean").select(inp).tolist() == [5, 7]
    sel = KDNSelection()
    assert sel.uses_query and not sel.probes(True) and sel.probes(False)
    assert sel.fresh_layers(True) == 0 and sel.fresh_layers(False) == sel.check_layer
    assert KDNSelection(query_depth=0.5).query_layers(30) == 15
    # sinks are forced with the question too: the second chunk's first token, then the top attention
    two = SelectionInput(None, None, ((0, 4), (4, 10)), 2, att)
    assert KDNSelection(sink_tokens=1).select(two).tolist() == [4, 7]


def test_kdn_selection_rejects_bad_parameters_with_the_allowed_range():
    with pytest.raises(ConfigError, match="query_tokens"):
        KDNSelection(query_tokens="first")
    with pytest.raises(ConfigError, match=r"query_depth must lie in \(0, 1\]"):
        KDNSelection(query_depth=0)
    with pytest.raises(ConfigError, match=r"narrow_depths are fractions of the model's depth in \(0, 1\)"):
        KDNSelection(narrow_depths=(0.5, 1.0))
    with pytest.raises(ConfigError, match=r"narrow_keep must lie in \(0, 1\]"):
        KDNSelection(narrow_keep=0)


def test_kdn_selection_narrows_at_fractions_of_the_depth():
    assert KDNSelection().narrow_layers(30) == (4, 8, 12, 16, 20)
    assert KDNSelection().narrow_layers(3) == (0, 1, 2)  # the recompute never narrows after the last layer
    assert KDNSelection(narrow_depths=()).narrow_layers(30) == ()
    assert KDNSelection(narrow_depths=(0.5,)).narrow_layers(24) == (12,)
    # keeps the narrow_keep share of the rows with the largest deviation, in slot order
    rows = torch.tensor([3, 5, 9, 12])
    sel = KDNSelection(narrow_keep=0.5)
    keep = sel.narrow_count(4, 4, 2, 30)
    assert keep == 2 and sel.narrow(4, rows, torch.tensor([0.1, 4.0, 0.2, 3.0]), keep).tolist() == [1, 3]
    # the question is known: no probe, every row from layer 0; narrowing below the 85% of the rows each time
    r = KDNSelection().rows_per_layer(30, 1000, 150)
    assert r[:5] == (150,) * 5 and r[5] == round(150 * 0.85) and r[-1] < 150 // 2
    assert KDNSelection().rows_per_layer(30, 1000, 150, query_known=False)[0] == 1000  # probe: layer 0 fresh


def _query_input(score: list[float], budget: int, layers: int = 3) -> SelectionInput:
    """A SelectionInput whose question attention averages to ``score`` over ``layers`` layers (the
    layers differ, their mean does not)."""
    s = torch.tensor(score)
    tilt = torch.linspace(-1, 1, layers)[:, None] * 0.1 * s  # sums to 0 over layers
    att = (s[None] + tilt)[:, None, :]  # [layers, 1, tokens]
    zeros = torch.zeros(len(score))
    return SelectionInput(zeros, zeros, ((0, len(score)),), budget, att)


def test_adaptive_kdn_takes_the_fewest_top_tokens_holding_the_coverage_at_most_the_budget():
    score = [0.02, 0.40, 0.05, 0.30, 0.03, 0.10, 0.06, 0.04]  # sums to 1
    inp = _query_input(score, budget=6)
    # 0.40 + 0.30 + 0.10 = 0.80 < 0.85 <= 0.80 + 0.06: four tokens, in slot order
    assert AdaptiveKDNSelection(coverage=0.85).select(inp).tolist() == [1, 3, 5, 6]
    assert AdaptiveKDNSelection(coverage=0.80).select(inp).tolist() == [1, 3, 5]  # exactly reached: 3
    assert AdaptiveKDNSelection(coverage=0.3).select(inp).tolist() == [1]
    # the ratio is a ceiling: coverage 0.99 needs 7 tokens, the budget allows 6 (kdn's own pick)
    assert AdaptiveKDNSelection(coverage=0.99).select(inp).tolist() == KDNSelection().select(inp).tolist()
    assert AdaptiveKDNSelection(coverage=1.0).select(inp).numel() == 6
    # ratio 1 (budget = every token) recomputes every token: exact, as every strategy
    assert AdaptiveKDNSelection(coverage=0.3).select(_query_input(score, budget=8)).tolist() == list(range(8))
    # without the question: kdn's deviation ranking with the whole budget
    plain = _input()
    assert torch.equal(AdaptiveKDNSelection().select(plain), KDNSelection().select(plain))
    # forced sink tokens count: never fewer than them
    two = SelectionInput(inp.dev_k, inp.dev_v, ((0, 4), (4, 8)), 6, inp.query_attention)
    assert AdaptiveKDNSelection(coverage=0.3, sink_tokens=2).select(two).tolist() == [4, 5]
    assert get_selection("kdn-adaptive").adaptive and not get_selection("kdn").adaptive
    with pytest.raises(ConfigError, match="coverage"):
        AdaptiveKDNSelection(coverage=0.0)
