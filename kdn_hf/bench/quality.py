"""Quality of a prepared context cache against full prefill, on the same prompt ids.

All measures feed the question (the suffix) through the method's cache, so the
only difference between methods is the context KV. Full prefill's greedy
continuation ends at its first end-of-sequence token (``stop_ids``): that is the
answer, and the teacher-forced measures look at its tokens only.

- ``kl``: KL(full || method) of the first answer token's distribution (nats);
- ``answer_kl``: that KL averaged over the first ``kl_tokens`` answer tokens
  (teacher-forced on full's answer, at most up to its end-of-sequence token);
- ``agree``: teacher-forced top-1 agreement over full prefill's answer tokens up to
  and including its end-of-sequence token (argmax compared at each step);
- ``nll``: mean per-token NLL of the gold answer right after the question (the assistant turn);
- ``correct``: the method's own greedy answer contains a gold answer (lenient);
- ``em`` / ``f1``: SQuAD's exact match and token F1 of that answer's first line
  (``squad_em``/``squad_f1``: official normalisation, max over gold answers).
"""

from __future__ import annotations

import re
import string
from collections import Counter

import torch
import torch.nn.functional as F

from kdn_hf.bench.workload import answer_found
from kdn_hf.compat import cache_kwarg
from kdn_hf.first_token import eos_ids

#: end-of-turn markers of the chat formats the rag workload uses (see workload.chat_format)
TURN_ENDS = ("<|im_end|>", "<end_of_turn>")


def stop_ids(model, tokenizer) -> frozenset[int]:
    """Token ids that end an answer: the model's eos ids, the tokenizer's eos and the end-of-turn markers
    in its vocabulary."""
    ids = set(eos_ids(model))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in TURN_ENDS if t in vocab)
    return frozenset(ids)


def answer_length(tokens, stop) -> int:
    """Tokens of an answer: up to and including the first token in ``stop`` (all of them if none is)."""
    for i, t in enumerate(tokens):
        if t in stop:
            return i + 1
    return len(tokens)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1/v2.0 evaluation script's normalisation: lower case, no punctuation, no articles
    (a, an, the), single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_em(prediction: str, answers) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer, else 0.0."""
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold:  # as the official script: empty against empty counts 1
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, answers) -> float:
    """SQuAD token F1 of ``prediction``: the best over the gold ``answers``."""
    return max((_f1(prediction, a) for a in answers), default=0.0)


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


def greedy(model, cache, suffix: list[int], n: int, stop=frozenset()) -> list[int]:
    """Up to n greedy tokens after ``suffix``, fed after ``cache`` (which grows); ends after the first
    token in ``stop``."""
    start = cache.get_seq_length()
    logits = _forward(model, cache, suffix, start)[-1]
    out = [int(logits.argmax())]
    while len(out) < n and out[-1] not in stop:
        logits = _forward(model, cache, out[-1:], start + len(suffix) + len(out) - 1)[-1]
        out.append(int(logits.argmax()))
    return out


@torch.inference_mode()
def score(model, tokenizer, cache, suffix: list[int], continuation: list[int], answers, ref_logp=None,
          answer_tokens: int = ANSWER_TOKENS, kl_tokens: int = 8, stop=frozenset()) -> dict:
    """Measures of one method's context ``cache`` (cropped back after each use).

    suffix: the question ids. continuation: full prefill's greedy tokens after it; only its answer
    (up to and including the first ``stop`` token) is scored. ref_logp: [m, vocab] float32 log-probs of
    full prefill at the first m answer tokens (the "logp" this returns for full; None: this is full).
    Returns {"logp", "kl", "answer_kl", "agree", "nll", "correct", "em", "f1", "answer"}.
    """
    ctx = cache.get_seq_length()
    answer = list(continuation[:answer_length(continuation, stop)])
    logits = _forward(model, cache, list(suffix) + answer[:-1], ctx)
    tf = logits[len(suffix) - 1:]  # [len(answer), vocab]: predicts answer[0..]
    logp = F.log_softmax(tf[:kl_tokens], dim=-1)  # [m, vocab]
    agree = (tf.argmax(-1).cpu() == torch.tensor(answer)).float().mean().item()
    if ref_logp is None:
        kl = answer_kl = 0.0
    else:
        per = F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(-1).clamp_min(0.0)  # [m]
        kl, answer_kl = float(per[0]), float(per.mean())
    _crop(cache, ctx)
    ans = tokenizer(answers[0], add_special_tokens=False)["input_ids"]
    logits = _forward(model, cache, list(suffix) + ans[:-1], ctx)[len(suffix) - 1:]
    nll = F.cross_entropy(logits, torch.tensor(ans, device=logits.device)).item()
    _crop(cache, ctx)
    own = greedy(model, cache, list(suffix), answer_tokens, stop)
    _crop(cache, ctx)
    text = tokenizer.decode(own, skip_special_tokens=True).strip().split("\n")[0]
    return {"logp": logp, "kl": kl, "answer_kl": answer_kl, "agree": agree, "nll": nll,
            "correct": answer_found(text, answers), "em": squad_em(text, answers), "f1": squad_f1(text, answers),
            "answer": text}
