"""The daemon's core: which generation is served, when an age-up runs, and what its end means.

``Daemon`` owns the served model (``ModelHost``), the ledger, the user's data (``intake``:
karma, conversations, experiences, probes, which the HTTP layer reads and adds to directly),
and an APScheduler ``BackgroundScheduler`` whose ``tick`` job, every ``poll_seconds`` (and at
once when karma crosses the threshold), starts an age-up worker for an open karma request,
collects a finished one (its child decided through ``evolution.promotion`` with the hot-swap
as the swap), and follows rollbacks made with `evolve rollback` while the daemon runs. The HTTP
layer (``evolution.server``) reaches it only through what its ``Service`` protocol names: what may
start an age-up (a karma grant, a rating with karma) goes through the daemon, which wakes its
scheduler; ``/status`` is ``evolution.status.read`` with the daemon's ``Live`` part.

Crash safety: the ledger says which generation is served; at start the daemon verifies that
generation's GGUF against it and serves it, records and decides what a crash left undecided
(``promotion.reconcile``), turns a request left ``running`` back to ``pending`` and resumes it —
the age-up continues from its last completed stage or checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

from evolution import curriculum as curriculum_mod
from evolution import faults, promotion, retention, staleness, status, tasks
from evolution.config import AgeUpConfig, DaemonConfig, RetentionConfig, RetrievalConfig, StalenessConfig
from evolution.daemon import identity, workers
from evolution.errors import ConfigError, EvolutionError, IntegrityError, LedgerError, LoadError, NotReady
from evolution.fsutil import free_space, nearly_full
from evolution.generation import GenerationSummary
from evolution.intake import Intake
from evolution.intake.karma import DONE, FAILED, PENDING, RUNNING
from evolution.ledger import Ledger, check_servable, record_rollback
from evolution.ledger.rollback import is_servable
from evolution.ledger.rollback import check_target
from evolution.ledger import events as ev
from evolution.paths import DataRoot
from evolution.retrieval import Retrieval, with_notes
from evolution.serving import ModelHost, OlderGenerations, Slot, Stream, answered_by, task_id

log = logging.getLogger(__name__)

PROMOTED, REJECTED, FAILED_AGEUP = "promoted", "rejected", "failed"
AGEUP_OUTCOMES = (PROMOTED, REJECTED, FAILED_AGEUP)
"""How an age-up this daemon ran ended, as /metrics counts them (an interrupted one is resumed, not counted)."""


class Daemon:
    def __init__(self, root: DataRoot, cfg: AgeUpConfig, dcfg: DaemonConfig, base: Path | None = None,
                 start_gen: int | None = None, retention_cfg: RetentionConfig | None = None,
                 retrieval_cfg: RetrievalConfig | None = None, staleness_cfg: StalenessConfig | None = None):
        self.root, self.cfg, self.dcfg, self.base, self.start_gen = root, cfg, dcfg, base, start_gen
        self.retention_cfg = retention_cfg or RetentionConfig()
        self.retrieval_cfg = retrieval_cfg or RetrievalConfig()
        self.staleness_cfg = staleness_cfg or StalenessConfig()
        self.ledger: Ledger | None = None
        self.intake: Intake | None = None
        self.retrieval: Retrieval | None = None
        self.host = ModelHost(dcfg.n_ctx, dcfg.chat_threads, dcfg.canary_prompt, dcfg.canary_max_tokens,
                              lineage=root.lineage)
        self.older = OlderGenerations(self.host.sibling, dcfg.older_max, dcfg.older_memory_mb)
        self.worker: workers.Worker | None = None
        self.started = time.time()
        self.last_error: str | None = None
        self._swap_mutex = threading.Lock()
        self._tick_mutex = threading.Lock()
        self._stopping = threading.Event()
        self.scheduler = None
        self.token, self.token_source = "", ""
        self.port = dcfg.port
        self._claim = None  # identity.claim's lock on the data root, held from prepare() to stop()
        # For GET /metrics: counts since this process started (Prometheus counters start at 0 with it).
        self._tally_lock = threading.Lock()
        self._tally: Counter[str] = Counter()
        self._stage_seconds: dict[str, list[float]] = {}  # stage -> [age-ups that ran it, seconds in all]
        self._last_stage_seconds: dict[str, float] = {}

    # -- start -------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything that can fail at start, checked before the server listens."""
        self.root.prepare()
        self._claim = self._claim or identity.claim(self.root)  # before anything is read or written
        curriculum_mod.load(self.cfg.curriculum.path, self.cfg.curriculum.phases)  # CurriculumError with file:line
        if self.staleness_cfg.enabled:
            staleness.check_sources(self.root, self.staleness_cfg)
        self.ledger = Ledger.open(self.root)
        self.intake = Intake(self.ledger, self.dcfg.threshold, self.dcfg.threshold_growth, self.dcfg.capture_max)
        self.retrieval = Retrieval(self.root, self.ledger, self.intake, self.retrieval_cfg)
        karma = self.intake.karma
        if not self.token:  # a lineage served beside the first one was handed its token (entry.run)
            self.token, self.token_source = identity.api_token(self.root, self.dcfg)
        decided = promotion.reconcile(self.root, self.ledger, self.cfg.gate.stop_after, swap=self._swap_in)
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
            if self.dcfg.idle_unload_s:  # loaded on first use; checked now, so a bad start is said at once
                check_servable(self.ledger, served)
            else:
                self._serve(served)
        for r in karma.requests():
            if r.status != RUNNING:
                continue
            if decided and decided[-1] > 0:  # it had built its child, which was only not recorded yet: done now
                log.warning("age-up request %d was running when the daemon stopped; its generation %d was finished "
                            "and is now recorded", r.id, decided[-1])
                karma.mark(r.id, DONE, decided[-1], self._outcome(decided[-1]))
            else:  # run it again (the age-up resumes)
                log.warning("age-up request %d was running when the daemon stopped; resuming it", r.id)
                karma.mark(r.id, PENDING)
        self.retrieval.sync(self.ledger.served_generation())  # built (or checked) before the first chat
        identity.write_info(self.root, self.dcfg, self.port, self.started)

    def _serve(self, gen: int) -> None:
        """Load generation ``gen`` as the ledger recorded it and swap it in (raises if it cannot be)."""
        gguf = check_servable(self.ledger, gen)  # at start: a changed file is named with what to do
        with self._swap_mutex:
            if self.host.current is not None and self.host.current.gen == gen:
                return
            self.host.swap(self._load(gen, gguf))

    def _load(self, gen: int, gguf: dict) -> Slot:
        """Generation ``gen`` loaded from ``gguf`` (the ledger's record, hashed as it loads), with the adapters of the
        tasks of ``[tasks]`` that passed their gate on it (``evolution.tasks``): a slot ready to swap in. An adapter
        that does not hash right or load is left out, and its task's requests say why; the generation serves."""
        slot = self.host.load(gen, self.root.root / gguf["path"], gguf["sha256"])
        if not self.cfg.tasks.names:
            return slot
        try:
            for task, art in tasks.served_adapters(self.ledger, gen).items():
                if task not in self.cfg.tasks.names:
                    continue
                try:
                    self.host.load_adapter(slot, task, self.root.root / art["path"], art["sha256"])
                except (IntegrityError, LoadError) as exc:
                    slot.task_errors[task] = str(exc)
                    log.error("generation %d serves without its %r adapter: %s", gen, task, exc)
        except BaseException:
            slot.close()
            raise
        return slot

    def _swap_in(self, gen: int, gguf: dict | None) -> None:
        """The swap ``promotion`` is given: load the gated child beside the parent, verify, canary, swap.

        ``promotion.reconcile`` has checked the ledger's history before it calls this."""
        if gguf is None:
            raise LedgerError(f"generation {gen} has no exported GGUF in the ledger; it cannot be served")
        with self._swap_mutex:
            self.host.swap(self._load(gen, gguf))
            faults.point("swap")  # swapped in, not yet recorded as promoted (promotion records it)

    # -- the HTTP layer's ``Service`` ----------------------------------------------------------

    def served(self) -> Slot | None:
        return self.host.current

    def notes(self, args: dict, retrieve: bool) -> list:
        """The lessons retrieval adds to this chat's prompt (none where the request or the lineage opts out)."""
        return self.retrieval.notes_for(args["messages"]) if retrieve and self.retrieval is not None else []

    @staticmethod
    def _prompted(args: dict, notes: list) -> dict:
        return args | {"messages": with_notes(args["messages"], notes)} if notes else args

    def chat(self, args: dict, notes: list = (), gen: int | None = None, task: str | None = None) -> tuple[dict, Slot]:
        """One chat completion from the served model (or from gated generation ``gen``, asked by name; with task
        ``task``'s adapters applied), with ``notes`` in its prompt, and the generation that answered it
        (``ValueError`` when it cannot fit even without the notes)."""
        def run(slot: Slot) -> tuple[dict, Slot]:
            asked = self._adapted(args, slot, task)
            try:
                out = slot.model.chat(self._prompted(asked, notes))
            except ValueError:  # the notes pushed it past the context window: the question alone
                if not notes:
                    raise
                out = slot.model.chat(asked)
            out["model"] = answered_by(slot, task)
            return out, slot

        return self._on(gen, lambda host: host.call(run))

    def stream(self, args: dict, notes: list = (), gen: int | None = None, task: str | None = None) -> Stream:
        try:
            return self._on(gen, lambda host: host.stream(
                lambda slot: slot.model.stream(self._prompted(self._adapted(args, slot, task), notes))))
        except ValueError:
            if not notes:
                raise
            return self._on(gen, lambda host: host.stream(
                lambda slot: slot.model.stream(self._adapted(args, slot, task))))

    def _adapted(self, args: dict, slot: Slot, task: str | None) -> dict:
        """``args`` with the adapters of ``task``'s stack (``[tasks] stacks``) that ``slot``'s generation has; a task
        with none yet is answered by the generation alone (its chats are what trains its first adapter)."""
        if task is None:
            return args
        return args | {"adapters": [n for n in self.cfg.tasks.stack(task) if n in slot.tasks]}

    def task_models(self) -> list[dict]:
        """The OpenAI model object of each task of ``[tasks]`` (``evolution:TASK``): the served generation and the
        adapters it applies for the task (none yet: the generation alone answers)."""
        slot = self.host.current
        out = []
        for task in self.cfg.tasks.names:
            stack = self.cfg.tasks.stack(task)
            have = [{"task": n, "sha256": slot.tasks[n]} for n in stack if slot is not None and n in slot.tasks]
            out.append({"id": task_id(task, self.root.lineage), "object": "model",
                        "created": int(slot.loaded_at) if slot is not None else 0, "owned_by": "evolution",
                        "generation": slot.gen if slot is not None else None, "task": task, "adapters": have}
                       | ({"error": problem} if (problem := self.task_problem(task)) else {}))
        return out

    def task_problem(self, task: str) -> str | None:
        """Why a request to ``task`` cannot be answered now (its adapter failed to load), else None."""
        slot = self.host.current
        broken = [n for n in self.cfg.tasks.stack(task) if slot is not None and n in slot.task_errors]
        return slot.task_errors[broken[0]] if broken else None

    def _on(self, gen: int | None, call):
        """``call(host)`` on the host of the served generation, or of gated generation ``gen`` asked by name."""
        current = self.host.current
        served = current.gen if current is not None else \
            self.ledger.served_generation() if self.dcfg.idle_unload_s else None  # unloaded for idling
        if gen is None or gen == served:
            return self._loaded(lambda: call(self.host))
        for _ in range(2):  # let go of between finding and using it (another was loaded): load it again
            try:
                return call(self.older_host(gen))
            except NotReady:
                continue
        return call(self.older_host(gen))

    def older_generations(self) -> list[dict]:
        """Every generation that may be asked by name (``generation``, ``created`` as Unix time, ``sha256``): passed
        its gate (or 0) and kept (``servable``)."""
        if not self.dcfg.older_max:
            return []
        return [{"generation": r.gen, "sha256": r.gguf_sha256,
                 "created": int(datetime.fromisoformat(r.created).timestamp()) if r.created else 0}
                for r in self.ledger.history() if is_servable(r)]

    def older_host(self, gen: int) -> ModelHost:
        """The loaded host of gated generation ``gen`` (not the served one): loaded on first use, checked against
        the ledger like a rollback target. ``LedgerError`` (unknown, rejected, pruned, missing), ``IntegrityError``
        or ``LoadError``; what is served is never changed."""
        if self.dcfg.older_max == 0:
            raise LedgerError("asking a generation by name is off here ([daemon] older_max = 0); omit the '@N'")
        host = self.older.get(gen)
        if host is not None:
            return host
        gguf = check_servable(self.ledger, gen, hash_file=False)  # the host hashes it as it loads it
        return self.older.load(gen, self.root.root / gguf["path"], gguf["sha256"])

    def _loaded(self, call):
        """``call()`` on the host, loading the served generation first when it was unloaded for idling
        (``idle_unload_s``); an unload between the load and the call loads it again, so no request drops."""
        for _ in range(3):
            if self.dcfg.idle_unload_s and self.host.current is None:
                served = self.ledger.served_generation()
                if served is not None and not (self.worker is not None and self.worker.bootstrap):
                    self._serve(served)
            try:
                return call()
            except NotReady:
                if not self.dcfg.idle_unload_s:
                    raise
        return call()

    def capture(self, messages: list[dict], reply: str, completion_id: str, slot: Slot, finish_reason: str | None,
                cut_off: bool = False, task: str | None = None) -> None:
        """Keep a served chat as an experience (task ``task``'s, where it was asked of one); never raises (a failure
        is counted in /status)."""
        kept = self.intake.experiences.capture_safely(messages, reply, completion_id, answered_by(slot, task),
                                                      slot.sha256, slot.gen, finish_reason, cut_off, task)
        if kept is not None:
            with self._tally_lock:
                self._tally["captures_written"] += 1

    def rate(self, item_id, label, correction, karma, key: str | None, by: str):
        served = self.host.current.gen if self.host.current else None
        rating = self.intake.experiences.rate(item_id, label, correction, karma, key, by=by, served_gen=served)
        self.retrieval.sync(self.ledger.served_generation())  # the next chat has the lesson
        if rating.triggered is not None:
            log.info("feedback karma crossed the threshold: age-up request %d", rating.triggered.id)
            self.wake()
        return rating

    def add_conversation(self, messages, key: str | None, label: str | None, task: str | None = None):
        stored = self.intake.conversations.add(messages, key, label, task)
        self.retrieval.sync(self.ledger.served_generation())  # the next chat has what it said
        return stored

    def add_karma(self, amount, reason: str, key: str | None):
        served = self.host.current.gen if self.host.current else None
        grant = self.intake.karma.add(amount, reason, key, source="http", served_gen=served)
        if grant.triggered is not None:
            log.info("karma %.6g crossed the threshold %.6g: age-up request %d", grant.state.total,
                     grant.triggered.threshold, grant.triggered.id)
            self.wake()
        return grant

    def rollback(self, to: int, reason: str):
        """Load and check generation ``to`` first, then record the rollback, then swap.

        The chain is checked once (``check_servable``) and the GGUF hashed once, as it is loaded."""
        with self._swap_mutex:
            gguf = check_servable(self.ledger, to, hash_file=False)  # the chain first: a changed ledger says so
            check_target(self.ledger, to, self.ledger.served_generation())
            slot = self._load(to, gguf)
            try:
                faults.point("swap")  # loaded, not yet recorded as rolled back
                entry = record_rollback(self.ledger, to, reason, gguf)
            except BaseException:
                slot.close()
                raise
            self.host.swap(slot)
            return entry

    def resume(self, reason: str):
        """Lift the stop rule, as `evolve resume` does; the next tick starts a queued age-up."""
        if promotion.paused_reason(self.ledger) is None:
            raise LedgerError("age-ups are not paused; nothing to resume")
        entry = self.ledger.record(ev.ageups_resumed(reason))
        log.info("age-ups resumed over HTTP (ledger seq %d): %s", entry.seq, reason)
        self.wake()
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
            self.retrieval.sync(self.ledger.served_generation())  # a swap's hand-over; an index lost or changed
            if self.worker is None:
                self._maybe_start_worker()
            if self.dcfg.idle_unload_s:
                with self._swap_mutex:
                    self.host.unload_if_idle(self.dcfg.idle_unload_s)
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
        if current is None and self.dcfg.idle_unload_s:
            return  # unloaded while idle: the next request loads what the ledger names
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
        if promotion.paused_reason(self.ledger):
            return
        req = self.intake.karma.state().open_request
        if req is None and self.root.partial_generations():
            return  # an interrupted age-up with no request (a manual one): `evolve age-up` resumes it
        if req is not None and (req.not_before or 0) <= time.time():
            self.intake.karma.mark(req.id, RUNNING)
            self._start_worker(req.id, bootstrap=False)

    def _start_worker(self, request_id: int | None, bootstrap: bool) -> None:
        self.worker = workers.start(self.root, self.cfg, self.dcfg, self.base, request_id, bootstrap,
                                    self.retrieval_cfg)

    def _collect_worker(self) -> None:
        w = self.worker
        if w is None or not w.finished():
            return
        self.worker = None
        code = w.code
        log.info("age-up worker %s after %.0f s", workers.describe_exit(code), time.time() - w.started)
        karma = self.intake.karma
        if code == workers.EXIT_INTERRUPTED or self._stopping.is_set():
            if w.request_id is not None:
                karma.mark(w.request_id, PENDING)  # resumed at the next start
            return
        decided = []
        try:
            decided = promotion.reconcile(self.root, self.ledger, self.cfg.gate.stop_after, swap=self._swap_in)
        except EvolutionError as exc:
            code, self.last_error = workers.EXIT_FAILED, str(exc)
        if w.bootstrap:
            if code != workers.EXIT_OK or self.ledger.served_generation() is None:
                self.last_error = f"building generation 0 failed (exit {code}): {w.tail()}"
                log.error("%s", self.last_error)
                return
            self._serve(self.ledger.served_generation())
            return
        if w.request_id is None:
            return
        if code == workers.EXIT_OK or decided:  # decided: it built its child, then died or failed (a full disk) to record it
            gen = decided[-1] if decided else None
            outcome = self._outcome(gen)
            if gen is not None:
                promoted = ev.PROMOTED in {e.kind for e in self.ledger.entries(gen=gen)}
                self._count_ageup(PROMOTED if promoted else REJECTED, gen)
                if self.retention_cfg.after_promotion:  # a rejected child's 674 MB too, not at the next promotion
                    self._prune()
            karma.mark(w.request_id, DONE, gen, outcome)
            log.info("age-up request %d: %s", w.request_id, outcome)
            served = self.host.current.gen if self.host.current else None
            karma.maybe_trigger(served)
        elif code == workers.EXIT_PAUSED:  # waits, queued, until a person runs `evolve resume`
            karma.mark(w.request_id, PENDING, None,
                            f"age-ups are paused: {promotion.paused_reason(self.ledger)}")
        else:
            self.last_error = f"age-up failed (exit {code}): {w.tail()}"
            if "the disk is full" not in self.last_error and nearly_full(self.root.root):
                # The worker's own message may not have fitted on the disk; say it here, last (outcomes keep the end).
                self.last_error += (f"\nthe disk is full: {free_space(self.root.root)}. Free some space there: the "
                                    "age-up is retried on its own and resumes where it stopped")
            log.error("%s", self.last_error)
            self._count_ageup(FAILED_AGEUP, None)
            req = next(r for r in karma.requests() if r.id == w.request_id)
            if req.attempts + 1 < self.dcfg.max_attempts:
                delay = self.dcfg.retry_after_s * 2**req.attempts
                log.warning("retrying age-up request %d in %.0f s (attempt %d of %d); the interrupted generation "
                            "resumes where it stopped", req.id, delay, req.attempts + 2, self.dcfg.max_attempts)
                karma.retry_later(req.id, delay, self.last_error[-500:])
            else:
                karma.mark(w.request_id, FAILED, None, self.last_error[-500:])

    def _prune(self) -> None:
        """Apply the retention policy after an age-up was decided (promoted or rejected); a prune that fails is
        logged, never fatal (it is recorded before it deletes, so the next one finishes it)."""
        try:
            p = retention.prune(self.root, self.ledger, self.retention_cfg)
        except (EvolutionError, OSError) as exc:
            log.warning("pruning after the promotion failed: %s", exc)
            return
        if p.deletions:
            log.info("pruned %d generation(s)' files (%.0f MB); kept %s", len(p.deletions), p.bytes / 1e6,
                     ", ".join(map(str, sorted(p.kept))))

    def _count_ageup(self, outcome: str, gen: int | None) -> None:
        """Count one age-up's end for /metrics, with its generation's stage durations when it built one."""
        seconds: dict[str, float] = {}
        if gen is not None:
            try:
                seconds = GenerationSummary.load(self.root.gen_dir(gen)).stage_seconds
            except (OSError, ValueError, TypeError, KeyError) as exc:  # counted all the same; only its timing is missing
                log.warning("no stage durations for generation %d: %s", gen, exc)
        with self._tally_lock:
            self._tally[f"ageups_{outcome}"] += 1
            for stage, secs in seconds.items():
                c = self._stage_seconds.setdefault(stage, [0, 0.0])
                c[0] += 1
                c[1] += secs
            if seconds:
                self._last_stage_seconds = dict(seconds)

    def _outcome(self, gen: int | None) -> str:
        if gen is None:
            return "finished without a new generation"
        kinds = {e.kind for e in self.ledger.entries(gen=gen)}
        return f"generation {gen} " + ("promoted and served" if ev.PROMOTED in kinds else "rejected")

    def check_staleness(self, request: bool = True) -> staleness.Drift | None:
        """Measure the served generation's drift and, past ``[staleness] threshold``, request an age-up
        (``evolution.staleness``); None when there is nothing to measure: no generation served, an age-up queued
        or running (its child is about to change what is served), or the model unloaded for idling."""
        served = self.ledger.served_generation()
        if served is None or self.worker is not None or self.intake.karma.state().open_request is not None:
            return None
        if self.dcfg.idle_unload_s and self.host.current is None:
            return None  # unloaded for idling: a check would load it again; the next one runs once it is used

        def ask(question: str) -> str:  # the weights alone: no notes
            out, _ = self.chat({"messages": [{"role": "user", "content": question}], "max_tokens": 48,
                                "temperature": 0.0, "seed": 0})
            return out["choices"][0]["message"].get("content") or ""

        drift = staleness.check(self.root, self.ledger, self.intake, self.staleness_cfg, self.cfg.curriculum.path,
                                served, ask, request=request)
        if drift.requested is not None:
            self.wake()
        return drift

    def _staleness_job(self) -> None:
        try:
            self.check_staleness()
        except Exception as exc:  # the scheduler must keep running; the error is shown in /status
            self.last_error = f"staleness check: {type(exc).__name__}: {exc}"
            log.exception("staleness check failed")

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict:
        """``/status``: ``evolution.status.read`` with what only the running daemon knows."""
        w = self.worker
        return status.read(self.root, self.ledger, self.intake, status.Live(
            self.host.current, w is not None, w.request_id if w else None, self.host.swaps, self.host.last_swap,
            self.last_error, self.started), retrieval=self.retrieval.summary(),
            staleness=staleness.summary(self.root, self.staleness_cfg)) | {"older_loaded": self.older.loaded()}

    def telemetry(self) -> dict:
        """The numbers ``GET /metrics`` shows: counts since this process started, and state read now."""
        slot = self.host.current
        k = self.intake.karma.state()
        with self._tally_lock:
            tally = dict(self._tally)
            stages = {name: (int(c[0]), c[1]) for name, c in self._stage_seconds.items()}
            last = dict(self._last_stage_seconds)
        return {
            "served_generation": None if slot is None else slot.gen,
            "swaps": self.host.swaps,
            "karma": {"total": k.total, "progress": k.progress, "threshold": k.threshold},
            "captures": {"written": tally.get("captures_written", 0), "failed": self.intake.experiences.failures},
            "ageups": {o: tally.get(f"ageups_{o}", 0) for o in AGEUP_OUTCOMES},
            "ageup_running": self.worker is not None,
            "stage_seconds": stages,
            "last_stage_seconds": last,
            "retrieval": self.retrieval.summary(),
            "staleness": staleness.summary(self.root, self.staleness_cfg),
        }

    # -- run ---------------------------------------------------------------------------------

    def start_scheduler(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        self.scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1,
                                                           "misfire_grace_time": None})
        self.scheduler.add_job(self.tick, "interval", seconds=self.dcfg.poll_seconds, id="tick",
                               next_run_time=datetime.now())
        if self.staleness_cfg.enabled:  # the first check one interval after start: generation 0 may be building
            self.scheduler.add_job(self._staleness_job, "interval", seconds=self.staleness_cfg.check_every_s,
                                   id="staleness")
        self.scheduler.start()

    def stop(self) -> None:
        """Stop the scheduler and the worker (checkpointing), then release everything."""
        self._stopping.set()
        if self.scheduler is not None and self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        w = self.worker
        if w is not None:
            w.stop(self.dcfg.shutdown_grace_s)
        if w is not None and self.ledger is not None:
            self._collect_worker()
        self.older.close()  # before the host: they share its llama thread, which closing the host ends
        self.host.close()
        if self.retrieval is not None:
            self.retrieval.close()
        if self.ledger is not None:
            self.ledger.close()
        if self._claim is not None:
            self._claim.release()
            self._claim = None
