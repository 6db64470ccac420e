"""Where a request's stored entries start and end: chunk hints from clients, or fixed blocks.

SGLang hands the cache a flat token list. A client that built its prompt with
``kdn_hf.prompt`` (see ``kdn_hf.integrations.sglang.client``) passes the
boundaries in ``sampling_params.custom_params``::

    {"kdn_opener": 1, "kdn_chunks": [37, 412, 388, 21]}

``kdn_opener``: how many leading ids open the prompt (BOS: 1, or 0);
``kdn_chunks``: the length of each chunk after the opener, in order. Their sum
may be less than the prompt (ids past the last chunk, e.g. a generation
prompt, belong to no entry). With those, the request's units are exactly
``kdn_hf.plan``'s units of the same ``Prompt``, so entries ingested or
computed by the HuggingFace path are found here and the other way round.

Without hints (or with hints that do not fit the prompt, logged once) the
prompt is cut into fixed blocks of ``block_tokens`` ids after no opener;
their prefix entries are shared among SGLang servers only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from kdn_hf.plan import KeyPolicy, Unit, plan_chunks, plan_prefix
from kdn_hf.prompt import Prompt

log = logging.getLogger("kdn_hf.sglang")

CHUNKS_PARAM = "kdn_chunks"
OPENER_PARAM = "kdn_opener"


@dataclass(frozen=True)
class RequestUnits:
    """A request's prompt cut into units (``kdn_hf.plan.Unit``).

    prefix:  every unit keyed by its exact left context (``plan_prefix``), in prompt order.
    chunk:   for each unit, its position-independent counterpart (``plan_chunks``; same ids and start),
             or None when the prompt has no chunk boundaries (blocks).
    hinted:  whether the boundaries came from the client.
    """

    prefix: tuple[Unit, ...]
    chunk: tuple[Unit | None, ...]
    hinted: bool

    def exact_keys(self, i: int) -> list[str]:
        """Keys whose entry holds exactly what full prefill has at unit ``i``: its prefix key, and its
        chunk key when the chunk was computed after exactly the ids before it (the opener, the first chunk)."""
        keys = [self.prefix[i].key]
        chunk = self.chunk[i]
        if chunk is not None and chunk.exact:
            keys.append(chunk.key)
        return keys


def parse_hints(custom_params: Any, prompt_len: int) -> tuple[int, tuple[int, ...]] | None:
    """(opener length, chunk lengths) from ``custom_params``, or None when absent or unusable."""
    if not isinstance(custom_params, dict) or CHUNKS_PARAM not in custom_params:
        return None
    chunks, opener = custom_params.get(CHUNKS_PARAM), custom_params.get(OPENER_PARAM, 0)
    ok = (
        isinstance(chunks, (list, tuple)) and len(chunks) > 0
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in chunks)
        and isinstance(opener, int) and not isinstance(opener, bool) and 0 <= opener
        and opener + sum(chunks) <= prompt_len
    )  # fmt: skip
    if not ok:
        log.warning("ignoring unusable %s=%r / %s=%r for a %d-token prompt (positive lengths that fit it "
                    "expected); using fixed blocks", CHUNKS_PARAM, chunks, OPENER_PARAM, opener, prompt_len)
        return None
    return opener, tuple(chunks)


def request_units(policy_for, prompt_ids: Sequence[int], custom_params: Any, block_tokens: int) -> RequestUnits:
    """Units of a prompt. ``policy_for(opener)`` returns the KeyPolicy for that opener."""
    ids = tuple(int(i) for i in prompt_ids)
    hints = parse_hints(custom_params, len(ids))
    if hints is not None:
        n_open, lengths = hints
        chunk_ids, at = [], n_open
        for n in lengths:
            chunk_ids.append(ids[at : at + n])
            at += n
        prompt = Prompt(ids[:n_open], tuple(chunk_ids))
        policy: KeyPolicy = policy_for(prompt.opener)
        return RequestUnits(plan_prefix(policy, prompt), plan_chunks(policy, prompt), True)
    n_blocks = len(ids) // block_tokens
    prompt = Prompt((), tuple(ids[i * block_tokens : (i + 1) * block_tokens] for i in range(n_blocks)))
    prefix = plan_prefix(policy_for(()), prompt)
    return RequestUnits(prefix, (None,) * len(prefix), False)
