"""Showing text that came from chats (prompts, replies, corrections) where a person reads it.

Such text is untrusted: a reply can hold raw HTML, Markdown that breaks a table (``|``, a
newline), or terminal control sequences that rewrite the screen. ``one_line`` makes any text one
visible line of bounded length (line breaks shown as ``⏎``, other control and format characters
— ESC, bidi overrides — as ``\\x1b``-style escapes); ``markdown_cell`` also escapes it for a cell
of a Markdown table (no HTML, no emphasis, links or code spans, no ``|``); ``terminal`` is
``one_line`` for a terminal that renders no markup (e.g. a ``rich.text.Text``).
"""

from __future__ import annotations

import html
import re
import unicodedata

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~])")
"""What Markdown reads inside a table cell: escapes, code spans, emphasis, links and images, cell breaks,
strikethrough. (Line-start syntax — headings, lists, quotes — cannot start inside a cell.)"""


def _visible(ch: str) -> str:
    if ch in "\r\n":
        return "⏎"
    if ch == "\t":
        return " "
    if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"):
        return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"
    return ch


def one_line(text: str | None, limit: int = 120) -> str:
    """``text`` as one visible line of at most ``limit`` characters (``…`` marks a cut); None is ``-``."""
    if text is None:
        return "-"
    text = text.replace("\r\n", "\n").strip()
    if not text:
        return "(empty)"
    cut = len(text) > limit
    if cut:
        text = text[: limit - 1]
    out = "".join(_visible(ch) for ch in text)
    return out + "…" if cut else out


def markdown_cell(text: str | None, limit: int = 120) -> str:
    """``text`` safe inside a cell of a Markdown table: one line, HTML entities, Markdown syntax escaped."""
    if text is None:
        return "-"
    line = html.escape(one_line(text, limit), quote=False)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", line)


def terminal(text: str | None, limit: int = 120) -> str:
    """``text`` safe to print on a terminal as plain text (print it without markup)."""
    return one_line(text, limit)
