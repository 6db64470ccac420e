"""Stage 5, first token: when the prepared last row may pick the first generated token, and its logits.

In ``blend`` mode the question is computed with the context, so the blend's
last row is the model's last hidden state for the prompt; ``prefix`` mode then
prefills the whole question after the cached prefix, its last row included. With plain greedy
decoding its argmax is the token stock ``generate`` would pick first, and
``generate`` then starts from the second token. Any setting that could change
that pick (sampling, beams, penalties, forced tokens, ...) sends generation
down the stock path, which feeds the question's last token itself.
"""

from __future__ import annotations

import time

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from kdn_hf.blend.runner import layer_runner

#: generation settings that change which token greedy decoding picks first (any non-default one sends
#: generate down the stock path)
FIRST_TOKEN_SETTINGS = (
    "num_beams", "num_return_sequences", "num_beam_groups", "diversity_penalty", "repetition_penalty",
    "encoder_repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "force_words_ids", "constraints", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
    "forced_eos_token_id", "min_length", "min_new_tokens", "sequence_bias", "guidance_scale",
    "exponential_decay_length_penalty", "watermarking_config", "stop_strings",
)


def prepare_picks_first_token(model, mode: str, user_kwargs: dict) -> bool:
    """Whether generate may take its first token from the last row the request's preparation computed
    (the blend's, or the prefix prefill's, which then computes the whole question): plain greedy decoding
    (no user generation arguments, default settings) on a model whose logits the layer runner
    computes exactly (``LayerRunner.logits_exact``). Otherwise stock generate computes the question's
    last token and picks the token."""
    runner = layer_runner(model)
    if mode not in ("blend", "prefix") or user_kwargs or not runner.logits_exact or runner.blend_error is not None:
        return False
    cfg, default = model.generation_config, GenerationConfig()
    if getattr(cfg, "do_sample", False):
        return False
    return all(getattr(cfg, f, None) == getattr(default, f, None) for f in FIRST_TOKEN_SETTINGS)


def next_token_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits [vocab] float32 from the last layer's output [hidden] of one row, as the model
    computes them (final norm, LM head, final soft-capping: ``LayerRunner.logits``)."""
    return layer_runner(model).logits(hidden)


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


class FirstTokenClock(BaseStreamer):
    """Notes when generate emits its first new token (the second ``put``: the first is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass
