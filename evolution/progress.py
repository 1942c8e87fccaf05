"""Where a running age-up stands: ``<data root>/logs/ageup.json``, rewritten atomically as it goes.

Any age-up — `evolve age-up` or the daemon's — writes it; `evolve status` and the daemon's
``/status`` read it. It holds the generation, the stage, the training step out of the total,
an ETA and the process id, so a reader can tell a live age-up from one that died (the file of
a dead process is reported as interrupted, not running).

ETA: the rest of the current training stage at its measured pace, plus, for stages not yet
started, the time the latest generation's age-up spent on them (``generation.json``). During
the first training stage of the very first age-up the stages to come are not in it yet
(nothing measured them).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from evolution import faults
from evolution.fsutil import atomic_write_json
from evolution.paths import DataRoot

FILE = "ageup.json"
ORDER = ("data", "train", "merge", "weights", "gguf_f16", "quantize", "smoke", "gate", "finalize")
BOOT_ORDER = ("base", "gguf_f16", "quantize", "smoke", "measure", "finalize")


def path(root: DataRoot) -> Path:
    return root.logs / FILE


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read(root: DataRoot) -> dict | None:
    """The last progress written, with ``running`` (its process is alive and it has not ended)."""
    try:
        d = json.loads(path(root).read_text())
    except (FileNotFoundError, ValueError):
        return None
    d["running"] = d.get("state") == "running" and pid_alive(int(d.get("pid", 0)))
    if d.get("state") == "running" and not d["running"]:
        d["state"] = "interrupted"
    return d


class Tracker:
    """Stage and step callbacks for ``ageup.age_up`` that keep the progress file current."""

    def __init__(self, root: DataRoot, expected: dict[str, float] | None = None, min_interval: float = 1.0):
        self.file = path(root)
        self.expected = dict(expected or {})
        if "gate" not in self.expected and "measure" in self.expected:  # measuring gen 0 ~ gating a child
            self.expected["gate"] = self.expected["measure"]
        self.min_interval = min_interval
        self._last_write = 0.0
        self._step_t0: dict[str, tuple[float, int]] = {}
        self.d: dict = {"pid": os.getpid(), "state": "running", "started": time.time(), "gen": None,
                        "stage": None, "stages_done": [], "train_stage": None, "step": 0, "total": 0,
                        "loss": None, "eta_s": None, "updated": time.time()}
        self._write(force=True)

    def _write(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_write < self.min_interval:
            return
        self._last_write = now
        self.d["updated"] = now
        self.d["eta_s"] = self._eta() if self.d["state"] == "running" else None
        self.file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.file, self.d, sync_dir=False)

    def _eta(self) -> float | None:
        order = BOOT_ORDER if self.d.get("stage") in ("base", "measure") else ORDER
        rest = 0.0
        known = False
        if self.d["stage"] == "train" and self.d["total"]:
            t0, s0 = self._step_t0.get(self.d["train_stage"], (None, 0))
            done = self.d["step"] - s0
            if t0 is not None and done > 0:
                rest += (time.time() - t0) / done * (self.d["total"] - self.d["step"])
                known = True
            # ``train_stages``: the stages the age-up trains, in order (set as training starts)
            if self.d["train_stage"] in self.d.get("train_stages", [])[:-1] and "train" in self.expected:
                # later training stages are still to come: at least the whole train stage's time
                elapsed = time.time() - self.d.get("stage_started", time.time())
                rest = max(rest, self.expected["train"] - elapsed)
        for st in order:
            if st not in self.d["stages_done"] and st != self.d["stage"] and st in self.expected:
                rest += self.expected[st]
                known = True
        return round(rest, 1) if known else None

    def stage(self, stage: str, what: str) -> None:
        if what == "start":
            self.d.update(stage=stage, stage_started=time.time())
        elif stage not in self.d["stages_done"]:
            self.d["stages_done"].append(stage)
        self._write(force=True)

    def step(self, stage: str, step: int, total: int, loss: float | None) -> None:
        if stage not in self._step_t0:
            self._step_t0[stage] = (time.time(), step)
        new_stage = stage != self.d["train_stage"]
        self.d.update(train_stage=stage, step=step, total=total, loss=loss)
        self._write(force=new_stage or step == total)  # a reader never sees a finished stage's name
        faults.point("train_step")

    def set(self, **fields) -> None:
        self.d.update(fields)
        self._write(force=True)

    def end(self, state: str, **fields) -> None:
        """``state``: 'done', 'failed' or 'interrupted'."""
        self.d.update(state=state, ended=time.time(), eta_s=None, **fields)
        self._write(force=True)


def die_with_parent(parent_pid: int | None) -> None:
    """Exit at once when the daemon that started us is gone (kill -9 included).

    A watchdog thread, not ``PR_SET_PDEATHSIG``: that signal follows the parent *thread*, and the
    daemon starts workers from a scheduler thread that may end while the daemon lives on.
    """
    if parent_pid is None:
        return

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
