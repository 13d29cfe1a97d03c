"""Chat-template rendering: the text (and token ids) a model sees for a conversation.

The tokenizer's OWN chat template renders every prompt; nothing here knows a role tag. A tokenizer
without a chat template raises :class:`RepbendError`, unless the user opts into the plain
:data:`FALLBACK_TEMPLATE` with :func:`use_fallback_template` (``load_model(..., fallback_template=True)``).
Rendered text already contains the template's special tokens (e.g. BOS): tokenize it with
``add_special_tokens=False`` (as :func:`prompt_ids` does). Splitting a conversation into request and
response tokens for training is :mod:`repbend.data.chat`.
"""
from __future__ import annotations

from typing import Sequence

from repbend.errors import RepbendError

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)
"""Plain ``### Role:`` template used only when the user opts in (tokenizers without a chat template)."""


def use_fallback_template(tokenizer) -> None:
    """Give a tokenizer without a chat template repbend's plain :data:`FALLBACK_TEMPLATE` (opt-in)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_TEMPLATE


def check_messages(messages: Sequence[dict]) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RepbendError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RepbendError(f"messages[{i}] must be a dict with string 'role' and 'content', got {m!r:.80}.")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise RepbendError(
            f"Tokenizer {name!r} has no chat template; use an instruct/chat model, set tokenizer.chat_template, "
            f"or opt into repbend's plain template (load_model(..., fallback_template=True) / --fallback-template)."
        )
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as e:  # jinja errors: roles must alternate, system not supported, ...
        raise RepbendError(f"The chat template rejected these messages: {e}") from None
    if not isinstance(text, str):
        raise RepbendError("apply_chat_template(tokenize=False) did not return text; this tokenizer is not supported.")
    return text


def text_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt(tokenizer, messages: Sequence[dict], prefill: str = "") -> str:
    """The prompt text, ending exactly where generation starts (after the assistant header and ``prefill``)."""
    return render(tokenizer, check_messages(messages), add_generation_prompt=True) + prefill


def prompt_ids(tokenizer, messages: Sequence[dict], prefill: str = "") -> list[int]:
    """Token ids of :func:`render_prompt` (the template's own special tokens, no extra BOS)."""
    return text_ids(tokenizer, render_prompt(tokenizer, messages, prefill))
