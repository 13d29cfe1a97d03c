"""Segmentation tests over three real chat-template styles (ChatML, Llama-3, Mistral [INST]).

The templates are written here as strings; the tokenizer is the tiny byte-level BPE from conftest,
given each template's special tokens.
"""
from __future__ import annotations

import pytest
import torch

from conftest import CHATML, build_tiny_tokenizer
from repbend.data.chat import (FALLBACK_TEMPLATE, Encoded, collate, encode, encode_batch, prompt_ids, render_prompt,
                               use_fallback_template)
from repbend.errors import RepbendError

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral-instruct style: system prompt folded into the first user turn, answers end with eos.
MISTRAL = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set sys = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + (sys if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)

STYLES = {
    "chatml": dict(template=CHATML, specials=[], bos=None, eos="<|im_end|>"),
    "llama3": dict(template=LLAMA3, specials=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                              "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>"),
    "mistral": dict(template=MISTRAL, specials=["<s>", "</s>", "[INST]", "[/INST]"], bos="<s>", eos="</s>"),
}

SYSTEM = {"role": "system", "content": "You are a careful assistant."}
CONVS = [
    ([{"role": "user", "content": "How do I bake bread at home?"}], "Mix flour, water, yeast and salt."),
    ([SYSTEM, {"role": "user", "content": "What is the capital of France?"}], "The capital of France is Paris."),
    ([SYSTEM, {"role": "user", "content": "Write a poem about the sea."},
      {"role": "assistant", "content": "The waves roll in."},
      {"role": "user", "content": "Explain photosynthesis."}], "Plants turn light into sugar and oxygen."),
]


def make_tokenizer(style: str):
    spec = STYLES[style]
    tok = build_tiny_tokenizer(chat_template=spec["template"])
    if spec["specials"]:
        tok.add_tokens(spec["specials"], special_tokens=True)
    if spec["bos"]:
        tok.bos_token = spec["bos"]
    tok.eos_token = spec["eos"]
    return tok


@pytest.fixture(params=list(STYLES), scope="module")
def tok(request):
    return make_tokenizer(request.param)


@pytest.mark.parametrize("messages,response", CONVS)
def test_request_is_exactly_the_generation_prompt(tok, messages, response):
    enc = encode(tok, messages, response)
    assert enc.input_ids[: enc.request_len] == prompt_ids(tok, messages)
    assert enc.response_len > 0 and not enc.truncated_request and not enc.truncated_response


@pytest.mark.parametrize("messages,response", CONVS)
def test_response_decodes_to_response_plus_end_of_turn(tok, messages, response):
    enc = encode(tok, messages, response)
    resp = enc.input_ids[enc.request_len:]
    assert resp[-1] == tok.eos_token_id  # the end-of-turn token closes the answer, nothing after it
    assert tok.decode(resp[:-1]).strip() == response
    # Request + response is the full rendered conversation (up to the template's trailing text).
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    assert full.startswith(tok.decode(enc.input_ids))


@pytest.mark.parametrize("messages,response", CONVS)
def test_response_without_end_of_turn_is_the_answer_text_only(tok, messages, response):
    with_eot = encode(tok, messages, response)
    enc = encode(tok, messages, response, end_of_turn=False)
    resp = enc.input_ids[enc.request_len:]
    assert enc.request_len == with_eot.request_len and resp == with_eot.input_ids[with_eot.request_len:-1]
    assert tok.eos_token_id not in resp and tok.decode(resp).strip() == response


def test_prompt_only_encoding(tok):
    messages, _ = CONVS[1]
    enc = encode(tok, messages)
    assert enc.response_len == 0 and enc.input_ids == prompt_ids(tok, messages)
    assert tok.decode(enc.input_ids) == render_prompt(tok, messages)


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_masks(tok, side):
    items = [encode(tok, m, r) for m, r in CONVS]
    b = collate(items, tok.pad_token_id, padding_side=side)
    width = max(len(e.input_ids) for e in items)
    assert b.input_ids.shape == (3, width)
    assert not (b.request_mask & b.response_mask).any()
    assert torch.equal((b.request_mask | b.response_mask).long(), b.attention_mask)
    for i, e in enumerate(items):
        real = b.attention_mask[i].bool()
        assert b.input_ids[i][real].tolist() == e.input_ids
        assert (b.input_ids[i][~real] == tok.pad_token_id).all()
        assert b.input_ids[i][b.request_mask[i]].tolist() == e.input_ids[: e.request_len]
        assert b.input_ids[i][b.response_mask[i]].tolist() == e.input_ids[e.request_len:]
        j = int(b.last_request_index[i])
        assert b.request_mask[i, j] and b.input_ids[i, j] == e.input_ids[e.request_len - 1]
        assert j + 1 == width or not b.request_mask[i, j + 1]
        if side == "left":
            assert real[-1] and (real[: width - len(e.input_ids)] == 0).all()
        else:
            assert real[0] and real[: len(e.input_ids)].all()


def test_truncation_keeps_end_of_request_and_start_of_response(tok):
    messages = [{"role": "user", "content": "Explain photosynthesis: " + "plants turn light into sugar. " * 40}]
    response = "Sure, here is a step-by-step guide. " * 20
    full = encode(tok, messages, response)
    enc = encode(tok, messages, response, max_request_tokens=12, max_response_tokens=7)
    assert enc.truncated_request and enc.truncated_response
    assert enc.request_len == 12 and enc.response_len == 7
    req = full.input_ids[: full.request_len]
    if tok.bos_token_id is not None:  # BOS survives, then the request's tail
        assert enc.input_ids[:12] == [tok.bos_token_id] + req[-11:]
    else:
        assert enc.input_ids[:12] == req[-12:]
    assert enc.input_ids[12:] == full.input_ids[full.request_len: full.request_len + 7]


def test_mistral_roles_error_is_one_line():
    tok = make_tokenizer("mistral")
    with pytest.raises(RepbendError, match="alternate"):
        encode(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "c")


def test_no_chat_template_errors_unless_fallback_opted_in():
    tok = build_tiny_tokenizer(chat_template=None)
    messages, response = CONVS[1]
    with pytest.raises(RepbendError, match="no chat template.*fallback"):
        encode(tok, messages, response)
    use_fallback_template(tok)
    assert tok.chat_template == FALLBACK_TEMPLATE
    enc = encode(tok, messages, response)
    assert tok.decode(enc.input_ids[: enc.request_len]).endswith("### Assistant:\n")
    assert tok.decode(enc.input_ids[enc.request_len:]) == response + tok.eos_token


def test_seam_merge_falls_back_to_separate_tokenization():
    # No newline after the header: the answer's first letters can merge with the header text.
    tmpl = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    tok = build_tiny_tokenizer(chat_template=tmpl)
    messages = [{"role": "user", "content": "hi"}]
    enc = encode(tok, messages, "Sure thing")
    assert enc.input_ids[: enc.request_len] == prompt_ids(tok, messages)
    assert tok.decode(enc.input_ids[enc.request_len:]).strip() == "Sure thing"


def test_template_that_renders_the_prompt_differently_uses_char_offsets():
    # Finished assistant turns are rendered as "A: ..." but the generation prompt is "Answer:".
    tmpl = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'A: ' + m['content'] + eos_token }}"
            "{% else %}{{ 'Q: ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}")
    tok = build_tiny_tokenizer(chat_template=tmpl)
    enc = encode(tok, [{"role": "user", "content": "What is the capital of France?"}], "Paris.")
    assert tok.decode(enc.input_ids[enc.request_len:]) == "Paris." + tok.eos_token
    assert tok.decode(enc.input_ids[: enc.request_len]).endswith("A: ")


def test_bad_messages_and_encode_batch():
    tok = make_tokenizer("chatml")
    with pytest.raises(RepbendError, match="messages"):
        encode(tok, [], "x")
    with pytest.raises(RepbendError, match=r"messages\[0\]"):
        encode(tok, [{"role": "user"}], "x")
    b = encode_batch(tok, [{"messages": m, "response": r} for m, r in CONVS], padding_side="left")
    assert b.size == 3 and int(b.response_mask.sum()) > 0


def test_encoded_lengths_must_add_up():
    with pytest.raises(ValueError):
        Encoded([1, 2, 3], 1, 1)
