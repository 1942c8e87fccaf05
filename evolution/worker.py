"""The daemon's age-up worker: one age-up (or the generation-0 bootstrap) in its own process.

``python -m evolution.worker --config CONFIG.json [--base DIR] [--bootstrap] [--nice N] [--threads N]``

A separate process keeps the server responsive and its memory small: training runs at a
lower CPU priority (``--nice``), gets its own torch thread count, and returns every byte it
used when it exits. Its OpenMP threads sleep at barriers instead of spinning
(``OMP_WAIT_POLICY=PASSIVE``, set by ``evolution/__init__.py`` unless the environment sets it,
and inherited from the daemon); the lower priority is what keeps chat responsive (training at
nice 0 made a chat's p50 3.8x idle, at nice 10 1.23x; docs/performance.md). It dies with the
daemon (a watchdog on its parent), so a killed daemon never leaves an orphan holding the age-up
lock; the restarted daemon resumes the age-up.

The worker ends with the child built and its gate result recorded; the daemon decides its fate
(``evolution.promotion``): it loads a passing child, checks it and swaps it in before it is
recorded as promoted. On SIGTERM the worker finishes the training step it is in,
writes a checkpoint and exits with ``EXIT_INTERRUPTED``; outside training it stops at once
(the stage reruns on resume).

Exit codes: 0 done, 1 failed (message on stderr and in the progress file), 3 interrupted,
4 age-ups paused by the stop rule.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from evolution import progress

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_PAUSED = 0, 1, 3, 4


class GracefulStop:
    """SIGTERM handling for an age-up: checkpoint-then-stop while training, stop at once otherwise."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.stage: str | None = None

    def on_stage(self, stage: str, what: str) -> None:
        self.stage = stage if what == "start" else None
        if self.requested.is_set() and what == "start":
            raise KeyboardInterrupt("SIGTERM")

    def handler(self, signum, frame) -> None:
        first = not self.requested.is_set()
        self.requested.set()
        if self.stage != "train" or not first:  # a second SIGTERM does not wait for the checkpoint
            raise KeyboardInterrupt("SIGTERM")
        logging.getLogger(__name__).warning("SIGTERM: writing a checkpoint after this training step, then stopping")

    def callback(self):
        from transformers import TrainerCallback

        stop = self

        class _CheckpointAndStop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if stop.requested.is_set():
                    control.should_save = True
                    control.should_training_stop = True

            def on_save(self, args, state, control, **kw):
                # Runs after the checkpoint and its COMPLETE marker are written.
                if stop.requested.is_set():
                    raise KeyboardInterrupt("SIGTERM")

        return _CheckpointAndStop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evolution.worker", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, type=Path, help="resolved AgeUpConfig as JSON")
    p.add_argument("--base", type=Path)
    p.add_argument("--retrieval", type=Path, help="the lineage's [retrieval] settings as JSON (the gate's figure)")
    p.add_argument("--bootstrap", action="store_true", help="only build generation 0")
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--threads", type=int)
    p.add_argument("--parent-pid", type=int)
    args = p.parse_args(argv)
    progress.die_with_parent(args.parent_pid)
    if args.nice:
        os.nice(args.nice)
    from evolution import logsetup

    logsetup.configure(fmt="%(asctime)s %(levelname)s worker: %(message)s")
    log = logging.getLogger("evolution.worker")

    from evolution import ageup
    from evolution.config import AgeUpConfig, RetrievalConfig
    from evolution.errors import AgeUpsPaused, EvolutionError
    from evolution.ledger import Ledger
    from evolution.paths import DataRoot

    cfg = AgeUpConfig.from_dict(json.loads(args.config.read_text()))
    retrieval = RetrievalConfig(**json.loads(args.retrieval.read_text())) if args.retrieval else None
    if args.threads:
        cfg.train.threads = args.threads
    stop = GracefulStop()
    signal.signal(signal.SIGTERM, stop.handler)
    root = DataRoot.from_env().prepare()
    try:
        with Ledger.open(root) as ledger:
            if args.bootstrap:
                ageup.ensure_generation_zero(root, cfg, ledger, args.base, stop.on_stage)
            else:
                s = ageup.age_up(root, cfg, ledger, args.base, stage_cb=stop.on_stage,
                                 train_callbacks=[stop.callback()], retrieval=retrieval)
                log.info("generation %d built: %s", s.gen, s.verdict)
    except KeyboardInterrupt:
        log.warning("interrupted; the age-up resumes from its last checkpoint")
        return EXIT_INTERRUPTED
    except AgeUpsPaused as exc:
        log.warning("%s", exc)
        return EXIT_PAUSED
    except EvolutionError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
