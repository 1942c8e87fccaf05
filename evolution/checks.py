"""Checks of one config field, shared by the sections that declare their own settings.

Each returns the problems it found (an empty list when the value is good), in the words ``ConfigError``
shows the user; ``config.validate`` collects every section's and raises them all at once. ``name`` is
the field as the user writes it (``train.sft.lr``, ``gate.min_recall``).
"""

from __future__ import annotations


def positive_int(name: str, value, allow_none: bool = False) -> list[str]:
    if value is None and allow_none:
        return []
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return [f"{name} must be a positive integer, got {value!r}"]
    return []


def positive_num(name: str, value) -> list[str]:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        return [f"{name} must be a positive number, got {value!r}"]
    return []


def share_or_unset(name: str, value, bools: bool = True) -> list[str]:
    """A share or margin in [0, 1], or None (``bools``: true / false pass as 1 / 0, as they always have)."""
    if value is not None and (not isinstance(value, (int, float)) or (not bools and isinstance(value, bool))
                              or not 0 <= value <= 1):
        return [f"{name} must be between 0 and 1 (or unset), got {value!r}"]
    return []


def positive_or_unset(name: str, value) -> list[str]:
    if value is not None and (not isinstance(value, (int, float)) or value <= 0):
        return [f"{name} must be a positive number (or unset), got {value!r}"]
    return []


def anchor_ratio(name: str, value) -> list[str]:
    """A bound against a fixed anchor, as a multiple of its value: at least 1, or None."""
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 1):
        return [f"{name} must be a number >= 1 (or unset), got {value!r}: below 1 a child would have to beat the "
                "anchor"]
    return []


def flag(name: str, value) -> list[str]:
    if not isinstance(value, bool):
        return [f"{name} must be true or false, got {value!r}"]
    return []
