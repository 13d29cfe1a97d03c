"""Shared pieces of every attack: config base, prompt attacks, skipping, target strings.

Contract (see also ``repbend.evaluation.types``):

* Every attack class is registered in ``repbend.evaluation.attacks.ATTACKS``, has a nested
  ``Config`` (an :class:`AttackConfig`, i.e. a ``repbend.config.Section``) and is built as
  ``Cls(config)``. A suite lists it as ``{name: <registry name>, <Config fields>...}``.
* ``attack.run(behaviours, target, store) -> list[Completion]``. ``target`` is a
  :class:`repbend.evaluation.target.ModelTarget` (``.model``, ``.tokenizer``, ``.settings`` = the
  suite's :class:`GenSettings`, ``.generate(conversations, settings)`` cached on disk); ``store`` is
  the run's :class:`repbend.evaluation.store.Store` for attack artefacts (use ``store.make_key``-style
  keys that include ``target.fingerprint``).
* Completions of one behaviour share ``behaviour_id``; ``variant`` names the template / transform /
  sample family; the runner judges every completion and aggregates per attack (``asr`` by the
  class's ``aggregate`` rule, ``worst_case`` = a behaviour is broken if ANY of its completions is).
* An attack that cannot run on this model raises :class:`AttackSkipped` with the reason; the runner
  records it under ``meta.skipped`` and goes on.
* Attacks with ``needs_target = True`` receive behaviours whose ``target`` is set: the runner calls
  :func:`ensure_targets` first (benchmark targets, or the generic affirmative opening when the suite
  says ``allow_generic_target: true``).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar


from repbend.config import Section
from repbend.errors import RepbendError
from repbend.evaluation.types import Attack, Behaviour, Completion, Conversation, GenSettings, Target

GENERIC_TARGET = "Sure, here is what you asked for:\n\n"


class AttackSkipped(Exception):
    """Raised by an attack that cannot run on this model (the message says why)."""


class AttackConfig(Section):
    """Base of every attack's Config (no shared fields; subclasses add their own)."""


def ensure_targets(attack_name: str, behaviours: list[Behaviour], benchmark: str, *,
                   allow_generic: bool, generic_target: str = GENERIC_TARGET) -> list[Behaviour]:
    """Behaviours with ``target`` set, for target-based attacks (prefill, GCG, embedding ...).

    Benchmark targets are kept. Missing ones are filled with ``generic_target`` only when the suite
    allows it; otherwise a one-line error names the attack, the benchmark and the two fixes.
    """
    missing = [b for b in behaviours if not b.target]
    if not missing:
        return behaviours
    if not allow_generic:
        raise RepbendError(
            f"Attack {attack_name!r} needs an affirmative target string per behaviour ('Sure, here is ...') "
            f"but benchmark {benchmark!r} has none for {len(missing)} of {len(behaviours)} behaviours; set "
            f"allow_generic_target: true in the suite or run it on a benchmark with targets (e.g. jbb)."
        )
    return [b if b.target else replace(b, target=generic_target) for b in behaviours]


def chat_messages(user: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [{"role": "user", "content": user}]


class PromptAttack(Attack):
    """A black-box attack: each behaviour becomes one or more conversations, answered by the target.

    Subclasses set ``name`` and ``Config`` and implement :meth:`conversations`; they may override
    :meth:`settings` (e.g. sampling for best-of-N) and :meth:`check` (e.g. skip when the chat template
    cannot take a system prompt).
    """

    Config: ClassVar[type[AttackConfig]] = AttackConfig
    aggregate: ClassVar[str] = "mean"      # "mean" over completions, or "any" (broken if any succeeds)

    def __init__(self, config: AttackConfig | None = None):
        self.config = config if config is not None else self.Config()
        self.provenance: dict[str, Any] = {}   # where attack material came from (recorded in results)

    def conversations(self, behaviour: Behaviour) -> list[Conversation]:
        raise NotImplementedError

    def settings(self, base: GenSettings) -> GenSettings:
        """Generation settings for this attack given the suite's (default: unchanged)."""
        return base

    def check(self, target: Target) -> None:
        """Raise :class:`AttackSkipped` if the attack cannot run on ``target`` (default: always can)."""

    def run(self, behaviours: list[Behaviour], target: Target, store: Any = None) -> list[Completion]:
        self.check(target)
        settings = self.settings(getattr(target, "settings", None) or GenSettings())
        convs = [c for b in behaviours for c in self.conversations(b)]
        texts = target.generate(convs, settings)
        out = []
        for conv, samples in zip(convs, texts):
            for k, text in enumerate(samples):
                out.append(Completion(behaviour_id=conv.behaviour_id, attack=conv.attack, variant=conv.variant,
                                      messages=conv.messages, prefill=conv.prefill, text=text, sample=k))
        return out
