"""Types shared by benchmarks, attacks, judges and the evaluation runner.

Interfaces take LISTS (lm-evaluation-harness style): ``benchmark.load() -> list[Behaviour]``,
``attack.run(behaviours, target, store) -> list[Completion]``, ``judge.score(items) -> list[Verdict]``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

from repbend.registry import Registry


@dataclass
class Behaviour:
    """One harmful behaviour from an evaluation benchmark."""

    id: str
    prompt: str                    # the request (for contextual HarmBench: behaviour text only)
    source: str                    # benchmark name, e.g. "harmbench"
    category: str = ""
    context: str | None = None     # HarmBench ContextString; prepended to the prompt by ``full_prompt``
    target: str | None = None      # affirmative target ("Sure, here is ...") where the benchmark has one

    @property
    def full_prompt(self) -> str:
        return f"{self.context}\n\n---\n\n{self.prompt}" if self.context else self.prompt

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenSettings:
    """Generation settings; part of the cache key of every completion."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0

    def key(self) -> str:
        return f"n{self.max_new_tokens}-s{int(self.do_sample)}-t{self.temperature}-p{self.top_p}-k{self.num_samples}-seed{self.seed}"


@dataclass
class Conversation:
    """One attacked input: chat messages plus an optional forced start of the answer (prefill)."""

    behaviour_id: str
    attack: str
    variant: str = ""                      # e.g. template name, transform name
    messages: list[dict] = field(default_factory=list)
    prefill: str = ""                      # text forced as the beginning of the assistant turn
    settings: GenSettings | None = None    # overrides the suite's settings (best-of-N sampling)


@dataclass
class Completion:
    """A model answer to a Conversation (one per sample)."""

    behaviour_id: str
    attack: str
    variant: str
    messages: list[dict]
    prefill: str
    text: str                              # generated text (without the prefill)
    sample: int = 0
    meta: dict[str, Any] = field(default_factory=dict)   # cost (seconds, passes), losses, etc.

    @property
    def response(self) -> str:
        """The answer as a reader sees it: prefill + generated text."""
        return self.prefill + self.text


@dataclass
class JudgeItem:
    behaviour: str        # the original harmful request (without attack wrapping)
    response: str         # the model's answer (prefill included)
    context: str | None = None


@dataclass
class Verdict:
    harmful: bool          # counts as an attack success
    refused: bool = False
    gibberish: bool = False
    score: float = 0.0     # judge's confidence that the answer is harmful, in [0, 1]
    reason: str = ""


class Target(Protocol):
    """What attacks get to work with: the model under evaluation."""

    model: Any            # transformers PreTrainedModel (possibly a PeftModel)
    tokenizer: Any

    def generate(self, conversations: list[Conversation], settings: GenSettings) -> list[list[str]]:
        """Answers for each conversation (``settings.num_samples`` each), batched, cached on disk."""


class Attack:
    """Base of every attack. Black-box attacks subclass PromptAttack (in attacks/base.py) instead."""

    name: ClassVar[str]
    white_box: ClassVar[bool] = False
    needs_target: ClassVar[bool] = False    # needs Behaviour.target (or a generic fallback)

    def run(self, behaviours: list[Behaviour], target: Target, store: Any) -> list[Completion]:
        raise NotImplementedError


class Judge:
    name: ClassVar[str]

    def score(self, items: list[JudgeItem]) -> list[Verdict]:
        raise NotImplementedError


ATTACKS: Registry[type[Attack]] = Registry("attack")
JUDGES: Registry[type[Judge]] = Registry("judge")
BENCHMARKS: Registry[Any] = Registry("benchmark")
