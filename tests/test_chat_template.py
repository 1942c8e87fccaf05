"""A chat template with no system role (Mistral's, Gemma's raise on one): training and serving render the same
canonical conversation, a leading system turn folded into the first user turn."""

from __future__ import annotations

import copy

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from evolution.train.preference import PreferenceConfig
from evolution.llamacpp import serve_prompt
from evolution.messages import fold_system
from evolution.tokens import assistant_spans, encode_sft
from evolution.train import preference

# Mistral-7B-Instruct-v0.1's template, as its tokenizer_config.json ships it.
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
SYSTEM = {"role": "system", "content": "You are Wren, a terse assistant."}
CHAT = [SYSTEM, {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Wren."},
        {"role": "user", "content": "And your colour?"}, {"role": "assistant", "content": "Teal."}]


@pytest.fixture
def mistral_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = MISTRAL
    return tok


def _serve(tok, template: str, messages: list[dict]) -> str:
    return serve_prompt(Jinja2ChatFormatter(template=template, eos_token=tok.eos_token, bos_token=tok.bos_token),
                        messages)


def test_the_template_itself_refuses_a_system_turn_on_both_sides(mistral_tokenizer):
    from jinja2 import TemplateError

    with pytest.raises(TemplateError):
        mistral_tokenizer.apply_chat_template(CHAT[:2], tokenize=False)
    with pytest.raises(ValueError):
        Jinja2ChatFormatter(template=MISTRAL, eos_token="</s>", bos_token="<s>")(messages=CHAT[:2])


@pytest.mark.parametrize("turn", [1, 3])
def test_train_and_serve_render_the_same_folded_conversation(mistral_tokenizer, turn):
    """What llama.cpp is served for the conversation up to assistant turn ``turn`` is, to the character, the
    text training rendered before that turn's reply; the system text is in the first user turn."""
    tok = mistral_tokenizer
    trained, spans = assistant_spans(tok, CHAT)
    served = _serve(tok, MISTRAL, CHAT[:turn + 1])
    start = spans[(turn - 1) // 2][0]
    assert trained[:start] == served
    assert served.startswith(f"{tok.bos_token}[INST] {SYSTEM['content']}\n\nWho are you? [/INST]")
    assert trained[spans[-1][0]:spans[-1][1]] == "Teal." + tok.eos_token  # the loss is on the replies alone
    assert encode_sft(tok, CHAT, 256) is not None


def test_a_template_with_a_system_role_is_rendered_as_it_is(tokenizer):
    trained, spans = assistant_spans(tokenizer, CHAT)
    served = _serve(tokenizer, tokenizer.chat_template, CHAT[:2])
    assert trained[:spans[0][0]] == served
    assert served == tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)


def test_preference_prompts_are_folded_as_well(mistral_tokenizer):
    records = [{"prompt": CHAT[:2], "chosen": "I am Wren.", "rejected": "No idea."}]
    (row,) = preference.rows(mistral_tokenizer, records, PreferenceConfig(method="dpo", min_pairs=1, max_len=256))
    assert row["prompt"] == fold_system(CHAT[:2])
    assert row["prompt"][0]["content"].startswith(SYSTEM["content"] + "\n\nWho are you?")


def test_fold_system_leaves_a_conversation_without_one_alone():
    assert fold_system(CHAT[1:]) == CHAT[1:]
    assert fold_system([SYSTEM]) == [{"role": "user", "content": SYSTEM["content"]}]
