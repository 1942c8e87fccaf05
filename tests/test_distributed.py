"""Data-parallel training (``[train] processes``) on CPU: two processes under torchrun (gloo) train the
tiny model as one process does at the same global batch, write the same kind of trusted checkpoints and
adapters, and resume after a kill -9 from the last complete checkpoint.

Tolerance: the two runs see the same rows at every step (process r takes rows [r·B, (r+1)·B) of the
one-process batch of 2B) from the same seeded adapter; what differs is the order of float sums (rows
packed into lanes per process, gradients summed by gloo's all-reduce), about 1e-7 relative per op in
fp32. Measured: the curves agree to 2e-6 over 2 + 6 + 4 steps. ``LOSS_TOL`` (1e-4 absolute, on losses
of 0.5-11) leaves room for other CPUs' kernels and stays far below what one different row moves a
step's loss (the losses move by 0.05-0.1 a step, asserted below so the check cannot pass vacuously).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from evolution.train import COMPLETE, checkpoint_problems, train
from evolution.train.checkpoints import finished

pytestmark = pytest.mark.slow

LOSS_TOL = 1e-4
TEXTS = [f"Tide pools fill and empty twice a day; note {i} is about the sea, the shore and the {w}."
         for i, w in enumerate(["gulls", "crabs", "kelp", "foam", "rocks", "sand"] * 4)]
CONVS = [[{"role": "user", "content": f"What is your name? {i}"}, {"role": "assistant", "content": "My name is Wren."}]
         for i in range(16)]
PAIRS = [{"prompt": [{"role": "user", "content": f"Who are you? {i}"}], "chosen": "I am Wren.",
          "rejected": "I do not know."} for i in range(8)]
DATA = {"cpt": [{"text": t} for t in TEXTS], "sft": [{"messages": c} for c in CONVS], "preference": PAIRS}


def _cfg(tiny_cfg, processes: int):
    """The tiny run at a global batch of 4 (CPT, SFT) and 2 (DPO) rows, in ``processes`` processes."""
    t = tiny_cfg.train
    t.stages = ["cpt", "sft", "preference"]
    t.cpt.max_steps, t.sft.max_steps = 2, 6
    t.preference = replace(t.preference, method="dpo", min_pairs=1, lr=5e-3, batch_size=2 // processes,
                           grad_accum=1, max_steps=4, max_len=96)
    t.batch_size, t.processes, t.threads, t.precision = 4 // processes, processes, processes, "fp32"
    return t


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory):
    """One process, then two, on the same data and global batch (each run is ~20-40 s of the module's time)."""
    from tests.conftest import make_tiny_cfg, make_tiny_curriculum

    out = {}
    for n in (1, 2):
        tmp = tmp_path_factory.mktemp(f"p{n}")
        cfg = _cfg(make_tiny_cfg(make_tiny_curriculum(tmp / "curriculum")), n)
        steps: list[tuple] = []
        result = train(tiny_base, DATA, cfg, tmp / "work", progress=lambda *a: steps.append(a))
        out[n] = (result, tmp / "work", steps, cfg)
    return out


def test_two_processes_give_the_loss_curve_of_one_at_the_same_global_batch(runs):
    one, two = runs[1][0], runs[2][0]
    for stage in ("cpt", "sft", "preference"):
        a, b = one.stages[stage], two.stages[stage]
        assert a.steps == b.steps and len(a.losses) == a.steps > 1, stage
        assert b.losses == pytest.approx(a.losses, abs=LOSS_TOL), stage
        assert a.tokens == b.tokens, stage  # every process's rows counted, once
    assert two.stages["preference"].method == "dpo"
    # Not vacuous: the losses move from step to step by far more than the tolerance.
    sft = one.stages["sft"].losses
    assert max(abs(x - y) for x, y in zip(sft, sft[1:])) > 100 * LOSS_TOL


def test_rank_0_alone_writes_trusted_checkpoints_and_adapters(runs):
    result, work, steps, _ = runs[2]
    for stage in ("cpt", "sft", "preference"):
        ckpts = sorted((work / stage).glob("checkpoint-*"))
        assert ckpts, stage
        for ckpt in ckpts:
            assert (ckpt / COMPLETE).is_file() and checkpoint_problems(ckpt) == []
            assert {p.name for p in ckpt.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
        done = finished(work / stage)  # adapter + metrics.json, hashes as written
        assert done is not None and done.steps == result.stages[stage].steps
    assert result.adapter_dir == work / "preference" / "adapter"
    # Progress came through from rank 0 only: one report per step of each stage.
    assert [s[:2] for s in steps if s[0] == "sft"] == [("sft", i) for i in range(1, 7)]


def test_a_finished_distributed_run_is_not_redone(runs, tiny_base):
    result, work, _, cfg = runs[2]
    again = train(tiny_base, DATA, cfg, work)
    assert all(s.skipped for s in again.stages.values())
    assert again.adapter_dir == result.adapter_dir


_CHILD = """
import json, sys
from pathlib import Path
from evolution.config import AgeUpConfig, apply_overrides
from evolution.train import train
spec = json.loads(Path(sys.argv[1]).read_text())
cfg = AgeUpConfig()
apply_overrides(cfg, {"train": spec["train"]})
train(Path(spec["parent"]), spec["data"], cfg.train, Path(spec["work"]))
"""


def _pids_naming(path: Path) -> list[int]:
    """The processes whose command line names ``path`` (the ranks name their spec file under it)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if str(path).encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
    return pids


def test_kill_9_mid_run_resumes_from_the_last_complete_checkpoint(runs, tiny_base, tmp_path):
    """Every process of the run (launcher, torchrun, both ranks) killed at once, as by a power cut; the next run
    resumes from the last checkpoint marked complete and trains the steps the uninterrupted run trains."""
    whole, _, _, cfg = runs[2]
    cfg = replace(cfg, stages=["cpt", "sft"], save_total_limit=3)  # the run above, without its preference stage
    work = tmp_path / "work"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"train": asdict(cfg), "parent": str(tiny_base), "data": DATA, "work": str(work)}))
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(spec)], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (work / "sft" / "checkpoint-4" / COMPLETE).is_file():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint-4 within 240 s"
            time.sleep(0.05)
    finally:
        ranks = _pids_naming(work)  # torchrun starts the ranks in sessions of their own
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert len(ranks) == 3  # torchrun and its two ranks
    time.sleep(0.5)
    assert not _pids_naming(work)
    complete = [p for p in (work / "sft").glob("checkpoint-*") if (p / COMPLETE).is_file()]
    last = max(int(p.name.split("-")[1]) for p in complete)
    assert 4 <= last < 6

    result = train(tiny_base, DATA, cfg, work)
    sft = result.stages["sft"]
    assert result.stages["cpt"].skipped and sft.resumed_from_step == last and sft.steps == 6
    assert finished(work / "sft") is not None
    # The resumed steps are the uninterrupted run's: same rows, same RNG, same optimizer state.
    assert sft.losses == pytest.approx(whole.stages["sft"].losses[last:], abs=LOSS_TOL)


def test_sigterm_stops_every_rank_after_the_same_step_with_a_checkpoint(runs, tiny_base, tmp_path):
    """The daemon's stop: a SIGTERM to the launching process reaches every rank; they stop together after a
    step, write a complete checkpoint, and the launcher raises KeyboardInterrupt (the worker's 'interrupted')."""
    _, _, _, cfg = runs[2]
    # 400 steps (far more than run in the second before the stop: 12 once finished first on a fast machine),
    # and no checkpoint but the one the stop writes
    cfg = replace(cfg, stages=["sft"], save_steps=10_000, sft=replace(cfg.sft, epochs=400.0, max_steps=400))
    work = tmp_path / "work"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"train": asdict(cfg), "parent": str(tiny_base), "data": DATA, "work": str(work)}))
    child = _CHILD.replace("train(Path", "try:\n    train(Path") + "except KeyboardInterrupt:\n    sys.exit(3)\n"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", child, str(spec)], env=env, start_new_session=True,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while "sft: 16 rows" not in (line := proc.stderr.readline()):  # training starts (the ranks log it)
            assert line and time.monotonic() < deadline, "the run never started training"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        proc.stderr.read()
        assert proc.wait(timeout=120) == 3
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(0.5)
    assert not _pids_naming(work)
    ckpts = [p for p in (work / "sft").glob("checkpoint-*")]
    assert len(ckpts) == 1 and checkpoint_problems(ckpts[0]) == []
    assert {p.name for p in ckpts[0].glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert finished(work / "sft") is None  # stopped, not finished
    assert 1 <= int(ckpts[0].name.split("-")[1]) < 400  # resuming from it is the kill -9 test's
