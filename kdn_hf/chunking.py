"""Splitting documents into chunks: paragraphs, packed up to a token budget.

A chunk is the unit of reuse: the same file chunked with the same settings
gives the same chunks (and store keys) every time. Each chunk keeps its
trailing blank line, so chunks concatenated in a prompt read as the document
did.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from kdn_hf.errors import InputError

TEXT_SUFFIXES = (".txt", ".md", ".rst")
_PARA = re.compile(r"\n\s*\n")


def split_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in _PARA.split(text) if p.strip()]


def chunk_text(text: str, tokenizer, max_tokens: int = 512) -> list[str]:
    """Pack paragraphs of ``text`` into chunks of at most ``max_tokens`` tokens.

    A single paragraph longer than the budget is cut at token boundaries.
    """
    if max_tokens < 8:
        raise InputError(f"max_tokens must be at least 8, got {max_tokens}")
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    chunks: list[str] = []
    current = ""
    for para in split_paragraphs(text):
        pieces = [para]
        if count(para + "\n\n") > max_tokens:
            ids = tokenizer(para, add_special_tokens=False)["input_ids"]
            step = max_tokens - 4
            pieces = [tokenizer.decode(ids[i : i + step]) for i in range(0, len(ids), step)]
        for piece in pieces:
            candidate = current + piece + "\n\n"
            if current and count(candidate) > max_tokens:
                chunks.append(current)
                candidate = piece + "\n\n"
            current = candidate
    if current:
        chunks.append(current)
    return chunks


def collect_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named, plus every text file under named folders (sorted, recursive)."""
    out: list[Path] = []
    for p in map(Path, paths):
        p = p.expanduser()
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"{p} is neither a file nor a folder; check the path")
    if not out:
        raise InputError(f"no {'/'.join(TEXT_SUFFIXES)} files found under {[str(p) for p in paths]}")
    return out


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e}); convert it or leave it out") from e
