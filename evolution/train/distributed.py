"""Data-parallel training: the stages in ``[train] processes`` processes under torchrun (DDP).

With ``processes`` = N > 1, ``launch`` runs
``python -m torch.distributed.run --standalone --nproc-per-node N -m evolution.rank SPEC``
(PyTorch's own launcher; gloo on a CPU, NCCL with one GPU per process on CUDA) and waits for it.
Every process (``evolution.rank``) runs the same stage runner on the same rows; transformers' ``Trainer`` (through
accelerate) wraps the model in DDP and deals each global batch out among the processes: with
``batch_size`` B per process, process r takes rows ``[r·B, (r+1)·B)`` of the global batch of N·B rows
the one-process run would take (the same seeded permutation), so N processes train on the same rows,
step for step, as one process with ``batch_size`` N·B.

Only rank 0 writes: checkpoint ``COMPLETE`` markers (after every rank has written its RNG state: a
barrier), finished adapters, ``metrics.json`` and the run's ``result.json``; every rank waits for it
before the next stage loads that adapter. Removing incomplete checkpoints and rejecting tampered ones
(``evolution.train.checkpoints``) happens in the launching process, before any rank starts, so no two
processes move the same folder. Rank 0 prints one ``EVOLUTION_PROGRESS`` JSON line per step, which
``launch`` hands to the progress callback.

Stopping: a SIGTERM to the launching process goes to torchrun, which passes it to every rank; the
ranks agree (an all-reduce each step) to stop after the same step, write a checkpoint and exit, and
``launch`` raises ``KeyboardInterrupt`` as a one-process run stops. torchrun dies with the launching
process (``PR_SET_PDEATHSIG``) and each rank with torchrun (a watchdog on its parent), so a kill -9
leaves no process behind; the next run resumes from the last complete checkpoint.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from evolution.errors import EvolutionError

log = logging.getLogger(__name__)

PROGRESS = "EVOLUTION_PROGRESS "
"""The prefix of rank 0's progress lines on stdout."""


def world_size() -> int:
    """How many processes train together (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process writes (rank 0, or the only process)."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (one process: ``flag``)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def spec_dir(workdir: Path) -> Path:
    """Where ``launch`` writes the run's spec and rank 0 its result."""
    return workdir / "distributed"


def _die_with_launcher() -> None:
    """In torchrun's process, before exec: get SIGTERM when the process that launched it dies (kill -9 too)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def launch(parent: Path, stages, data: dict, cfg, workdir: Path, progress=None):
    """Run ``stages`` in ``cfg.processes`` processes under torchrun; the ``TrainResult`` rank 0 wrote."""
    from dataclasses import asdict, replace

    from evolution.fsutil import atomic_write_json
    from evolution.train import checkpoints
    from evolution.train.stage import StageMetrics, TrainResult

    done = {}
    for stage in stages:  # moving folders aside happens here, in one process, never in the ranks
        done[stage.name] = checkpoints.finished(workdir / stage.name)
        if (workdir / stage.name).is_dir():
            checkpoints.last_complete_checkpoint(workdir / stage.name)
    if all(done.values()):  # nothing left to train: no processes to start
        backend = json.loads((workdir / stages[-1].name / "metrics.json").read_text())["backend"]
        return TrainResult(backend=backend, adapter_dir=workdir / stages[-1].name / "adapter", stages=done)
    folder = spec_dir(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").unlink(missing_ok=True)
    threads = max(1, (cfg.threads or os.cpu_count() or 1) // cfg.processes)
    spec = {"parent": str(parent), "workdir": str(workdir), "stages": [s.name for s in stages],
            "train": asdict(replace(cfg, threads=threads)), "data": data}
    atomic_write_json(folder / "spec.json", spec)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.processes}",
           "-m", "evolution.rank", str(folder / "spec.json")]
    log.info("training in %d processes (%d threads each): %s", cfg.processes, threads, " ".join(cmd))
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=_die_with_launcher)
    stopping = threading.Event()
    previous = _forward_sigterm(proc, stopping)
    try:
        for line in proc.stdout:
            if line.startswith(PROGRESS):
                if progress:
                    p = json.loads(line[len(PROGRESS):])
                    progress(p["stage"], p["step"], p["total"], p["loss"])
            elif line.strip():
                log.info("%s", line.rstrip())
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # we were interrupted: take torchrun (and so every rank) down with us
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if stopping.is_set():
        raise KeyboardInterrupt("SIGTERM")
    if rc != 0:
        raise EvolutionError(f"data-parallel training ({cfg.processes} processes under torchrun) failed with exit "
                             f"status {rc}; the ranks' errors are in the log above. It resumes from its last "
                             "complete checkpoint when run again; train.processes = 1 trains in one process")
    d = json.loads((folder / "result.json").read_text())
    stage_fields = set(StageMetrics.__dataclass_fields__)
    return TrainResult(backend=d["backend"], adapter_dir=Path(d["adapter_dir"]),
                       stages={k: StageMetrics(**{f: x for f, x in v.items() if f in stage_fields})
                               for k, v in d.items() if isinstance(v, dict)})


def _forward_sigterm(proc: subprocess.Popen, stopping: threading.Event):
    """While torchrun runs, a SIGTERM to us goes to it too (it passes it to every rank), then to our own handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)

    def forward(signum, frame):
        stopping.set()
        proc.send_signal(signal.SIGTERM)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, forward)
    return previous
