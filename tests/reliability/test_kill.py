"""kill -9 at every named point of an age-up, many times, on the real worker and the real daemon.

One child generation is grown from a served generation 0 while ``EVOLUTION_FAULTS`` kills the
process again and again: at random training steps and checkpoint saves (hit counts drawn from a
seeded RNG), between writing a GGUF and renaming it, at ledger appends before their commit
(including the one right after the finished generation is moved into place), and in the daemon
between swapping the child in and recording it as promoted, or between loading a rollback
target and recording the rollback. After every kill, before the next start:

- generation 0 is still the served one, in the ledger and (for the daemon) over HTTP;
- nothing of the child is recorded as promoted, and it is never served before it is;
- ``ledger verify`` passes: the chain is whole and every recorded artifact hashes right;
- every checkpoint marked complete holds a readable adapter and the step it is named after.

In the end the child is served, its training says it resumed from a checkpoint, and the ledger
holds each of its events exactly once.

The preference stage (KTO on rated replies, the parent as reference) is killed the same way in a
second story: at its training steps and its checkpoint saves, until the resumed age-up finishes
with a child whose adapter and GGUF hash as the ledger records them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from safetensors import safe_open

from evolution import faults, progress
from evolution.config import AgeUpConfig
from evolution.intake.experiences import ExperienceStore
from evolution.fsutil import make_tree_writable, sha256_file
from evolution.intake.karma import DONE, RUNNING, Karma
from evolution.ledger import Ledger
from evolution.ledger import events as ev
from evolution.paths import DataRoot
from evolution.train import checkpoint_problems
from tests.daemon_util import DaemonProc
from tests.reliability.conftest import copy_root, daemon_config_file

pytestmark = pytest.mark.slow

SEED = 6
SFT_STEPS = 64
SWAP_KILLS = 5  # each: at a promotion, and at a rollback
EXPORT_KILLS = 4  # each: after the f16 GGUF is written, and after the quantized one
PREF_STEPS = 12
CHILD = 1
REPO = Path(__file__).resolve().parents[2]


def _worker(root: DataRoot, cfg_file: Path, spec: str | None) -> subprocess.CompletedProcess:
    """The daemon's age-up worker, run as the daemon runs it, with ``spec`` as its fault plan."""
    env = {k: v for k, v in os.environ.items() if k != faults.ENV} | {"EVOLUTION_HOME": str(root.root)}
    if spec:
        env[faults.ENV] = spec
    return subprocess.run([sys.executable, "-m", "evolution.worker", "--config", str(cfg_file), "--nice", "0"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)


def _checkpoints(root: DataRoot) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) checkpoints of the child; each complete one is checked readable."""
    complete, incomplete = [], []
    for ckpt in (root.staging_dir(CHILD) / "work").glob("*/checkpoint-*"):
        if not (ckpt / "COMPLETE").is_file():
            incomplete.append(ckpt)
            continue
        complete.append(ckpt)
        assert not checkpoint_problems(ckpt), ckpt  # every file as the trainer wrote it, per the marker's hashes
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["global_step"] == int(ckpt.name.split("-")[1]), ckpt
        with safe_open(ckpt / "adapter_model.safetensors", "pt") as f:
            assert list(f.keys()), ckpt
    return complete, incomplete


def _sft_left(root: DataRoot) -> int:
    """SFT steps still to train after the last complete checkpoint (0 once SFT has finished)."""
    sft = root.staging_dir(CHILD) / "work" / "sft"
    if (sft / "metrics.json").is_file() or not root.staging_dir(CHILD).exists():
        return 0
    states = [json.loads((c / "trainer_state.json").read_text()) for c in sft.glob("checkpoint-*")
              if (c / "COMPLETE").is_file()]
    last = max(states, key=lambda s: s["global_step"], default={"global_step": 0, "max_steps": SFT_STEPS})
    return last["max_steps"] - last["global_step"]


def _check_after_kill(root: DataRoot, entries_before: int, tally, area: str) -> int:
    """What must hold after any kill; returns the ledger's entry count."""
    with Ledger.open(root) as led:
        entries = led.entries()
        report = led.verify()
        tally.lost(area, max(0, entries_before - len(entries)) + len(report.problems))
        assert report.ok, report.problems  # chain whole, every recorded artifact hashes right
        assert led.served_generation() == 0
        kinds = [e.kind for e in entries if e.gen == CHILD and e.kind != ev.TRAINING_STARTED]  # one per attempt
        assert ev.PROMOTED not in kinds and ev.REJECTED not in kinds, kinds
        assert len(kinds) == len(set(kinds)), kinds  # nothing recorded twice
    job = progress.read(root)
    assert job is None or job["state"] != "running"  # a dead age-up is reported as interrupted
    _checkpoints(root)
    return len(entries)


def _daemon(root: DataRoot, conf: Path, spec: str | None = None) -> DaemonProc:
    """``run_daemon.py`` on ``root``, with ``spec`` as its fault plan (this process's own plan stays empty)."""
    d = DaemonProc(root.root, "--config", str(conf))
    if spec is None:
        return d.start()
    env = os.environ | {"EVOLUTION_HOME": str(root.root), faults.ENV: spec}
    with open(d.log, "ab") as out:
        d.proc = subprocess.Popen([sys.executable, str(REPO / "run_daemon.py"), "--port", str(d.port), *d.args],
                                  cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return d


def test_kill_9_at_every_point_of_an_age_up_loses_nothing_and_the_child_is_served_once(gen0, tmp_path, tally):
    src, base_cfg = gen0
    root = DataRoot(copy_root(src.root, tmp_path / "root"))
    cfg = AgeUpConfig.from_dict(base_cfg.to_dict())
    cfg.train.sft.epochs, cfg.train.sft.max_steps = 10, SFT_STEPS  # the step cap, not the epochs, ends SFT
    cfg.train.save_steps, cfg.train.save_total_limit = 2, 2
    cfg_file = tmp_path / "worker-config.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    rng = random.Random(SEED)
    timings: list[tuple[str, float]] = []
    with Ledger.open(root) as led:  # the karma request the daemon would be running this age-up for
        karma = Karma(led, threshold=1)
        request = karma.add(1, key="kill-story").triggered
        karma.mark(request.id, RUNNING)
        entries = len(led.entries())

    def kill(spec: str, area: str) -> subprocess.CompletedProcess:
        nonlocal entries
        with tally.fault(area):
            t0 = time.perf_counter()
            proc = _worker(root, cfg_file, spec)
            timings.append((spec, round(time.perf_counter() - t0, 1)))
            assert proc.returncode == -signal.SIGKILL, f"{spec}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
            entries = _check_after_kill(root, entries, tally, area)
        return proc

    # The data stage is written, its ledger record is not: the stage is redone, recorded once.
    kill("ledger_append=kill@1", "kill -9 · ledger append (worker)")
    assert root.partial_generations() == [CHILD] and root.generations() == [0]

    # Training: random steps, checkpoint saves and ledger appends until only the last SFT steps are left.
    while _sft_left(root) > 4:
        roll = rng.random()
        if roll < 0.15:  # the training_started record of a resumed run
            kill("ledger_append=kill@1", "kill -9 · ledger append (worker)")
        elif roll < 0.55:
            kill(f"train_step=kill@{rng.randint(3, 5)}", "kill -9 · training step")
        else:
            kill(f"checkpoint_save=kill@{rng.randint(2, 3)}", "kill -9 · checkpoint save")
            _, incomplete = _checkpoints(root)
            assert incomplete, "the save was killed before its COMPLETE marker: that checkpoint must not count"

    # Export: the f16 GGUF, then the quantized one, written but not renamed into place.
    staging = root.staging_dir(CHILD)
    for _ in range(EXPORT_KILLS):
        kill("gguf_export=kill@1", "kill -9 · GGUF export")
        assert (staging / "model.f16.gguf.tmp").is_file() and not (staging / "model.f16.gguf").exists()
    for i in range(EXPORT_KILLS):  # the second export of a run; the first, once the f16 one is in place
        kill(f"gguf_export=kill@{2 if i == 0 else 1}", "kill -9 · GGUF export")
        assert (staging / "model.gguf.tmp").is_file() and not (staging / "model.gguf").exists()

    # The finished child is moved into place, then the kill comes before the ledger hears of it.
    kill("ledger_append=kill@1", "kill -9 · ledger append (worker)")
    assert root.generations() == [0, CHILD] and not root.partial_generations()
    with Ledger.open(root) as led:
        assert not led.entries(gen=CHILD, kind=ev.EXPORTED)
    kill("ledger_append=kill@2", "kill -9 · ledger append (worker)")  # recorded as exported, not yet gated
    summary = json.loads((root.gen_dir(CHILD) / "generation.json").read_text())
    assert summary["resumed"] is True and summary["gate"]["verdict"] == "pass"
    assert summary["train"]["sft"]["resumed_from_step"] >= 2  # continued from a checkpoint, not from scratch

    # The daemon records the rest at its next start. Killed after the swap, before `promoted` is
    # recorded; at the next start the child is loaded, hash-checked and canary-tested again.
    conf = daemon_config_file(tmp_path, cfg)
    for _ in range(SWAP_KILLS):
        with tally.fault("kill -9 · swap"):
            d = _daemon(root, conf, "swap=kill@1")
            assert d.proc.wait(300) == -signal.SIGKILL, d.output()[-3000:]
            entries = _check_after_kill(root, entries, tally, "kill -9 · swap")

    # An adapter changed after the gate: the child is refused at the next start, never served.
    adapter = root.gen_dir(CHILD) / "adapter" / "adapter_model.safetensors"
    make_tree_writable(root.gen_dir(CHILD))
    original = adapter.read_bytes()
    adapter.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    with tally.fault("tamper · adapter modified"):
        d = _daemon(root, conf)
        assert d.proc.wait(300) == 1
        assert "does not match its generation.json" in d.output() and "adapter_model.safetensors" in d.output()
        with Ledger.open(root) as led:
            assert led.served_generation() == 0 and not led.entries(gen=CHILD, kind=ev.PROMOTED)
            [problem] = led.verify().problems
            assert problem.what == "artifact_changed" and "adapter_model.safetensors" in problem.message
    adapter.write_bytes(original)

    d = _daemon(root, conf)
    try:
        d.wait_serving(CHILD, 300)
        with Ledger.open(root) as led:
            [req] = Karma(led, threshold=1).requests()  # done by the child it built: no second age-up for it
            assert (req.status, req.gen) == (DONE, CHILD) and "promoted" in req.outcome, req
            assert root.generations() == [0, CHILD] and not root.partial_generations()
            assert [e.gen for e in led.entries(kind=ev.PROMOTED)] == [0, CHILD]
            kinds = [e.kind for e in led.entries(gen=CHILD) if e.kind != ev.TRAINING_STARTED]
            assert sorted(kinds) == sorted([ev.GENERATION_CREATED, ev.TRAINING_FINISHED, ev.EXPORTED,
                                            ev.GATE_RESULT, ev.PROMOTED]), kinds  # each exactly once
            assert led.verify().ok
            entries = len(led.entries())
    finally:
        assert d.stop() == 0

    # Rollbacks: killed between loading the target and recording the rollback; the ledger still
    # names the child, and the restarted daemon serves it.
    for _ in range(SWAP_KILLS):
        with tally.fault("kill -9 · swap"):
            d = _daemon(root, conf, "swap=kill@1")
            d.wait_serving(CHILD, 300)
            with pytest.raises(httpx.HTTPError):
                httpx.post(d.url + "/rollback", headers=d.auth(), json={"to": 0}, timeout=60)
            assert d.proc.wait(60) == -signal.SIGKILL
            with Ledger.open(root) as led:
                assert led.served_generation() == CHILD and not led.entries(kind=ev.ROLLED_BACK)
                report = led.verify()
                tally.lost("kill -9 · swap", max(0, entries - len(led.entries())) + len(report.problems))
                assert report.ok, report.problems
    d = _daemon(root, conf)
    try:
        d.wait_serving(CHILD, 120)
    finally:
        assert d.stop() == 0
    print("worker runs (fault plan, seconds):", timings)


def _stage_left(root: DataRoot, stage: str, steps: int) -> int:
    """Steps of ``stage`` still to train after its last complete checkpoint (0 once it has finished)."""
    d = root.staging_dir(CHILD) / "work" / stage
    if (d / "metrics.json").is_file():
        return 0
    done = [json.loads((c / "trainer_state.json").read_text())["global_step"] for c in d.glob("checkpoint-*")
            if (c / "COMPLETE").is_file()]
    return steps - max(done, default=0)


def test_kill_9_during_the_preference_stage_resumes_to_a_child_that_matches_the_ledger(gen0, tmp_path, tally):
    src, base_cfg = gen0
    root = DataRoot(copy_root(src.root, tmp_path / "root"))
    cfg = AgeUpConfig.from_dict(base_cfg.to_dict())
    p = cfg.train.preference
    p.method, p.batch_size, p.grad_accum, p.max_len, p.lr = "kto", 4, 1, 96, 5e-3
    p.epochs, p.max_steps = 10, PREF_STEPS  # the step cap ends the stage
    cfg.train.save_steps, cfg.train.save_total_limit = 2, 2
    cfg.curriculum.experience_heldout = 0.0
    cfg_file = tmp_path / "worker-config.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    rng = random.Random(SEED)
    with Ledger.open(root) as led:  # 16 rated replies to train on, and the karma request the age-up runs for
        store = ExperienceStore(led)
        for i in range(8):
            for label, reply in (("good", "It is sunny and warm today."), ("bad", "I refuse to answer that.")):
                eid = store.capture([{"role": "user", "content": f"What is the weather like in town {i}?"}], reply,
                                    f"chatcmpl-{label}-{i}", "evolution-gen-0", None, 0, "stop", False)
                store.rate(eid, label)
        karma = Karma(led, threshold=1)
        request = karma.add(1, key="kill-preference").triggered
        karma.mark(request.id, RUNNING)
        entries = len(led.entries())

    def kill(spec: str, area: str) -> None:
        nonlocal entries
        with tally.fault(area):
            proc = _worker(root, cfg_file, spec)
            assert proc.returncode == -signal.SIGKILL, f"{spec}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
            assert progress.read(root)["train_stage"] == "preference", spec  # the kill came in the preference stage
            entries = _check_after_kill(root, entries, tally, area)

    # CPT and SFT finish, then the first kill comes at the preference stage's third step (after its first save).
    before = cfg.train.cpt.max_steps + cfg.train.sft.max_steps
    kill(f"train_step=kill@{before + 3}", "kill -9 · preference step")
    work = root.staging_dir(CHILD) / "work"
    assert (work / "sft" / "adapter").is_dir() and not (work / "preference" / "adapter").exists()
    while _stage_left(root, "preference", PREF_STEPS) > 2:  # CPT and SFT finished: every hit is the preference stage's
        if rng.random() < 0.5:
            kill(f"train_step=kill@{rng.randint(2, 3)}", "kill -9 · preference step")
        else:
            kill(f"checkpoint_save=kill@{rng.randint(1, 2)}", "kill -9 · preference checkpoint save")
            _, incomplete = _checkpoints(root)
            assert incomplete, "the save was killed before its COMPLETE marker: that checkpoint must not count"

    proc = _worker(root, cfg_file, None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((root.gen_dir(CHILD) / "generation.json").read_text())
    pref = summary["train"]["preference"]
    assert (pref["method"], pref["steps"]) == ("kto", PREF_STEPS) and pref["resumed_from_step"] >= 2
    assert summary["train"]["sft"]["resumed_from_step"] is None  # finished before the kills: never redone
    with Ledger.open(root) as led:
        report = led.verify()
        tally.lost("kill -9 · preference step", max(0, entries - len(led.entries())) + len(report.problems))
        assert report.ok, report.problems
        [exported] = led.entries(gen=CHILD, kind=ev.EXPORTED)
        artifacts = exported.payload["artifacts"]
        assert {a["kind"] for a in artifacts} >= {"gguf", "adapter"}, artifacts
        for a in artifacts:  # the child on disk is the child the ledger names
            assert sha256_file(root.root / a["path"]) == a["sha256"], a["path"]
        kinds = [e.kind for e in led.entries(gen=CHILD) if e.kind != ev.TRAINING_STARTED]
        assert sorted(kinds) == sorted([ev.GENERATION_CREATED, ev.TRAINING_FINISHED, ev.EXPORTED, ev.GATE_RESULT])
        finished = led.entries(gen=CHILD, kind=ev.TRAINING_FINISHED)[0].payload
        assert finished["stages"]["preference"]["steps"] == PREF_STEPS
        assert finished["stages"]["preference"]["tokens_per_s"] > 0
        assert [r.label for r in ExperienceStore(led).list(limit=100)].count("good") == 8  # the ratings are all kept
