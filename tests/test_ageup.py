"""A whole age-up on a tiny model: generation 0 and 1 exported, hashed, read-only, resumable."""

from __future__ import annotations

import json
import os
import stat

import pytest
from transformers import TrainerCallback

from evolution.ageup import GenerationSummary, age_up
from evolution.fsutil import sha256_file
from evolution.paths import DataRoot


class _CrashInSFT(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if args.output_dir.endswith("sft") and state.global_step == 3:
            raise KeyboardInterrupt("simulated crash")


def _files(root):
    return [p for p in root.rglob("*") if p.is_file()]


def test_age_up_builds_hashed_read_only_generations(tiny_base, tiny_cfg):
    from llama_cpp import Llama

    root = DataRoot.from_env()
    events = []
    summary = age_up(root, tiny_cfg, base=tiny_base, events=lambda k, g, p: events.append((k, g, p)))
    assert summary.gen == 1 and summary.parent == 0
    assert root.generations() == [0, 1]
    assert not root.staging_dir(1).exists() and not root.staging_dir(0).exists()

    gen1 = root.gen_dir(1)
    gguf = gen1 / "model.gguf"
    recorded = (gen1 / "model.gguf.sha256").read_text().split()
    assert recorded == [sha256_file(gguf), "model.gguf"]
    assert summary.gguf.sha256 == recorded[0]
    for art in summary.artifacts:
        assert sha256_file(gen1 / art.path) == art.sha256
        assert (gen1 / art.path).stat().st_size == art.size
    assert GenerationSummary.load(gen1) == summary

    for p in _files(gen1) + _files(root.gen_dir(0)):
        assert not p.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), p
    assert not os.stat(gen1).st_mode & stat.S_IWUSR

    for name in ("config.json", "metrics.json", "data/manifest.json", "adapter/adapter_model.safetensors"):
        assert (gen1 / name).is_file(), name
    manifest = json.loads((gen1 / "data" / "manifest.json").read_text())
    assert "curriculum/phase1_identity/sft.jsonl" in manifest["files"]
    assert summary.smoke["reply"]

    llm = Llama(model_path=str(gguf), n_ctx=128, verbose=False)
    assert llm.n_vocab() > 1000

    kinds = [(k, g) for k, g, _ in events]
    assert kinds == [("generation_created", 0), ("exported", 0), ("generation_created", 1),
                     ("training_started", 1), ("training_finished", 1), ("exported", 1)]
    exported = events[-1][2]
    for art in exported["artifacts"]:
        assert sha256_file(root.root / art["path"]) == art["sha256"]


def test_second_age_up_replays_earlier_data_and_trains_from_the_newest(tiny_base, tiny_cfg, tiny_curriculum):
    root = DataRoot.from_env()
    age_up(root, tiny_cfg, base=tiny_base)
    # The curriculum moves on: the old facts are no longer in it, replay must bring some back.
    (tiny_curriculum / "phase1_identity" / "sft.jsonl").write_text(json.dumps(
        {"messages": [{"role": "user", "content": "Where do you live?"},
                      {"role": "assistant", "content": "On Alder Street."}]}) + "\n")
    tiny_cfg.curriculum.replay_ratio = 3.0
    s2 = age_up(root, tiny_cfg)
    assert (s2.gen, s2.parent) == (2, 1)
    manifest = json.loads((root.gen_dir(2) / "data" / "manifest.json").read_text())
    assert manifest["replayed"]["sft"] == 3
    assert "checkpoints/gen_0001/data/sft.jsonl" in manifest["files"]


def test_interrupted_age_up_resumes_without_redoing_finished_stages(tiny_base, tiny_cfg):
    root = DataRoot.from_env()
    with pytest.raises(KeyboardInterrupt):
        age_up(root, tiny_cfg, base=tiny_base, train_callbacks=[_CrashInSFT()])
    staging = root.staging_dir(1)
    state = json.loads((staging / "state.json").read_text())
    assert state["completed"] == ["data"]
    assert root.generations() == [0]

    stages = []
    summary = age_up(root, tiny_cfg, stage_cb=lambda s, w: stages.append((s, w)))
    assert ("data", "skip") in stages and ("data", "start") not in stages
    assert summary.resumed and summary.train["sft"]["resumed_from_step"] == 2
    assert root.generations() == [0, 1] and not staging.exists()
