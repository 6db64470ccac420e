"""Turning a list of chunks into prompt ids, one chunk at a time.

Each chunk (a string, or a sequence of token ids) is tokenized on its own,
without special tokens, so its ids (and therefore its store key) are the same
wherever it sits. If the tokenizer starts sequences with BOS, BOS becomes the
*opener*: it opens the prompt, and every chunk's KV is computed after it,
because the first token of a sequence is an attention sink that a chunk
computed alone would otherwise make of its own first token.

``Prompt.prompt_ids`` are exactly the ids full prefill sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kdn_hf.errors import ContextTooLongError, InputError

Chunk = "str | Sequence[int]"


@dataclass(frozen=True)
class Prompt:
    """opener: ids before the first chunk (BOS or nothing).
    chunk_ids: one id list per chunk, in prompt order.
    spans: (start, end) of each chunk in prompt_ids."""

    opener: tuple[int, ...]
    chunk_ids: tuple[tuple[int, ...], ...]

    @property
    def prompt_ids(self) -> list[int]:
        out = list(self.opener)
        for ids in self.chunk_ids:
            out.extend(ids)
        return out

    @property
    def spans(self) -> list[tuple[int, int]]:
        spans, at = [], len(self.opener)
        for ids in self.chunk_ids:
            spans.append((at, at + len(ids)))
            at += len(ids)
        return spans

    def __len__(self) -> int:
        return len(self.opener) + sum(len(c) for c in self.chunk_ids)


def opener_ids(tokenizer) -> tuple[int, ...]:
    """(BOS,) if the tokenizer puts BOS before a sequence, else ()."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return ()
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return (bos,) if probe and probe[0] == bos else ()


def tokenize_chunk(tokenizer, chunk, index: int = 0) -> tuple[int, ...]:
    if isinstance(chunk, str):
        if not chunk:
            raise InputError(f"chunk {index} is an empty string; drop it or give it some text")
        ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
    elif isinstance(chunk, Sequence) or hasattr(chunk, "tolist"):
        ids = chunk.tolist() if hasattr(chunk, "tolist") else list(chunk)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise InputError(f"chunk {index}: token ids must be ints, got {[type(i).__name__ for i in ids[:3]]}...")
        vocab = len(tokenizer)
        bad = [i for i in ids if i < 0 or i >= vocab]
        if bad:
            raise InputError(f"chunk {index}: token ids must lie in [0, {vocab}), found {bad[:5]}")
    else:
        raise InputError(f"chunk {index} must be a str or a sequence of token ids, got {type(chunk).__name__}")
    if not ids:
        raise InputError(f"chunk {index} tokenizes to no ids; drop it or give it some text")
    return tuple(ids)


def build_prompt(tokenizer, chunks, *, max_positions: int | None = None, reserve: int = 0) -> Prompt:
    """Tokenize ``chunks`` and check the prompt (+ ``reserve`` new tokens) fits ``max_positions``."""
    if isinstance(chunks, (str, bytes)) or not isinstance(chunks, Sequence):
        raise InputError(
            f"chunks must be a list of strings or token-id lists, got {type(chunks).__name__}; "
            f"wrap a single text as [text]"
        )
    if len(chunks) == 0:
        raise InputError("chunks is empty: pass at least one chunk, e.g. [document, question]")
    prompt = Prompt(opener_ids(tokenizer), tuple(tokenize_chunk(tokenizer, c, i) for i, c in enumerate(chunks)))
    if max_positions is not None and len(prompt) + reserve > max_positions:
        raise ContextTooLongError(
            f"the prompt has {len(prompt)} tokens and {reserve} more are to be generated, but the model's context "
            f"holds {max_positions} positions; drop or shorten chunks, or lower max_new_tokens"
        )
    return prompt


def chat_chunks(tokenizer, system: str, documents: Sequence[str], question: str) -> list[str]:
    """Chunks of a RAG prompt in the model's chat format: [system + header, *documents, question + footer].

    The chat template is rendered once around placeholders and cut there, so
    documents stay separate, reusable chunks. Without a chat template the
    prompt is plain text ending in ``Answer:``. Documents get a trailing blank
    line if they have none.
    """
    docs = [d if d.endswith("\n\n") else d.rstrip("\n") + "\n\n" for d in documents]
    if not getattr(tokenizer, "chat_template", None):
        return [system.rstrip() + "\n\n", *docs, f"Question: {question.strip()}\nAnswer:"]
    sys_mark, user_mark = "\x00KDN_SYSTEM\x00", "\x00KDN_USER\x00"
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": sys_mark}, {"role": "user", "content": user_mark}],
        tokenize=False,
        add_generation_prompt=True,
    )
    head, rest = rendered.split(sys_mark)
    middle, tail = rest.split(user_mark)
    if head.startswith(getattr(tokenizer, "bos_token", None) or "\x01") and opener_ids(tokenizer):
        head = head[len(tokenizer.bos_token):]  # BOS is the opener, added by the engine
    return [head + system.rstrip() + "\n\n", *docs, middle + question.strip() + tail]
