"""The SGLang client helper and chunk hints (model-free; no SGLang needed)."""

from __future__ import annotations

from kdn_hf.integrations.sglang.client import KDNRequest, chunk_hints
from kdn_hf.integrations.sglang.units import parse_hints, request_units
from kdn_hf.plan import KeyPolicy, plan_chunks, plan_prefix
from kdn_hf.prompt import Prompt


def test_hints_rebuild_the_prompt_and_its_keys():
    prompt = Prompt((1,), ((5, 6, 7), (8, 9), (10,)))
    hints = chunk_hints(prompt)
    assert hints == {"kdn_opener": 1, "kdn_chunks": [3, 2, 1]}
    policy = KeyPolicy(fingerprint="ab" * 16, opener=(1,))
    units = request_units(lambda opener: KeyPolicy(fingerprint="ab" * 16, opener=opener),
                          prompt.prompt_ids + [11, 12], hints, block_tokens=4)
    assert units.hinted
    assert [u.key for u in units.prefix] == [u.key for u in plan_prefix(policy, prompt)]
    assert [u.key for u in units.chunk] == [u.key for u in plan_chunks(policy, prompt)]
    assert units.exact_keys(1) == [units.prefix[1].key, units.chunk[1].key]  # first chunk: exact chunk entry
    assert units.exact_keys(2) == [units.prefix[2].key]


def test_unusable_hints_fall_back_to_blocks():
    for bad in [{"kdn_chunks": [3, 100]}, {"kdn_chunks": []}, {"kdn_chunks": [2, -1]}, {"kdn_chunks": "3,2"},
                {"kdn_chunks": [2], "kdn_opener": True}, {"kdn_chunks": [True]}]:
        assert parse_hints(bad, 10) is None, bad
    assert parse_hints(None, 10) is None and parse_hints({"other": 1}, 10) is None
    units = request_units(lambda opener: KeyPolicy(fingerprint="ab" * 16, opener=opener), list(range(10)),
                          {"kdn_chunks": [30]}, block_tokens=4)
    assert not units.hinted and [len(u.ids) for u in units.prefix] == [4, 4]  # whole blocks only


def test_request_forms():
    req = KDNRequest([1, 2, 3], {"max_new_tokens": 8, "temperature": 0, "custom_params": {"kdn_chunks": [3]}})
    assert req.native_json() == {"input_ids": [1, 2, 3], "sampling_params": req.sampling_params}
    assert req.openai_kwargs() == {"prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0,
                                   "extra_body": {"custom_params": {"kdn_chunks": [3]}}}
