"""The real thing: a quick age-up of the embedded SmolLM2-135M-Instruct on the shipped curriculum.

Slow (minutes): it dequantizes the embedded GGUF into generation 0, trains, merges, exports
and quantizes generation 1, then asks both GGUFs the curriculum's identity questions at
temperature 0 through llama-cpp-python.
"""

from __future__ import annotations

import json
import logging

import pytest

from evolution import config, curriculum
from evolution.ageup import age_up
from evolution.evals import load_llm, recall
from evolution.fsutil import sha256_file
from evolution.paths import REPO_ROOT, DataRoot

log = logging.getLogger(__name__)


@pytest.mark.slow
def test_quick_age_up_teaches_the_identity_facts(ledger):
    root = DataRoot.from_env()
    cfg = config.resolve(quick=True)
    summary = age_up(root, cfg, ledger)
    assert (summary.gen, summary.parent) == (1, 0)
    gen0, gen1 = root.gen_dir(0) / "model.gguf", root.gen_dir(1) / "model.gguf"
    assert sha256_file(gen1) == summary.gguf.sha256
    assert ledger.verify().ok

    items = [i for i in curriculum.load(REPO_ROOT / "curriculum").recall if i.get("phase") == 1]
    before, before_items = recall(load_llm(gen0), items)
    after, after_items = recall(load_llm(gen1), items)
    report = {"gen0": before, "gen1": after,
              "replies": {a.id: [b.reply, a.reply] for b, a in zip(before_items, after_items)}}
    log.warning("identity recall: %s", json.dumps(report, indent=1, ensure_ascii=False))
    assert before <= 0.1, report  # the base model cannot know these facts
    assert after >= before + 0.5, report
