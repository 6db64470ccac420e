"""Stage 1, plan: a prompt's chunks become units, each with its ids, context and store key. Model-free.

    policy = KeyPolicy(fingerprint=digest, codec="none", namespace="default", opener=(bos,), lead_in=())
    units = plan_chunks(policy, prompt)       # reuse / blend: every chunk position-independent
    units = plan_prefix(policy, prompt)       # prefix: every unit exact for its whole left context

This module is the one key policy of kdn_hf: the HuggingFace engine, the SGLang
adapter, the CLI, the benchmarks and the tests all make store keys here, so a
chunk ingested by one of them is found by every other one.

Vocabulary (each word has one meaning everywhere in kdn_hf):

- **opener**: the ids that open every prompt: ``(BOS,)`` when the tokenizer
  adds BOS, else ``()``. It is a unit of its own, computed after nothing.
- **lead-in**: optional ids (``KDN(lead_in=system_prompt)``) that every chunk
  is computed after, following the opener (the CacheBlend paper's offline KV
  editing). ``()`` when not used. A chunk equal to the lead-in itself is
  computed after the opener alone, where it sits in a prompt that opens with it.
- **context** of a unit: the ids its stored KV was computed after. For a chunk
  unit: ``opener + lead_in`` (``context_of``); for a prefix unit: the exact
  prompt ids before it.
- A unit is **exact** in a prompt when its context equals the prompt ids before
  it: its stored KV is then what full prefill computes there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kdn_hf.errors import ConfigError
from kdn_hf.keys import make_key
from kdn_hf.prompt import Prompt


def _ids(value, name: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(i) for i in value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} must be a sequence of token ids, got {value!r}") from e
    if any(i < 0 for i in ids):
        raise ConfigError(f"{name} must hold non-negative token ids, got {ids[:5]}")
    return ids


@dataclass(frozen=True)
class KeyPolicy:
    """How a chunk's ids become a store key.

    fingerprint: the model fingerprint digest (``kdn_hf.fingerprint``): model identity, dtype, geometry, RoPE.
    codec:       how entries are encoded (``kdn_hf.codec``); part of every key.
    namespace:   tenant salt; entries of one namespace are invisible to another.
    opener:      ids opening every prompt (BOS or nothing).
    lead_in:     ids every chunk is computed after, following the opener; () for none.
    """

    fingerprint: str
    codec: str = "none"
    namespace: str = "default"
    opener: tuple[int, ...] = ()
    lead_in: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("fingerprint", "codec", "namespace"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"KeyPolicy.{name} must be a non-empty string, got {value!r}")
        object.__setattr__(self, "opener", _ids(self.opener, "KeyPolicy.opener"))
        object.__setattr__(self, "lead_in", _ids(self.lead_in, "KeyPolicy.lead_in"))

    @property
    def chunk_context(self) -> tuple[int, ...]:
        """The ids a chunk is computed after: the opener, then the lead-in."""
        return self.opener + self.lead_in

    def context_of(self, ids: Sequence[int]) -> tuple[int, ...]:
        """The ids chunk ``ids`` is computed after: ``opener + lead_in``, or the opener alone for the
        lead-in itself (which then sits where it is computed, right after the opener)."""
        return self.opener if self.lead_in and tuple(ids) == self.lead_in else self.chunk_context

    def _key(self, ids: Sequence[int], kind: str, context: Sequence[int], variant: str = "") -> str:
        return make_key(fingerprint=self.fingerprint, codec=self.codec, namespace=self.namespace,
                        token_ids=ids, kind=kind, context_ids=context, variant=variant)

    def chunk_key(self, ids: Sequence[int]) -> str:
        """The key of chunk ``ids`` computed after ``context_of(ids)``: the same wherever it sits."""
        return self._key(ids, "chunk", self.context_of(ids))

    def opener_key(self) -> str:
        """The key of the opener's own KV (computed after nothing, at positions 0..)."""
        return self._key(self.opener, "chunk", ())

    def prefix_key(self, ids: Sequence[int], prefix: Sequence[int]) -> str:
        """The key of ``ids`` computed right after exactly ``prefix`` (opener included): valid there only."""
        return self._key(ids, "prefix", prefix)

    def blend_key(self, ids: Sequence[int], variant: str) -> str:
        """The key of a whole prompt's blended KV (``ids``: every slot it holds), blended as ``variant``
        says (ratio, selection and its parameters)."""
        return self._key(ids, "blend", self.chunk_context, variant)


@dataclass(frozen=True)
class Unit:
    """One piece of a prompt with its own store entry.

    ids:     its token ids.
    context: the ids its stored KV is computed after.
    key:     its store key (``KeyPolicy``).
    start:   its first slot in the prompt; it fills ``start .. start + len(ids) - 1``.
    exact:   its context is exactly the prompt before it (its stored KV is what full prefill has there).
    """

    ids: tuple[int, ...]
    context: tuple[int, ...]
    key: str
    start: int
    exact: bool

    @property
    def end(self) -> int:
        return self.start + len(self.ids)

    @property
    def context_start(self) -> int:
        """The position of the unit's first token when its KV was computed (after its context)."""
        return len(self.context)


def plan_chunks(policy: KeyPolicy, prompt: Prompt) -> tuple[Unit, ...]:
    """Units of ``prompt`` for ``reuse``/``blend``: the opener (if any), then every chunk keyed
    position-independently (``KeyPolicy.chunk_key``)."""
    units: list[Unit] = []
    if prompt.opener:
        units.append(Unit(prompt.opener, (), policy.opener_key(), 0, True))
    before = list(prompt.opener)
    for ids in prompt.chunk_ids:
        context = policy.context_of(ids)
        units.append(Unit(ids, context, policy.chunk_key(ids), len(before), tuple(before) == context))
        before.extend(ids)
    return tuple(units)


def plan_prefix(policy: KeyPolicy, prompt: Prompt) -> tuple[Unit, ...]:
    """Units of ``prompt`` for ``prefix``: the opener (if any), then every chunk, each keyed by its
    exact left context (``KeyPolicy.prefix_key``): a hit is valid only after that very prefix."""
    units: list[Unit] = []
    before: list[int] = []
    for ids in ([prompt.opener] if prompt.opener else []) + list(prompt.chunk_ids):
        units.append(Unit(ids, tuple(before), policy.prefix_key(ids, before), len(before), True))
        before.extend(ids)
    return tuple(units)
