"""The age-up orchestrator: parent generation in, exported child generation out.

It only calls the stage modules in order (``curriculum`` → ``replay`` → ``train`` →
``export`` → ``gate``) and records what each did in the lineage ledger (``evolution.ledger``),
which also names the parent: the generation currently served. A generation is built in
``gen_NNNN.partial/`` with a ``state.json`` naming its completed stages; after a crash the next
run resumes there and skips what is done. Only a complete generation is renamed to
``gen_NNNN/`` and made read-only, so a half-written generation never looks finished.

``age_up`` ends when the child is built and its gate result recorded. Whether it is served is
``evolution.promotion``'s to decide, called by whoever asked for the age-up (the CLI, the daemon).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from evolution import base as base_model
from evolution import curriculum as curriculum_mod
from evolution import export, gate, promotion, replay, retention, tasks, train, weights
from evolution import progress as progress_mod
from evolution.config import AgeUpConfig, RetrievalConfig
from evolution.errors import AgeUpsPaused, DiskFull, EvolutionError, GenerationError, IntegrityError
from evolution.export import GGUF_NAME, HF_DIR, Artifact
from evolution.fsutil import (
    atomic_write_json,
    free_space,
    fsync_dir,
    is_disk_full,
    make_tree_read_only,
    make_tree_writable,
    sha256_file,
)
from evolution.generation import GenerationSummary
from evolution.intake import Intake
from evolution.ledger import Ledger, check_servable
from evolution.metrics import answers as answer_book
from evolution.metrics import probe_sample
from evolution.ledger import events as ev
from evolution.paths import DataRoot, gen_name

log = logging.getLogger(__name__)

StageFn = Callable[[str, str], None]
"""stage_cb(stage, 'start' | 'done' | 'skip')"""

@dataclass
class _State:
    """``state.json`` of a generation under construction."""

    path: Path
    gen: int
    parent: int | None
    config: dict
    completed: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def save(self) -> None:
        atomic_write_json(self.path, {k: v for k, v in asdict(self).items() if k != "path"})

    @classmethod
    def load_or_new(cls, path: Path, gen: int, parent: int | None, config: dict) -> tuple["_State", bool]:
        if path.is_file():
            d = json.loads(path.read_text())
            return cls(path=path, **d), True
        return cls(path=path, gen=gen, parent=parent, config=config), False


def _noop(*_a, **_k) -> None:
    return None


def _run(state: _State, name: str, fn: Callable[[], None], stage_cb: StageFn) -> None:
    if name in state.completed:
        stage_cb(name, "skip")
        return
    stage_cb(name, "start")
    t0 = time.perf_counter()
    fn()
    state.seconds[name] = round(time.perf_counter() - t0, 3) + state.seconds.get(name, 0.0)
    state.completed.append(name)
    state.save()
    stage_cb(name, "done")


def _finalize(root: DataRoot, state: _State, staging: Path, base_name: str) -> GenerationSummary:
    """Write the generation's metadata, move it into place, make it read-only."""
    arts = [Artifact.of(staging, GGUF_NAME, "gguf")]
    for f in sorted((staging / HF_DIR).glob("*.safetensors")):
        arts.append(Artifact.of(staging, f"{HF_DIR}/{f.name}", "safetensors"))
    for f in sorted((staging / "adapter").glob("*.safetensors")) if (staging / "adapter").is_dir() else []:
        arts.append(Artifact.of(staging, f"adapter/{f.name}", "adapter"))
    for f in sorted((staging / tasks.FOLDER).glob("*.gguf")) if (staging / tasks.FOLDER).is_dir() else []:
        arts.append(Artifact.of(staging, f"{tasks.FOLDER}/{f.name}", tasks.KIND))
    cfg = AgeUpConfig.from_dict(state.config)
    summary = GenerationSummary(
        gen=state.gen,
        parent=state.parent,
        base=base_name,
        gen_dir=str(root.gen_dir(state.gen)),
        gguf=arts[0],
        artifacts=arts,
        quantization=cfg.export.quantization,
        config_hash=cfg.digest(),
        manifest_hash=state.info.get("manifest_hash"),
        stage_seconds=dict(state.seconds),
        train=state.info.get("train"),
        smoke=state.info.get("smoke", {}),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        resumed=state.info.get("resumed", False),
        gate=state.info.get("gate"),
        weights=state.info.get("weights"),
        tasks=state.info.get("tasks"),
    )
    atomic_write_json(staging / "config.json", state.config)
    atomic_write_json(staging / "generation.json", summary.to_dict())
    shutil.rmtree(staging / "work", ignore_errors=True)
    fsync_dir(staging)
    final = root.gen_dir(state.gen)
    staging.rename(final)
    fsync_dir(final.parent)
    (final / state.path.name).unlink()  # a crash before this leaves a complete generation plus a stale state.json
    make_tree_read_only(final)
    return summary


def _export_stages(state: _State, staging: Path, cfg: AgeUpConfig, stage_cb: StageFn) -> None:
    e = cfg.export
    _run(state, "gguf_f16", lambda: export.to_gguf_f16(staging / HF_DIR, staging / "model.f16.gguf"), stage_cb)

    def quantize():
        export.quantize(staging / "model.f16.gguf", staging / GGUF_NAME, e.quantization)
        export.write_sha256(staging / GGUF_NAME)
        if not e.keep_f16:
            (staging / "model.f16.gguf").unlink(missing_ok=True)

    def smoke():
        export.verify_sha256(staging / GGUF_NAME)
        result = export.smoke_check(staging / GGUF_NAME, e.smoke_prompt, cfg.gate.smoke_max_tokens)
        state.info["smoke"] = asdict(result)

    _run(state, "quantize", quantize, stage_cb)
    _run(state, "smoke", smoke, stage_cb)


@contextlib.contextmanager
def _lock(root: DataRoot) -> Iterator[None]:
    """One age-up at a time per lineage, refused at once (``DataRoot.exclusive``, the lock a prune of the
    lineage also takes); the lineages of one data root then queue for the machine, one age-up after another
    (OS file locks: released even if the process dies)."""
    with root.exclusive(f"another age-up (or a prune) is running on {root.root}; wait for it to finish — only "
                        "one age-up runs at a time"):
        root.ledger_dir.mkdir(parents=True, exist_ok=True)
        machine = FileLock(str(root.ledger_dir / ".ageup-queue.lock"))
        try:
            machine.acquire(timeout=0)
        except Timeout:
            log.info("lineage %s: another lineage's age-up runs on %s; waiting for it to finish", root.lineage,
                     root.root)
            machine.acquire(poll_interval=1.0)
        try:
            yield
        finally:
            machine.release()


def _gen0_gguf(root: DataRoot, ledger: Ledger) -> Path | None:
    """Generation 0's GGUF, hash-verified, to re-measure the gate's anchors on; None (and the anchor rules say
    so) when it cannot be read."""
    try:
        return root.root / check_servable(ledger, 0)["path"]
    except EvolutionError as e:
        log.warning("gate: generation 0's GGUF cannot be used to re-measure the anchors: %s", e)
        return None


def anchor_history(root: DataRoot, ledger: Ledger, parent: int) -> list[gate.ModelEval]:
    """The numbers the gate's anchors are found among: the ``gate_result`` of each ancestor of ``parent``
    other than 0 and the parent (re-measured beside the child), and generation 0's ``eval.json``. Only the
    ledger's lineage: ``ledger`` reads its own lineage's entries, ``root`` its own folder, so another lineage's
    generation of the same number is never an anchor."""
    gates = _gate_results(ledger)
    return gate.lineage_evals({g: gates.get(g) for g in ledger.generation(parent).lineage if g not in (0, parent)},
                              root.gen_dir(0))


def _gate_results(ledger: Ledger) -> dict[int, dict]:
    """Each generation's last ``gate_result`` payload, in one read of the ledger (not one per generation)."""
    return {e.gen: e.payload for e in ledger.entries(kind=ev.GATE_RESULT)}


def _answers(root: DataRoot) -> Path:
    """Where the gate remembers each GGUF's replies (``evolution.metrics.answers``): per lineage."""
    return root.checkpoints / answer_book.FOLDER


def _probe_history(ledger: Ledger, lineage: list[int]) -> list[probe_sample.Asked]:
    """What each gate of the lineage (``lineage``: the parent, its parent, ... back to 0) asked of the probes,
    oldest first."""
    gates = _gate_results(ledger)
    return probe_sample.history({g: gates.get(g) for g in reversed(lineage) if g != 0})


def _probe_record(sample: probe_sample.Sample, result: gate.GateResult, limit: float | None) -> dict:
    """The sample, which probes the child answered right, and the forgetting rule's power on it."""
    child = result.child.details.get("probe_recall", {}).get("items", [])
    parent = result.parent.details.get("probe_recall", {}).get("items", []) if result.parent else []
    power = probe_sample.power_summary(sum(1 for r in parent if r["correct"]), limit) if parent else {}
    return sample.record([r["id"] for r in child if r["correct"]], power)


def _with_retrieval(root: DataRoot, ledger: Ledger, parent: int, gguf: Path, es: gate.EvalSet,
                    result: gate.GateResult, rcfg: RetrievalConfig, max_tokens: int) -> dict:
    """The child's probes asked with the lessons retrieval would still hold once it is served (for information:
    ``evolution.retrieval.figure``); empty without probes. It never fails the age-up: an error is logged."""
    asked = result.child.details.get("probe_recall", {}).get("items", [])
    if not asked:
        return {}
    from evolution.retrieval import figure
    from evolution.retrieval import items as lessons

    try:
        pending = figure.lessons_after(lessons.taught(Intake(ledger)), lessons.learned(root, ledger, parent),
                                       result.child.details.get("experience_similarity", {}).get("items", []))
        out = figure.probe_recall(gguf, es.probes, asked, pending, rcfg, max_tokens, _answers(root))
    except Exception as exc:  # noqa: BLE001 — a figure for information: the verdict stands without it
        log.warning("gate: the probes with retrieval could not be measured (%s); the report has the weights' "
                    "figure alone", exc)
        return {}
    log.info("gate: probe recall with retrieval %.3f, on the weights alone %.3f (%d of %d probes found notes, %.1f s)",
             out["probe_recall"], out["without"], out["with_notes"], out["probes"], out["seconds"])
    return out


def _gate_info(result: gate.GateResult) -> dict:
    return result.summary()


def bootstrap(root: DataRoot, cfg: AgeUpConfig, ledger: Ledger, cur: curriculum_mod.Curriculum,
              base: Path | None = None, stage_cb: StageFn = _noop) -> GenerationSummary:
    """Build generation 0 from the embedded model (or ``base``) if it does not exist yet.

    Generation 0 is measured, not gated: it starts the lineage, so it is recorded as promoted — the
    first served generation — as soon as it is built (``promotion.decide``; the daemon serves
    whatever the ledger names).
    """
    if 0 in root.generations():
        promotion.decide(root, ledger, 0, cfg.gate.stop_after)  # a crash may have come before its record
        return GenerationSummary.load(root.gen_dir(0))
    if base is not None:
        base_model.check_local(base)
    staging = root.staging_dir(0)
    staging.mkdir(parents=True, exist_ok=True)
    state, resumed = _State.load_or_new(staging / "state.json", 0, None, cfg.to_dict())
    state.info["resumed"] = resumed

    def make_base():
        shutil.rmtree(staging / HF_DIR, ignore_errors=True)
        info = base_model.materialize(staging / HF_DIR, base)
        state.info["base"] = asdict(info)

    def measure():
        es = gate.eval_set(cur, [], Intake(ledger).probes.items())
        m = gate.measure(staging / GGUF_NAME, 0, es, cfg.gate, cfg.export.smoke_prompt, answers=_answers(root))
        result = gate.GateResult("measured", [], m, None, {})
        gate.write_report(result, staging)
        gate.save_recall_items(es, staging / "data")
        state.info["gate"] = _gate_info(result)

    _run(state, "base", make_base, stage_cb)
    _export_stages(state, staging, cfg, stage_cb)
    _run(state, "measure", measure, stage_cb)
    stage_cb("finalize", "start")
    if not ledger.entries(gen=0, kind=ev.GENERATION_CREATED):  # a crash may have come after this record
        ledger.record(ev.generation_created(0, None, state.info["base"]["name"], cfg.digest(), None,
                                            source=state.info["base"], config=state.config))
    summary = _finalize(root, state, staging, state.info["base"]["name"])
    stage_cb("finalize", "done")
    promotion.decide(root, ledger, 0, cfg.gate.stop_after)
    return summary


def select_parent(root: DataRoot, ledger: Ledger) -> int:
    """The generation an age-up starts from: the served one, with its weights verified against the ledger
    (rebuilt from the adapters first if the retention policy dropped them)."""
    parent = ledger.served_generation()
    if parent is None:
        raise GenerationError("no generation is served yet; run `evolve age-up` once to create generation 0")
    retention.rebuild_weights(root, ledger, parent)
    artifacts = ledger.generation(parent).artifacts
    weights = [a for a in artifacts if a.get("kind") == "safetensors"]
    if not weights:
        raise GenerationError(f"the ledger records no weights for generation {parent}; it cannot be trained from")
    for a in weights:
        path = root.root / a["path"]
        if not path.is_file() or sha256_file(path) != a["sha256"]:
            raise IntegrityError(
                f"{path} is missing or differs from the SHA-256 the ledger recorded for generation {parent}; "
                f"restore it, or `evolve rollback --to N` to a generation whose files are intact"
            )
    return parent


def age_up(root: DataRoot, cfg: AgeUpConfig, ledger: Ledger, base: Path | None = None,
           progress: train.ProgressFn | None = None, stage_cb: StageFn = _noop,
           train_callbacks: list | None = None, restart: bool = False,
           retrieval: RetrievalConfig | None = None) -> GenerationSummary:
    """Build the next generation: bootstrap generation 0 if needed, then train, merge, export and gate a child.

    The child is numbered after every generation on disk or in the ledger (rejected and discarded ones
    included) and trained from the served one. It ends with the child's ``exported`` and
    ``gate_result`` recorded; ``promotion.decide`` serves or rejects it. A child that an earlier
    age-up finished but that is still undecided is returned instead of building another.

    ``retrieval``: the lineage's ``[retrieval]`` settings, where chat serves with it; the gate then also reports its
    probes asked with retrieval, for information (``evolution.retrieval.figure``).
    """
    # Validate the curriculum before anything is created or trained.
    cur = curriculum_mod.load(cfg.curriculum.path, cfg.curriculum.phases)
    for w in cur.warnings:
        log.warning("curriculum: %s", w)
    with _tracked(root, _expected_seconds(root)) as tracker:
        summary = _age_up_locked(root, cfg, ledger, cur, base, _tee(progress, tracker.step),
                                 _tee(stage_cb, tracker.stage), train_callbacks, restart, tracker, retrieval)
        tracker.end("done", gen=summary.gen, verdict=(summary.gate or {}).get("verdict", "measured"))
        return summary


def ensure_generation_zero(root: DataRoot, cfg: AgeUpConfig, ledger: Ledger, base: Path | None = None,
                           stage_cb: StageFn = _noop) -> GenerationSummary:
    """Build (or finish building) generation 0 and record it served, if the lineage has not started yet."""
    cur = curriculum_mod.load(cfg.curriculum.path, cfg.curriculum.phases)
    with _tracked(root) as tracker:
        tracker.set(gen=0, parent=None)
        promotion.record_finished(root, ledger)
        summary = bootstrap(root, cfg, ledger, cur, base, _tee(stage_cb, tracker.stage))
        tracker.end("done", gen=0, verdict="measured")
        return summary


@contextlib.contextmanager
def _tracked(root: DataRoot, expected: dict[str, float] | None = None) -> Iterator[progress_mod.Tracker]:
    """The age-up lock, and a progress file that ends as interrupted or failed if the body raises.

    A failure caused by a full disk, however deep it came from, is raised as ``DiskFull`` with a
    message that says so and what to do."""
    with _lock(root):
        tracker = None
        try:
            tracker = progress_mod.Tracker(root, expected)
            yield tracker
        except KeyboardInterrupt:
            _end(tracker, "interrupted")
            raise
        except BaseException as exc:
            if is_disk_full(exc) and not isinstance(exc, DiskFull):
                stage = tracker.d["stage"] if tracker else None
                cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                full = DiskFull(f"the disk is full: {f'the {stage} stage' if stage else 'the age-up'} could not "
                                f"write its files ({cause}); "
                                f"{free_space(root.root)}. Free some space there (or move EVOLUTION_HOME to a bigger "
                                "disk): nothing half-written is used, and the age-up resumes where it stopped")
                _end(tracker, "failed", error=str(full))
                raise full from exc
            _end(tracker, "failed", error=str(exc))
            raise


def _end(tracker: progress_mod.Tracker | None, state: str, **fields) -> None:
    """End the progress file if it can be written (a full disk must not hide the error that ended the age-up)."""
    if tracker is None:
        return
    try:
        tracker.end(state, **fields)
    except OSError as exc:
        log.warning("could not record the age-up as %s in %s: %s", state, tracker.file, exc)


def _tee(first, second):
    def both(*a):
        if first is not None:
            first(*a)
        second(*a)
    return both


def _expected_seconds(root: DataRoot) -> dict[str, float]:
    """Stage durations of the latest generation that trained: the ETA's guess for stages to come."""
    for n in reversed(root.generations()):
        try:
            secs = GenerationSummary.load(root.gen_dir(n)).stage_seconds
        except (OSError, ValueError, TypeError):
            continue
        if "train" in secs or n == 0:
            return secs
    return {}


def _age_up_locked(root: DataRoot, cfg: AgeUpConfig, ledger: Ledger, cur, base, progress, stage_cb,
                   train_callbacks, restart, tracker, retrieval: RetrievalConfig | None = None) -> GenerationSummary:
    waiting = [n for n in promotion.record_finished(root, ledger) if n > 0]
    if waiting:  # the last age-up built its child and stopped before it was decided: that child is this one's
        log.warning("%s was finished by an age-up that stopped before it was promoted or rejected; it is this "
                    "age-up's result (run again for another)", gen_name(waiting[-1]))
        tracker.set(gen=waiting[-1], resumed=True)
        return GenerationSummary.load(root.gen_dir(waiting[-1]))
    paused = promotion.paused_reason(ledger)
    if paused:
        raise AgeUpsPaused(f"age-ups are paused: {paused}")
    bootstrap(root, cfg, ledger, cur, base, stage_cb)
    partial = sorted(n for n in root.partial_generations() if n > 0)
    if restart:
        for n in partial:
            log.warning("--restart: discarding the interrupted %s", gen_name(n))
            make_tree_writable(root.staging_dir(n))
            shutil.rmtree(root.staging_dir(n))
        partial = []
    state_file = root.staging_dir(partial[-1]) / "state.json" if partial else None
    if state_file is not None and state_file.is_file():
        child = partial[-1]
        parent = json.loads(state_file.read_text())["parent"]
        retention.rebuild_weights(root, ledger, parent)  # pruned since (a rollback, then `evolve prune`)
    else:
        parent = select_parent(root, ledger)
        # Never reuse a number the ledger has seen (an attempt discarded with --restart keeps its own).
        child = max(root.generations() + [e.gen for e in ledger.entries() if e.gen is not None]) + 1
    staging = root.staging_dir(child)
    staging.mkdir(parents=True, exist_ok=True)
    state, resumed = _State.load_or_new(staging / "state.json", child, parent, cfg.to_dict())
    if resumed:
        log.info("resuming %s after stages %s", gen_name(child), ", ".join(state.completed) or "(none)")
        if state.config != cfg.to_dict():
            log.warning("resuming with the configuration it started with, not this run's (use --restart to drop it)")
        cfg = AgeUpConfig.from_dict(state.config)
    state.info["resumed"] = resumed
    tracker.set(gen=child, parent=parent, resumed=resumed)
    parent_dir = root.gen_dir(parent)
    parent_hf = parent_dir / HF_DIR
    if not (parent_hf / "config.json").is_file():
        raise GenerationError(f"{parent_dir} has no {HF_DIR}/ weights to train from; it is not a complete generation")

    def data():
        inbox = Intake(ledger).inbox(replay.conversations_through(parent_dir), replay.experiences_through(parent_dir))
        manifest = replay.materialize(root, cur, child, staging / "data", cfg.curriculum, inbox, seed=cfg.train.seed,
                                      stages=train.stages_of(cfg.train), capped=train.capped_records(cfg.train),
                                      known_dirs=[root.gen_dir(g) / "data" for g in ledger.generation(parent).lineage])
        gate.save_recall_items(gate.eval_set(cur, []), staging / "data")
        state.info["manifest_hash"] = manifest["sha256"]
        if not ledger.entries(gen=child, kind=ev.GENERATION_CREATED):  # once, even if a crash repeats this stage
            ledger.record(ev.generation_created(child, parent, GenerationSummary.load(parent_dir).base,
                                                cfg.digest(), manifest["sha256"], config=state.config,
                                                manifest=manifest))

    def do_train():
        data = replay.read(staging / "data", cfg.train.stages)
        tracker.set(train_stages=train.planned(cfg.train, data))  # a stage that will skip has no steps to wait for
        ledger.record(ev.training_started(child, parent=parent, records={k: len(v) for k, v in data.items()}))
        result = train.train(parent_hf, data, cfg.train, staging / "work", progress, train_callbacks)
        shutil.rmtree(staging / "adapter", ignore_errors=True)
        shutil.copytree(result.adapter_dir, staging / "adapter")
        state.info["train"] = result.to_dict()
        atomic_write_json(staging / "metrics.json", result.to_dict())
        stages = result.stages
        ledger.record(ev.training_finished(
            child, result.steps, {k: m.losses for k, m in stages.items()}, backend=result.backend,
            stage_steps={k: m.steps for k, m in stages.items()}, tokens={k: m.tokens for k, m in stages.items()},
            stages={k: train.stage_record(m) for k, m in stages.items()},
        ))

    _run(state, "data", data, stage_cb)
    _run(state, "train", do_train, stage_cb)
    _run(state, "merge", lambda: export.merge(parent_hf, staging / "adapter", staging / HF_DIR,
                                             cfg.export.merged_dtype), stage_cb)

    def do_weights():  # how the weights moved, per layer (``evolution.weights``)
        gen0_hf = root.gen_dir(0) / HF_DIR
        state.info["weights"] = weights.measure(staging / "adapter", staging / HF_DIR, parent_hf,
                                                gen0_hf if gen0_hf.is_dir() else None)
        atomic_write_json(staging / weights.FILE, state.info["weights"])

    _run(state, "weights", do_weights, stage_cb)
    _export_stages(state, staging, cfg, stage_cb)

    def do_gate():
        parent_gguf = root.root / check_servable(ledger, parent)["path"]  # hash verified against the ledger
        lineage = ledger.generation(parent).lineage
        ancestors = [root.gen_dir(g) / "data" for g in lineage]
        # the probes the lineage's gates are due to ask (a bounded sample); the experience this child's data holds
        sample = probe_sample.choose(Intake(ledger).probes.items(), _probe_history(ledger, lineage),
                                     cfg.gate.probe_sample, cfg.gate.probe_every, seed=child)
        es = gate.eval_set(cur, ancestors, sample.items, staging / "data")
        result = gate.run(staging / GGUF_NAME, child, parent_gguf, parent, es, cfg.gate, cfg.export.smoke_prompt,
                          lineage=anchor_history(root, ledger, parent), gen0_gguf=_gen0_gguf(root, ledger),
                          answers=_answers(root))
        result.probes = _probe_record(sample, result, cfg.gate.probe_forgotten_max)
        if retrieval is not None and retrieval.enabled:
            result.retrieval = _with_retrieval(root, ledger, parent, staging / GGUF_NAME, es, result, retrieval,
                                               cfg.gate.answer_max_tokens)
        gate.write_report(result, staging)
        state.info["gate"] = _gate_info(result)

    _run(state, "gate", do_gate, stage_cb)

    def do_tasks():  # one adapter per task of [tasks], on a child that passed (``evolution.tasks``)
        if (state.info.get("gate") or {}).get("verdict") != ev.PASS:
            log.info("tasks: %s failed its gate; no task adapter is trained on it", gen_name(child))
            return

        def save(done: dict) -> None:
            state.info["tasks"] = done
            state.save()

        tasks.build(staging, staging / GGUF_NAME, staging / HF_DIR, child, parent, root.root, ledger, cfg,
                    gate.saved_recall_items(staging / "data"), replay.read(staging / "data", ["sft"])["sft"],
                    dict(state.info.get("tasks") or {}), save, progress)

    if cfg.tasks.names:
        _run(state, "tasks", do_tasks, stage_cb)
    stage_cb("finalize", "start")
    summary = _finalize(root, state, staging, GenerationSummary.load(parent_dir).base)
    stage_cb("finalize", "done")
    promotion.record_built(root, ledger, summary)
    return summary
