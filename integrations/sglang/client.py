"""Client side: a chunk list becomes SGLang input ids plus the ``kdn_chunks`` hints.

SGLang tokenizes a text prompt as a whole, and whole-text tokenization differs
from per-chunk tokenization at chunk boundaries, so keys would never match what
``kdn ingest`` stored. Send token ids built the way the HF path builds them
(``kdn_hf.prompt.build_prompt``: each chunk on its own, the opener first) and
the chunk lengths in ``custom_params``; both reach the scheduler through the
native and the OpenAI-compatible APIs::

    req = kdn_request(tokenizer, [system, doc_a, doc_b, question], max_new_tokens=64)

    engine.generate(input_ids=req.input_ids, sampling_params=req.sampling_params)     # sglang.Engine
    requests.post(url + "/generate", json=req.native_json())                          # HTTP API
    client.completions.create(model=m, **req.openai_kwargs())                         # OpenAI client
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from kdn_hf.prompt import Prompt, build_prompt

from kdn_hf.integrations.sglang.units import CHUNKS_PARAM, OPENER_PARAM


def chunk_hints(prompt: Prompt) -> dict[str, Any]:
    """``custom_params`` entries naming ``prompt``'s opener and chunk lengths (see ``units``)."""
    return {OPENER_PARAM: len(prompt.opener), CHUNKS_PARAM: [len(c) for c in prompt.chunk_ids]}


@dataclass(frozen=True)
class KDNRequest:
    """input_ids: the prompt ids (exactly what full prefill sees, as ``KDN`` builds them).
    sampling_params: SGLang sampling params with the hints in ``custom_params``."""

    input_ids: list[int]
    sampling_params: dict[str, Any] = field(default_factory=dict)

    def native_json(self) -> dict[str, Any]:
        """Body of a POST to SGLang's native ``/generate``."""
        return {"input_ids": self.input_ids, "sampling_params": self.sampling_params}

    def openai_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``openai.OpenAI(...).completions.create(model=..., **these)``: the prompt as
        token ids, the hints through ``extra_body`` (SGLang reads ``custom_params`` there)."""
        sp = dict(self.sampling_params)
        out: dict[str, Any] = {"prompt": self.input_ids, "extra_body": {"custom_params": sp.pop("custom_params")}}
        if "max_new_tokens" in sp:
            out["max_tokens"] = sp.pop("max_new_tokens")
        if "temperature" in sp:
            out["temperature"] = sp.pop("temperature")
        out["extra_body"].update(sp)
        return out


def kdn_request(tokenizer, chunks: Sequence, **sampling_params: Any) -> KDNRequest:
    """Token ids and sampling params for a prompt made of ``chunks`` (texts or id lists), e.g.
    ``[system, *documents, question]`` (``kdn_hf.prompt.chat_chunks`` renders a chat template
    around them). Extra keyword arguments are SGLang sampling params (``max_new_tokens=64``, ...)."""
    prompt = build_prompt(tokenizer, chunks)
    custom = dict(sampling_params.pop("custom_params", None) or {})
    custom.update(chunk_hints(prompt))
    return KDNRequest(prompt.prompt_ids, {**sampling_params, "custom_params": custom})
