"""Progress of a running age-up (stage, step, ETA) and the `evolve status` / `evolve karma` commands."""

from __future__ import annotations

import json
import time

from click.testing import CliRunner

from evolution import progress
from evolution.cli import main
from evolution.paths import DataRoot


def test_tracker_reports_stage_step_and_an_eta_from_pace_and_earlier_stage_times(monkeypatch):
    root = DataRoot.from_env().prepare()
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    t = progress.Tracker(root, {"merge": 3.0, "gguf_f16": 6.0, "quantize": 1.0, "smoke": 1.0, "measure": 40.0},
                         min_interval=0)
    t.set(gen=4, parent=3)
    t.stage("data", "start")
    t.stage("data", "done")
    t.stage("train", "start")
    t.step("sft", 0, 100, None)
    clock[0] += 50
    t.step("sft", 10, 100, 1.5)  # 5 s a step, 90 to go
    d = progress.read(root)
    assert (d["gen"], d["stage"], d["train_stage"], d["step"], d["total"]) == (4, "train", "sft", 10, 100)
    assert d["running"] and d["state"] == "running"
    assert d["eta_s"] == 450 + 3 + 6 + 1 + 1 + 40  # the gate is estimated by generation 0's measurement
    t.end("done", verdict="pass")
    assert progress.read(root)["state"] == "done" and progress.read(root)["eta_s"] is None


def test_progress_of_a_dead_process_reads_as_interrupted():
    root = DataRoot.from_env().prepare()
    progress.Tracker(root).set(gen=2, stage="train", pid=2**22 + 12345)  # no such process
    d = progress.read(root)
    assert d["state"] == "interrupted" and not d["running"]


def test_karma_add_and_status_from_the_command_line():
    runner = CliRunner()
    r = runner.invoke(main, ["karma", "add", "60", "--reason", "helped", "--key", "k1"])
    assert r.exit_code == 0, r.output
    assert "60 of 100" in r.output
    r = runner.invoke(main, ["karma", "add", "60", "--key", "k2"])
    assert "threshold crossed: age-up request 1 is queued" in r.output
    assert "already counted" in runner.invoke(main, ["karma", "add", "60", "--key", "k2"]).output
    bad = runner.invoke(main, ["karma", "add", "-5"])
    assert bad.exit_code != 0 and "greater than 0" in bad.output
    info = json.loads(runner.invoke(main, ["status", "--json"]).output)
    assert info["karma"]["total"] == 120 and info["karma"]["open_request"]["status"] == "pending"
    text = runner.invoke(main, ["status"]).output
    assert "karma:            20 of 100 toward the next age-up (80 to go); request 1 pending" in text
    assert json.loads(runner.invoke(main, ["karma", "--json"]).output)["requests"][0]["id"] == 1


def test_status_shows_the_running_age_up(tmp_path):
    root = DataRoot.from_env().prepare()
    t = progress.Tracker(root, min_interval=0)
    t.set(gen=3)
    t.stage("train", "start")
    t.step("sft", 1, 40, 2.0)
    time.sleep(0.01)
    t.step("sft", 2, 40, 1.9)
    out = CliRunner().invoke(main, ["status"]).output
    assert "age-up:           generation 3: train, SFT step 2/40, ETA" in out


def test_eta_in_an_earlier_training_stage_counts_the_stages_still_to_come(monkeypatch):
    root = DataRoot.from_env().prepare()
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    t = progress.Tracker(root, {"train": 300.0}, min_interval=0)
    t.stage("train", "start")
    t.set(train_stages=["cpt", "sft"])
    t.step("cpt", 0, 10, None)
    clock[0] += 10
    t.step("cpt", 5, 10, 2.0)  # 10 s of CPT left, and SFT after it: the last train stage's time bounds it
    assert progress.read(root)["eta_s"] == 300 - 10
    t.step("sft", 0, 10, None)
    clock[0] += 10
    t.step("sft", 5, 10, 1.0)  # the last stage: its own pace only
    assert progress.read(root)["eta_s"] == 10


def test_a_new_training_stage_is_written_at_its_first_step_even_between_throttled_writes(monkeypatch):
    root = DataRoot.from_env().prepare()
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    t = progress.Tracker(root, min_interval=60)  # no time passes: only forced writes land
    t.stage("train", "start")
    t.step("sft", 1, 4, 2.0)
    assert progress.read(root)["train_stage"] == "sft"
    t.step("sft", 2, 4, 1.9)
    assert progress.read(root)["step"] == 1  # throttled
    t.step("sft", 4, 4, 1.5)
    t.step("preference", 1, 12, 0.7)  # a reader (and a kill test) sees the stage it is in
    d = progress.read(root)
    assert (d["train_stage"], d["step"], d["total"]) == ("preference", 1, 12)
