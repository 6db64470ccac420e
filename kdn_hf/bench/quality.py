"""Quality of a prepared context cache against full prefill, on the same prompt ids.

All measures feed the question (the suffix) through the method's cache, so the
only difference between methods is the context KV:

- ``kl``: KL(full || method) of the first generated token's distribution (nats);
- ``agree``: teacher-forced top-1 agreement over full prefill's greedy
  continuation (both are fed the same tokens; argmax compared at each step);
- ``nll``: mean per-token NLL of the gold answer right after the question (the assistant turn);
- ``correct``: the method's own greedy answer contains a gold answer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdn_hf.bench.workload import answer_found
from kdn_hf.compat import cache_kwarg

#: tokens of each method's own greedy answer (``score``'s ``answer_tokens``)
ANSWER_TOKENS = 20


def _crop(cache, length: int) -> None:
    """Cut ``cache`` back to its first ``length`` tokens (transformers' crop takes a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _forward(model, cache, ids: list[int], start: int) -> torch.Tensor:
    """Logits [len(ids), vocab] float32 of ``ids`` fed at positions start.. after ``cache``."""
    x = torch.tensor([ids], device=model.device)
    pos = torch.arange(start, start + len(ids), device=model.device)[None]
    out = model(input_ids=x, position_ids=pos, use_cache=True, **{cache_kwarg(model): cache})
    return out.logits[0].float()


def greedy(model, cache, suffix: list[int], n: int) -> list[int]:
    """n greedy tokens after ``suffix``, fed after ``cache`` (which grows)."""
    start = cache.get_seq_length()
    logits = _forward(model, cache, suffix, start)[-1]
    out = [int(logits.argmax())]
    for _ in range(n - 1):
        logits = _forward(model, cache, out[-1:], start + len(suffix) + len(out) - 1)[-1]
        out.append(int(logits.argmax()))
    return out


@torch.inference_mode()
def score(model, tokenizer, cache, suffix: list[int], continuation: list[int], answers, ref_first=None,
          answer_tokens: int = ANSWER_TOKENS) -> dict:
    """Measures of one method's context ``cache`` (cropped back after each use).

    suffix: the question ids. continuation: full prefill's greedy tokens after it.
    ref_first: [vocab] float32 log-probs of full prefill's first token (None: this is full).
    Returns {"first_logp", "kl", "agree", "nll", "correct", "answer"}.
    """
    ctx = cache.get_seq_length()
    logits = _forward(model, cache, list(suffix) + list(continuation[:-1]), ctx)
    tf = logits[len(suffix) - 1:]  # predicts continuation[0..]
    first_logp = F.log_softmax(tf[0], dim=-1)
    agree = (tf.argmax(-1).cpu() == torch.tensor(continuation)).float().mean().item()
    kl = 0.0 if ref_first is None else float(F.kl_div(first_logp, ref_first, log_target=True, reduction="sum"))
    _crop(cache, ctx)
    ans = tokenizer(answers[0], add_special_tokens=False)["input_ids"]
    logits = _forward(model, cache, list(suffix) + ans[:-1], ctx)[len(suffix) - 1:]
    nll = F.cross_entropy(logits, torch.tensor(ans, device=logits.device)).item()
    _crop(cache, ctx)
    own = greedy(model, cache, list(suffix), answer_tokens)
    _crop(cache, ctx)
    text = tokenizer.decode(own, skip_special_tokens=True)
    return {"first_logp": first_logp, "kl": max(kl, 0.0), "agree": agree, "nll": nll,
            "correct": answer_found(text, answers), "answer": text.strip().split("\n")[0]}
