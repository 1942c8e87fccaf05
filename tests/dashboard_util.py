"""A headless Chromium (Debian's ``chromium``, driven by Playwright) for the dashboard's browser tests.

No browser is downloaded: Playwright is pointed at the system Chromium (``.ci/chromium.sh`` installs
it). Without one the browser tests are skipped, unless ``EVOLUTION_REQUIRE_BROWSER=1`` (set by
``.ci/run``), where they fail: CI must not pass by skipping them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str | None:
    explicit = os.environ.get("EVOLUTION_CHROMIUM")
    if explicit:
        return explicit
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def need_browser() -> str:
    """The Chromium executable, or skip (fail under EVOLUTION_REQUIRE_BROWSER=1) saying how to get one."""
    why = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        why = "playwright is not installed (pip install -e '.[test]')"
    exe = chromium_path()
    if why is None and exe is None:
        why = "no Chromium on PATH (bash .ci/chromium.sh, or apt-get install chromium; EVOLUTION_CHROMIUM=path)"
    if why is None:
        return exe
    if os.environ.get("EVOLUTION_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser tests required but {why}")
    pytest.skip(why)


def artifacts_dir() -> Path:
    """Where screenshots are kept: $EVOLUTION_TEST_ARTIFACTS or the repo's test-artifacts/ (git-ignored)."""
    d = Path(os.environ.get("EVOLUTION_TEST_ARTIFACTS") or REPO / "test-artifacts") / "dashboard"
    d.mkdir(parents=True, exist_ok=True)
    return d


class Console:
    """Console errors and uncaught exceptions of a page, collected for a final assert."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def take(self, allowed: tuple[str, ...] = ()) -> list[str]:
        """The errors so far (those containing an ``allowed`` fragment dropped), and forget them."""
        out = [e for e in self.errors if not any(a in e for a in allowed)]
        self.errors.clear()
        return out
