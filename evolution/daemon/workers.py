"""The daemon's age-up worker process: started, watched, stopped (``evolution.worker`` runs inside).

One worker at a time. It runs at a lower CPU priority with the resolved config written beside
its log, dies with the daemon (a watchdog on its parent), and says how it ended by its exit
code. What a finished worker means for the karma request it served is the daemon's to decide.

Its stdout and stderr (its log lines, and whatever a library prints or a crash leaves) come
through a pipe that a thread of the daemon copies into ``<data root>/logs/worker.log``, rotated
by size (``[daemon] log_max_bytes`` / ``log_backups``): a file the worker held open itself could
not be rotated under it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from evolution import logsetup
from evolution.config import AgeUpConfig, DaemonConfig, RetrievalConfig
from evolution.fsutil import atomic_write_json
from evolution.paths import DataRoot
from evolution.worker import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PAUSED

log = logging.getLogger(__name__)

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PAUSED", "Worker", "describe_exit", "start"]


class Worker:
    """One running age-up worker process."""

    def __init__(self, proc: subprocess.Popen, request_id: int | None, bootstrap: bool, log_path: Path,
                 pump: threading.Thread | None = None):
        self.proc, self.request_id, self.bootstrap, self.log_path = proc, request_id, bootstrap, log_path
        self.pump = pump
        self.started = time.time()

    def finished(self) -> bool:
        if self.proc.poll() is None:
            return False
        if self.pump is not None:
            # Its last lines (the error ``tail`` shows) reach the file first; waited for once (a process it
            # left behind could hold the pipe open).
            self.pump.join(10)
            self.pump = None
        return True

    @property
    def code(self) -> int | None:
        return self.proc.returncode

    def tail(self, n: int = 6) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, grace_s: float) -> None:
        """SIGTERM (it writes a checkpoint first), then SIGKILL after ``grace_s``."""
        if self.finished():
            return
        log.info("stopping the age-up worker (it writes a checkpoint first; up to %.0f s)", grace_s)
        self.proc.terminate()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("the worker did not stop in time; killing it (it resumes from its last checkpoint)")
            self.proc.kill()
            self.proc.wait()


def describe_exit(code: int) -> str:
    return {EXIT_OK: "finished", EXIT_INTERRUPTED: "stopped at a checkpoint (it resumes later)",
            EXIT_PAUSED: "found age-ups paused"}.get(code, f"failed with exit code {code}")


def start(root: DataRoot, cfg: AgeUpConfig, dcfg: DaemonConfig, base: Path | None, request_id: int | None,
          bootstrap: bool, retrieval: RetrievalConfig | None = None) -> Worker:
    """Start ``python -m evolution.worker`` for one age-up (or the generation-0 bootstrap); ``retrieval``: the
    lineage's settings, for the gate's figure with retrieval."""
    cfg_file = root.logs / "worker-config.json"
    root.logs.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg_file, cfg.to_dict(), sync_dir=False)
    cmd = [sys.executable, "-m", "evolution.worker", "--config", str(cfg_file), "--nice",
           str(dcfg.train_nice), "--parent-pid", str(os.getpid())]
    if retrieval is not None:
        retrieval_file = root.logs / "worker-retrieval.json"
        atomic_write_json(retrieval_file, dataclasses.asdict(retrieval), sync_dir=False)
        cmd += ["--retrieval", str(retrieval_file)]
    if base is not None:
        cmd += ["--base", str(base)]
    if bootstrap:
        cmd.append("--bootstrap")
    if dcfg.train_threads:
        cmd += ["--threads", str(dcfg.train_threads)]
    log_path = root.logs / "worker.log"
    env = os.environ | {"EVOLUTION_HOME": str(root.root), "EVOLUTION_LINEAGE": root.lineage}
    proc, pump = spawn_logged(cmd, env, log_path, dcfg.log_max_bytes, dcfg.log_backups)
    log.info("%s started (pid %d, log %s)", "generation 0 bootstrap" if bootstrap else
             f"age-up for request {request_id}", proc.pid, log_path)
    return Worker(proc, request_id, bootstrap, log_path, pump)


def spawn_logged(cmd: list[str], env: dict, log_path: Path, max_bytes: int,
                 backups: int) -> tuple[subprocess.Popen, threading.Thread]:
    """Start ``cmd`` with its stdout and stderr copied, line by line, into the size-rotated ``log_path``."""
    handler = logsetup.rotating_file(log_path, max_bytes, backups, fmt=None)
    handler.emit(_record(f"\n=== {datetime.now().isoformat(timespec='seconds')} {' '.join(cmd[1:])}"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def pump() -> None:
        try:
            for line in iter(lambda: proc.stdout.readline(65_536), b""):  # a line without end is cut, not held
                handler.emit(_record(line.decode("utf-8", "replace").rstrip("\n")))
        finally:
            proc.stdout.close()
            handler.close()

    t = threading.Thread(target=pump, name=f"worker-log-{proc.pid}", daemon=True)
    t.start()
    return proc, t


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("evolution.worker", logging.INFO, __file__, 0, msg, None, None)
