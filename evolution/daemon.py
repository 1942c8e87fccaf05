"""The daemon: serve the current generation, watch karma, age up in the background, swap safely.

``python run_daemon.py --start-gen 0`` runs ``main``. The pieces:

- an HTTP server (uvicorn + ``evolution.server``) in the main thread, answering from
  ``ModelHost`` — never blocked by training;
- an APScheduler ``BackgroundScheduler`` whose ``tick`` job, every ``poll_seconds`` (and at once
  when karma crosses the threshold), starts an age-up worker process for an open karma
  request, collects a finished one (promoting a passing child through the hot-swap), and
  follows rollbacks made with `evolve rollback` while the daemon runs;
- the age-up worker (``evolution.worker``), a child process at lower CPU priority.

Crash safety: the ledger says which generation is served; at start the daemon verifies that
generation's GGUF against it and serves it, records what a crash left unrecorded
(``ageup.reconcile``), turns a request left ``running`` back to ``pending`` and resumes it —
the age-up continues from its last completed stage or checkpoint. Generations are built in
``gen_NNNN.partial/`` and only a complete, gated, loaded and canary-tested child is recorded as
promoted. SIGTERM: uvicorn stops accepting and drains open requests; the worker writes a
checkpoint and exits; the daemon exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from evolution import ageup, faults, progress
from evolution import curriculum as curriculum_mod
from evolution.config import AgeUpConfig, DaemonConfig
from evolution.conversations import ConversationStore
from evolution.errors import ConfigError, EvolutionError, GenerationError
from evolution.fsutil import (
    atomic_write_json,
    atomic_write_text,
    free_space,
    nearly_full,
)
from evolution.karma import DONE, FAILED, PENDING, RUNNING, Karma
from evolution.ledger import Ledger, check_servable
from evolution.ledger import events as ev
from evolution.ledger import rollback as record_rollback
from evolution.paths import DataRoot
from evolution.serving import LoadError, ModelHost
from evolution.worker import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PAUSED

log = logging.getLogger(__name__)

TOKEN_ENV = "EVOLUTION_API_TOKEN"
TOKEN_FILE = "daemon.token"
INFO_FILE = "daemon.json"


def daemon_info(root: DataRoot) -> dict | None:
    """What the last daemon started on this data root wrote about itself (address, threshold)."""
    try:
        return json.loads((root.root / INFO_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def _token(root: DataRoot, dcfg: DaemonConfig) -> tuple[str, str]:
    if dcfg.api_token:
        return dcfg.api_token, "the config's daemon.api_token"
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV], f"${TOKEN_ENV}"
    f = root.root / TOKEN_FILE
    if not f.is_file():
        atomic_write_text(f, secrets.token_urlsafe(32) + "\n")
        f.chmod(0o600)
        log.info("generated an API token for write endpoints in %s", f)
    return f.read_text().strip(), str(f)


class Worker:
    """One running age-up worker process."""

    def __init__(self, proc: subprocess.Popen, request_id: int | None, bootstrap: bool, log_path: Path):
        self.proc, self.request_id, self.bootstrap, self.log_path = proc, request_id, bootstrap, log_path
        self.started = time.time()

    def tail(self, n: int = 6) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


class Daemon:
    def __init__(self, root: DataRoot, cfg: AgeUpConfig, dcfg: DaemonConfig, base: Path | None = None,
                 start_gen: int | None = None):
        self.root, self.cfg, self.dcfg, self.base, self.start_gen = root, cfg, dcfg, base, start_gen
        self.ledger: Ledger | None = None
        self.host = ModelHost(dcfg.n_ctx, dcfg.chat_threads, dcfg.canary_prompt, dcfg.canary_max_tokens)
        self.worker: Worker | None = None
        self.stats = {"requests": 0, "completions": 0, "rejected": 0, "errors": 0}
        self.started = time.time()
        self.last_error: str | None = None
        self._swap_mutex = threading.Lock()
        self._tick_mutex = threading.Lock()
        self._stopping = threading.Event()
        self.scheduler = None
        self.token, self.token_source = "", ""
        self.port = dcfg.port

    # -- start -------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything that can fail at start, checked before the server listens."""
        self.root.prepare()
        curriculum_mod.load(self.cfg.curriculum.path, self.cfg.curriculum.phases)  # CurriculumError with file:line
        self.ledger = Ledger.open(self.root)
        self.karma = Karma(self.ledger, self.dcfg.threshold, self.dcfg.threshold_growth)
        self.store = ConversationStore(self.ledger)
        self.token, self.token_source = _token(self.root, self.dcfg)
        decided = ageup.reconcile(self.root, self.ledger, self.cfg.gate.stop_after, promote=self._promote)
        served = self.ledger.served_generation()
        if served is None:
            if self.start_gen not in (None, 0):
                raise ConfigError([f"--start-gen {self.start_gen}: the ledger at {self.ledger.url} has no "
                                   "generations yet; start a new lineage with --start-gen 0"])
            if self.base is None:
                from evolution import base as base_model

                base_model.embedded_gguf()  # BaseModelError (how to install it) if it is missing
            log.info("no generation yet: building generation 0 in the background")
        else:
            if self.start_gen is not None and self.start_gen != served:
                self.ledger.generation(self.start_gen)  # UnknownGeneration if it does not exist
                log.warning("--start-gen %d: the lineage already serves generation %d and continues from it; "
                            "`evolve rollback --to %d` serves generation %d instead", self.start_gen, served,
                            self.start_gen, self.start_gen)
            self._serve(served)
        for r in self.karma.requests():
            if r.status != RUNNING:
                continue
            if decided and decided[-1] > 0:  # it had built its child, which was only not recorded yet: done now
                log.warning("age-up request %d was running when the daemon stopped; its generation %d was finished "
                            "and is now recorded", r.id, decided[-1])
                self.karma.mark(r.id, DONE, decided[-1], self._outcome(decided[-1]))
            else:  # run it again (the age-up resumes)
                log.warning("age-up request %d was running when the daemon stopped; resuming it", r.id)
                self.karma.mark(r.id, PENDING)
        self._write_info()

    def _write_info(self) -> None:
        atomic_write_json(self.root.root / INFO_FILE, {
            "pid": os.getpid(), "host": self.dcfg.host, "port": self.port, "threshold": self.dcfg.threshold,
            "threshold_growth": self.dcfg.threshold_growth, "started": self.started,
        })

    def _serve(self, gen: int) -> None:
        """Load generation ``gen`` as the ledger recorded it and swap it in (raises if it cannot be)."""
        gguf = check_servable(self.ledger, gen)
        with self._swap_mutex:
            if self.host.current is not None and self.host.current.gen == gen:
                return
            slot = self.host.load(gen, self.root.root / gguf["path"], gguf["sha256"])
            self.host.swap(slot)

    def _promote(self, summary: "ageup.GenerationSummary") -> None:
        """Promote hook of the age-up: load the gated child beside the parent, verify, canary, swap.

        Called only from ``ageup.reconcile``, which has checked the ledger's history first."""
        gen = summary.gen
        arts = [a for e in self.ledger.entries(gen=gen, kind=ev.EXPORTED) for a in e.payload["artifacts"]
                if a.get("kind") == "gguf"]
        if not arts:
            raise GenerationError(f"generation {gen} has no exported GGUF in the ledger")
        with self._swap_mutex:
            slot = self.host.load(gen, self.root.root / arts[-1]["path"], arts[-1]["sha256"])
            self.host.swap(slot)
            faults.point("swap")  # swapped in, not yet recorded as promoted (the caller records it)

    # -- karma and rollback (called by the HTTP handlers) -----------------------------------

    def add_karma(self, amount, reason: str, key: str | None):
        served = self.host.current.gen if self.host.current else None
        grant = self.karma.add(amount, reason, key, source="http", served_gen=served)
        if grant.triggered is not None:
            log.info("karma %.6g crossed the threshold %.6g: age-up request %d", grant.state.total,
                     grant.triggered.threshold, grant.triggered.id)
            self.wake()
        return grant

    def rollback(self, to: int, reason: str):
        """Load and check generation ``to`` first, then record the rollback, then swap."""
        with self._swap_mutex:
            gguf = check_servable(self.ledger, to)
            current = self.host.current.gen if self.host.current else None
            if current == to and self.ledger.served_generation() == to:
                from evolution.errors import LedgerError

                raise LedgerError(f"generation {to} is already the served generation; nothing to roll back")
            slot = self.host.load(to, self.root.root / gguf["path"], gguf["sha256"])
            try:
                faults.point("swap")  # loaded, not yet recorded as rolled back
                entry = record_rollback(self.ledger, to, reason)
            except BaseException:
                slot.close()
                raise
            self.host.swap(slot)
            return entry

    # -- the scheduler's job -----------------------------------------------------------------

    def wake(self) -> None:
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.modify_job("tick", next_run_time=datetime.now(self.scheduler.timezone))

    def tick(self) -> None:
        if not self._tick_mutex.acquire(blocking=False):
            return
        try:
            self._collect_worker()
            if self._stopping.is_set():
                return
            self._follow_ledger()
            if self.worker is None:
                self._maybe_start_worker()
        except Exception as exc:  # the scheduler must keep running; the error is shown in /status
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("scheduler tick failed")
        finally:
            self._tick_mutex.release()

    def _follow_ledger(self) -> None:
        """Serve what the ledger names (a rollback made with `evolve rollback` while we run)."""
        served = self.ledger.served_generation()
        current = self.host.current.gen if self.host.current else None
        if served is None or served == current or self.worker is not None and self.worker.bootstrap:
            return
        try:
            self._serve(served)
        except (EvolutionError, LoadError) as exc:
            log.error("the ledger names generation %d but it cannot be served (%s); staying on %s", served, exc,
                      current)
            if current is not None:
                self.ledger.record(ev.rolled_back(served, current, f"generation {served} could not be served: {exc}"))

    def _maybe_start_worker(self) -> None:
        if self.ledger.served_generation() is None:
            self._start_worker(None, bootstrap=True)
            return
        if ageup.paused_reason(self.ledger):
            return
        req = self.karma.state().open_request
        if req is None and self.root.partial_generations():
            return  # an interrupted age-up with no request (a manual one): `evolve age-up` resumes it
        if req is not None and (req.not_before or 0) <= time.time():
            self.karma.mark(req.id, RUNNING)
            self._start_worker(req.id, bootstrap=False)

    def _start_worker(self, request_id: int | None, bootstrap: bool) -> None:
        cfg_file = self.root.logs / "worker-config.json"
        self.root.logs.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cfg_file, self.cfg.to_dict(), sync_dir=False)
        cmd = [sys.executable, "-m", "evolution.worker", "--config", str(cfg_file), "--nice",
               str(self.dcfg.train_nice), "--parent-pid", str(os.getpid())]
        if self.base is not None:
            cmd += ["--base", str(self.base)]
        if bootstrap:
            cmd.append("--bootstrap")
        if self.dcfg.train_threads:
            cmd += ["--threads", str(self.dcfg.train_threads)]
        log_path = self.root.logs / "worker.log"
        with open(log_path, "ab") as out:
            out.write(f"\n=== {datetime.now().isoformat(timespec='seconds')} {' '.join(cmd[1:])}\n".encode())
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=os.environ | {"EVOLUTION_HOME": str(self.root.root)})
        self.worker = Worker(proc, request_id, bootstrap, log_path)
        log.info("%s started (pid %d, log %s)", "generation 0 bootstrap" if bootstrap else
                 f"age-up for request {request_id}", proc.pid, log_path)

    def _collect_worker(self) -> None:
        w = self.worker
        if w is None or w.proc.poll() is None:
            return
        self.worker = None
        code = w.proc.returncode
        what = {EXIT_OK: "finished", EXIT_INTERRUPTED: "stopped at a checkpoint (it resumes later)",
                EXIT_PAUSED: "found age-ups paused"}.get(code, f"failed with exit code {code}")
        log.info("age-up worker %s after %.0f s", what, time.time() - w.started)
        if code == EXIT_INTERRUPTED or self._stopping.is_set():
            if w.request_id is not None:
                self.karma.mark(w.request_id, PENDING)  # resumed at the next start
            return
        decided = []
        try:
            decided = ageup.reconcile(self.root, self.ledger, self.cfg.gate.stop_after, promote=self._promote)
        except EvolutionError as exc:
            code, self.last_error = EXIT_FAILED, str(exc)
        if w.bootstrap:
            if code != EXIT_OK or self.ledger.served_generation() is None:
                self.last_error = f"building generation 0 failed (exit {code}): {w.tail()}"
                log.error("%s", self.last_error)
                return
            self._serve(self.ledger.served_generation())
            return
        if w.request_id is None:
            return
        if code == EXIT_OK or decided:  # decided: it built its child, then died or failed (a full disk) to record it
            gen = decided[-1] if decided else None
            outcome = self._outcome(gen)
            self.karma.mark(w.request_id, DONE, gen, outcome)
            log.info("age-up request %d: %s", w.request_id, outcome)
            served = self.host.current.gen if self.host.current else None
            self.karma.maybe_trigger(served)
        elif code == EXIT_PAUSED:  # waits, queued, until a person runs `evolve resume`
            self.karma.mark(w.request_id, PENDING, None, f"age-ups are paused: {ageup.paused_reason(self.ledger)}")
        else:
            self.last_error = f"age-up failed (exit {code}): {w.tail()}"
            if "the disk is full" not in self.last_error and nearly_full(self.root.root):
                # The worker's own message may not have fitted on the disk; say it here, last (outcomes keep the end).
                self.last_error += (f"\nthe disk is full: {free_space(self.root.root)}. Free some space there: the "
                                    "age-up is retried on its own and resumes where it stopped")
            log.error("%s", self.last_error)
            req = next(r for r in self.karma.requests() if r.id == w.request_id)
            if req.attempts + 1 < self.dcfg.max_attempts:
                delay = self.dcfg.retry_after_s * 2**req.attempts
                log.warning("retrying age-up request %d in %.0f s (attempt %d of %d); the interrupted generation "
                            "resumes where it stopped", req.id, delay, req.attempts + 2, self.dcfg.max_attempts)
                self.karma.retry_later(req.id, delay, self.last_error[-500:])
            else:
                self.karma.mark(w.request_id, FAILED, None, self.last_error[-500:])

    def _outcome(self, gen: int | None) -> str:
        if gen is None:
            return "finished without a new generation"
        kinds = {e.kind for e in self.ledger.entries(gen=gen)}
        return f"generation {gen} " + ("promoted and served" if ev.PROMOTED in kinds else "rejected")

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict:
        slot = self.host.current
        k = self.karma.state()
        n_conv, last_conv = self.store.count()
        job = progress.read(self.root)
        if job is not None and job.get("state") == "running" and self.worker is None:
            job["state"] = "interrupted"
        return {
            "served": None if slot is None else {"generation": slot.gen, "model": slot.id, "sha256": slot.sha256,
                                                 "loaded_at": slot.loaded_at},
            "ageup": {"running": self.worker is not None, "request": self.worker.request_id if self.worker else None,
                      "progress": job},
            "karma": k.to_dict(),
            "paused": ageup.paused_reason(self.ledger),
            "conversations": {"stored": n_conv, "last_id": last_conv},
            "requests": dict(self.stats),
            "swaps": self.host.swaps,
            "last_swap": self.host.last_swap,
            "last_error": self.last_error,
            "uptime_s": round(time.time() - self.started, 1),
        }

    # -- run ---------------------------------------------------------------------------------

    def start_scheduler(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1,
                                                           "misfire_grace_time": None})
        self.scheduler.add_job(self.tick, "interval", seconds=self.dcfg.poll_seconds, id="tick",
                               next_run_time=datetime.now())
        self.scheduler.start()

    def stop(self) -> None:
        """Stop the scheduler and the worker (checkpointing), then release everything."""
        self._stopping.set()
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        w = self.worker
        if w is not None and w.proc.poll() is None:
            log.info("stopping the age-up worker (it writes a checkpoint first; up to %.0f s)",
                     self.dcfg.shutdown_grace_s)
            w.proc.terminate()
            try:
                w.proc.wait(self.dcfg.shutdown_grace_s)
            except subprocess.TimeoutExpired:
                log.warning("the worker did not stop in time; killing it (it resumes from its last checkpoint)")
                w.proc.kill()
                w.proc.wait()
        if w is not None and self.ledger is not None:
            self._collect_worker()
        self.host.close()
        if self.ledger is not None:
            self.ledger.close()


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for the server, or an error that says what to do.

    ``SO_REUSEADDR`` as uvicorn sets it: a daemon restarted right after it stopped must not be
    refused for the minute its closed connections linger in TIME_WAIT. A port another process
    is listening on is still refused.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise EvolutionError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another port with --port "
                             "(another daemon may be running: `evolve status`)") from None
    return sock


def run(daemon: Daemon) -> int:
    """Prepare, then serve until SIGTERM / SIGINT; return the exit code."""
    import uvicorn

    from evolution.server import create_app

    d = daemon.dcfg
    sock = listen_socket(d.host, d.port)
    daemon.port = sock.getsockname()[1]
    try:
        daemon.prepare()
    except BaseException:
        sock.close()
        raise
    app = create_app(daemon)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=60,
                                           limit_concurrency=256, access_log=False))
    daemon.start_scheduler()
    log.info("serving on http://%s:%d (OpenAI base_url http://%s:%d/v1); write endpoints need the token in %s",
             d.host, daemon.port, d.host, daemon.port, daemon.token_source)
    # uvicorn handles SIGTERM/SIGINT (stop accepting, drain open requests) and re-raises the signal
    # to the handler that was installed before it once it is done: ours, so the exit stays clean.
    stopped_by: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopped_by.append(signum))
    try:
        server.run(sockets=[sock])
    finally:
        daemon.stop()
    log.info("stopped cleanly")
    return 0
