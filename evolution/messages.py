"""Chat messages, validated once: the HTTP chat endpoint, posted transcripts and curriculum lines.

Each source brings its own ``Rules`` (which roles, text parts or not, size limits, strict
turn order, what the exchange must end with); ``validate`` applies them and returns the
messages as plain ``[{"role", "content"}]`` or raises ``MessageError`` naming the message and
what is wrong with it. Chat text is untrusted: nothing here keeps anything but role and text.
``prompt_key`` says what a conversation is about (recency decides per prompt: ``evolution.replay``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from evolution.errors import MessageError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Rules:
    roles: tuple[str, ...] = ROLES
    aliases: dict[str, str] = field(default_factory=dict)
    """Roles accepted under another name, mapped to ours (OpenAI's ``developer`` is a system message)."""
    text_parts: bool = True
    """Accept OpenAI content parts of type text (joined); otherwise content must be a string."""
    parts_error: str = "only text parts ({\"type\": \"text\", \"text\": ...}) are supported"
    allow_empty: bool = True
    max_messages: int | None = None
    max_chars: int | None = None
    only_role_and_content: bool = False
    system_first_only: bool = False
    alternate: bool = False
    """Strict user/assistant turns after an optional leading system message, ending with the assistant."""
    needs_reply: bool = False
    """A user message followed by an assistant reply somewhere; a trailing unanswered turn is dropped."""


CHAT = Rules(roles=("system", "developer", "user", "assistant"), aliases={"developer": "system"})
"""``POST /v1/chat/completions``: what OpenAI's API accepts for text chat."""


def prompt_key(messages: list[dict]) -> str:
    """What a conversation is about, for recency: its first user message, case and punctuation folded."""
    first = next((m["content"] for m in messages if m["role"] == "user"), "")
    return " ".join(re.sub(r"[^\w\s]", " ", first.lower()).split())


def _content(m: dict, where: str, rules: Rules) -> str:
    content = m.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and rules.text_parts:
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise MessageError(f"{where}.content[{j}]: {rules.parts_error}")
            parts.append(part["text"])
        return "".join(parts)
    got = "missing" if content is None and "content" not in m else type(content).__name__
    raise MessageError(f"{where}.content must be a string, got {got}")


def validate(messages, rules: Rules) -> list[dict]:
    """``messages`` as ``[{"role", "content"}]`` under ``rules``, or ``MessageError`` saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise MessageError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    if rules.max_messages is not None and len(messages) > rules.max_messages:
        raise MessageError(f"at most {rules.max_messages} messages are accepted, got {len(messages)}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise MessageError(f"{where} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in rules.roles:
            raise MessageError(f"{where}.role must be one of {', '.join(rules.roles)}, got {role!r}")
        content = _content(m, where, rules)
        if not rules.allow_empty and not content.strip():
            raise MessageError(f"{where}.content is empty")
        if rules.max_chars is not None and len(content) > rules.max_chars:
            raise MessageError(f"{where}.content has {len(content)} characters; the limit is {rules.max_chars}")
        if rules.only_role_and_content and set(m) - {"role", "content"}:
            raise MessageError(f"{where} has unknown keys: {', '.join(sorted(set(m) - {'role', 'content'}))}")
        role = rules.aliases.get(role, role)
        if rules.system_first_only and role == "system" and i != 0:
            raise MessageError(f"{where}: a system message may only come first")
        out.append({"role": role, "content": content})
    if rules.alternate:
        _check_turns(out)
    if rules.needs_reply:
        roles = [m["role"] for m in out if m["role"] != "system"]
        if "user" not in roles or "assistant" not in roles[roles.index("user"):]:
            raise MessageError("a transcript needs a user message followed by an assistant reply to learn from")
        while out[-1]["role"] != "assistant":  # a trailing unanswered user turn teaches nothing
            out.pop()
    return out


def _check_turns(messages: list[dict]) -> None:
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise MessageError("needs at least one user and one assistant message")
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise MessageError(f"turns must alternate user/assistant; turn {i + 1} is {m['role']!r}, expected {want!r}")
    if turns[-1]["role"] != "assistant":
        raise MessageError("the last message must be from the assistant")


SYSTEM_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
"""A conversation with a system turn: what a chat template is tried on to learn whether it has a system role."""


def takes_system(render) -> bool:
    """Whether ``render(messages)`` (a chat template: the tokenizer's, or the GGUF's at serve time) accepts a
    system turn. Mistral's and Gemma's templates raise on one (``raise_exception``: a jinja2 ``TemplateError``
    under transformers, a ``ValueError`` under llama-cpp-python)."""
    from jinja2 import TemplateError

    try:
        render(SYSTEM_PROBE)
    except (TemplateError, ValueError):
        return False
    return True


def fold_system(messages: list[dict]) -> list[dict]:
    """The canonical conversation for a chat template with no system role: a leading system turn folded into
    the first user turn (the system text, a blank line, the user's text). Training (``evolution.tokens``) and
    serving (``evolution.llamacpp``) both fold this way, so the model is served the prompt it learned on."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}] + rest[1:]
    return [{"role": "user", "content": system}] + rest
