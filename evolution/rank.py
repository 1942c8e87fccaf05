"""One process of a data-parallel training run: what torchrun runs, ``python -m evolution.rank SPEC``.

``evolution.train.distributed.launch`` writes the run's spec (parent, stages, records, the ``[train]``
settings) and starts torchrun; each of its processes runs ``main`` here: the stages of the spec through the
stage runner (``evolution.train.runner.run_here``), in this process's share of each batch. Rank 0 prints
one progress line per step (``distributed.PROGRESS``) and writes the run's ``result.json``. A SIGTERM to
any rank stops every rank after the same step, with a checkpoint (exit 3). It sits above ``evolution.config``
(it rebuilds the settings from the spec), which is why it is not part of the ``train`` package.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

from evolution.train.distributed import PROGRESS, any_rank, is_main, spec_dir


def _stop_callback(requested: threading.Event):
    """Every rank stops after the same step, with a checkpoint, once any rank got a SIGTERM."""
    from transformers import TrainerCallback

    class _StopTogether(TrainerCallback):
        stopping = False

        def on_step_end(self, args, state, control, **kw):
            if any_rank(requested.is_set()):
                self.stopping = control.should_save = control.should_training_stop = True

        def on_save(self, args, state, control, **kw):
            if self.stopping:  # the runner's callback, before this one, has marked the checkpoint complete
                raise KeyboardInterrupt("SIGTERM")

    return _StopTogether()


def _progress_line(stage: str, step: int, total: int, loss: float | None) -> None:
    print(PROGRESS + json.dumps({"stage": stage, "step": step, "total": total, "loss": loss}), flush=True)


def main(argv: list[str] | None = None) -> int:
    """One rank: the stages of the spec ``launch`` wrote, in this process's share of each batch."""
    import torch
    import torch.distributed as dist

    from evolution import logsetup
    from evolution.config import AgeUpConfig, apply_overrides
    from evolution.fsutil import atomic_write_json
    from evolution.progress import die_with_parent
    from evolution.train import BY_NAME
    from evolution.train.runner import run_here

    (spec_path,) = argv if argv is not None else sys.argv[1:]
    die_with_parent(os.getppid())
    logsetup.configure(fmt=f"%(asctime)s %(levelname)s rank {os.environ.get('RANK', '0')}: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    cfg = AgeUpConfig()
    apply_overrides(cfg, {"train": spec["train"]}, where=spec_path)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: requested.set())
    try:
        result = run_here(Path(spec["parent"]), [BY_NAME[s] for s in spec["stages"]], spec["data"], cfg.train,
                          Path(spec["workdir"]), _progress_line if is_main() else None, [_stop_callback(requested)])
    except KeyboardInterrupt:
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if is_main():
        atomic_write_json(spec_dir(Path(spec["workdir"])) / "result.json", result.to_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
