"""The real thing: a quick age-up of the embedded SmolLM2-135M-Instruct on the shipped curriculum.

Slow (several minutes on 2 cores): it dequantizes the embedded GGUF into generation 0,
measures it, trains, merges, exports and quantizes generation 1, and gates it against
generation 0 on the GGUFs through llama-cpp-python at temperature 0.
"""

from __future__ import annotations

import json
import logging

import pytest

from evolution import config
from evolution.ageup import age_up
from evolution.evals import load_llm, ask
from evolution.fsutil import sha256_file
from evolution.paths import DataRoot

log = logging.getLogger(__name__)


@pytest.mark.slow
def test_quick_age_up_teaches_the_identity_facts_and_passes_the_gate(ledger):
    root = DataRoot.from_env()
    summary = age_up(root, config.resolve(quick=True), ledger)
    assert (summary.gen, summary.parent) == (1, 0)
    gen1 = root.gen_dir(1) / "model.gguf"
    assert sha256_file(gen1) == summary.gguf.sha256
    report = json.loads((root.gen_dir(1) / "eval.json").read_text())
    child, parent = report["child"], report["parent"]
    log.warning("gate: %s", json.dumps({"verdict": report["verdict"], "reasons": report["reasons"],
                                         "child": child["recall_by_phase"] | report["metrics"],
                                         "parent": parent["recall_by_phase"]}, indent=1))
    # Identity facts (phase 1): the base model cannot know them; the child states them.
    assert parent["recall_by_phase"]["1"] <= 0.1, parent["recall_by_phase"]
    assert child["recall_by_phase"]["1"] >= parent["recall_by_phase"]["1"] + 0.5, child["recall_by_phase"]
    assert report["verdict"] == "pass", report["reasons"]
    assert ledger.served_generation() == 1
    assert ledger.verify().ok

    reply = ask(load_llm(gen1), "What is your name?")
    assert "wren" in reply.lower(), reply
