"""A headless Chromium (Debian's ``chromium``, driven by Playwright) for the dashboard's browser tests, and
``fabricate_lineage``: a ledger of any number of generations for its layout tests.

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



def fabricate_lineage(root, ledger, n: int) -> None:
    """A ledger of ``n`` generations written event by event (no model), with every metric a gate records (the
    metrics table's and ``style_drift_from_parent``: the widest lineage table): generation 0 the base, then
    children alternately promoted and rejected (every third promoted one later rolled back), each with a
    stand-in GGUF, training losses and stage times; the last promoted one not rolled back is served."""
    from evolution.ledger import events as ev

    def gguf(gen: int) -> dict:
        d = root.gen_dir(gen)
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.gguf").write_bytes(f"gguf {gen}".encode())
        return ev.artifact(root, d / "model.gguf", "gguf")

    def metrics(gen: int) -> dict:
        f = (gen % 7) / 10
        return {"smoke": 1.0, "recall": 0.55 + f / 2, "generalization": 0.4 + f / 3, "style_drift": 0.8 + f,
                "probe_recall": 0.5 + f / 2, "persona_leak": 0.1 * f, "experience_similarity": 0.31 + f / 4,
                "preference_margin": -0.35 + f, "perplexity": 161_234.5 - 900 * gen, "style_drift_from_parent": 1.25 * f}

    ledger.record(ev.generation_created(0, None, "base", "c0", "m0"))
    ledger.record(ev.exported(0, [gguf(0)], quantization="q8_0"))
    ledger.record(ev.promoted(0, metrics=metrics(0)))
    served = 0
    for gen in range(1, n):
        ledger.record(ev.generation_created(gen, served, "base", f"c{gen}", f"m{gen}"))
        ledger.record(ev.training_finished(gen, steps=12, losses={"cpt": [3.0, 2.5], "sft": [2.0, 1.5, 1.2]},
                                           stages={"cpt": {"seconds": 61.5}, "sft": {"seconds": 540.2}}))
        ledger.record(ev.exported(gen, [gguf(gen)], quantization="q8_0"))
        verdict = "pass" if gen % 2 else "fail"
        reasons = [] if verdict == "pass" else [
            "recall 0.612 is below the parent's 0.700 less the 0.05 margin; probe_recall fell from 0.8 to 0.4"]
        ledger.record(ev.gate_result(served, gen, metrics(gen), {"min_recall": 0.7}, verdict,
                                     parent_metrics=metrics(served), checks=[], reasons=reasons))
        if verdict == "pass":
            ledger.record(ev.promoted(gen))
            if gen % 3 == 0:
                ledger.record(ev.rolled_back(gen, served, "the agent's users said its replies got worse"))
            else:
                served = gen
        else:
            ledger.record(ev.rejected(gen, reason=reasons[0]))
