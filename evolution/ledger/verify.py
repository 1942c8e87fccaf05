"""Verify the ledger: recompute the hash chain, compare with the exported head, re-hash artifacts.

What each problem means (``Problem.what``):

- ``edited``: an entry's content no longer matches its ``entry_hash``;
- ``missing``: seqs are absent in the middle (deleted rows);
- ``reordered``: an intact entry sits at another seq than it was written at;
- ``broken_link``: an entry's ``prev_hash`` is not the previous entry's hash (that one was rewritten);
- ``truncated``: the exported head names a seq past the end of the ledger;
- ``rewritten``: the entry at the head's seq has another hash than the head recorded;
- ``head_missing`` / ``head_unreadable``: the exported head file is gone or damaged;
- ``artifact_changed`` / ``artifact_missing``: a file an ``exported`` entry names differs or is gone
  (a missing artifact of a rejected generation is only a warning). A file a later ``pruned`` entry
  names is expected to be gone (counted in ``artifacts_pruned``); one still on disk is re-hashed and
  warned about (a prune was interrupted: `evolve prune` finishes it).

``first_bad_seq`` is the lowest seq with a problem.

One chain runs through every lineage's entries (see ``chain``), so one pass checks them all. The
artifacts of a lineage other than ``main`` that has no folder under this data root (it is served
from another machine sharing a PostgreSQL ledger) are not looked for here: a warning says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from pathlib import Path

from evolution.errors import LedgerError
from evolution.fsutil import sha256_file
from evolution.ledger import events as ev
from evolution.ledger.chain import GENESIS, entry_hash
from evolution.ledger.head import Head, read_head
from evolution.paths import MAIN, DataRoot


@dataclass(frozen=True)
class Problem:
    seq: int | None
    what: str
    message: str


@dataclass
class VerifyReport:
    entries: int = 0
    last_seq: int = 0
    head: Head | None = None
    head_path: str = ""
    artifacts_checked: int = 0
    artifacts_pruned: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad_seq(self) -> int | None:
        seqs = [p.seq for p in self.problems if p.seq is not None]
        return min(seqs) if seqs else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(ok=self.ok, first_bad_seq=self.first_bad_seq)
        return d


def _original_positions(rows) -> dict[int, int]:
    """Where each stored row was written, by walking prev_hash links from the genesis."""
    by_prev = {r.prev_hash: r for r in rows}
    pos, h, n = {}, GENESIS, 1
    while h in by_prev and n <= len(rows):
        r = by_prev[h]
        pos[r.seq] = n
        h, n = r.entry_hash, n + 1
    return pos


def _check_chain(rows, report: VerifyReport) -> dict[int, dict]:
    """Check every row; return the parsed payloads by seq."""
    payloads: dict[int, dict] = {}
    original = None
    expected, prev, prev_flagged = 1, GENESIS, False
    for r in rows:
        flagged = len(report.problems)
        moved = r.seq != expected
        if moved:
            report.problems.append(Problem(
                expected, "missing", f"entries {expected}..{r.seq - 1} are missing (deleted from the middle)"))
        try:
            payload = json.loads(r.payload)
        except ValueError:
            report.problems.append(Problem(r.seq, "edited", "payload is not valid JSON any more (the row was edited)"))
            expected, prev, prev_flagged = r.seq + 1, r.entry_hash, True
            continue
        payloads[r.seq] = payload
        if entry_hash(r.prev_hash, r.seq, r.time, r.kind, r.gen, payload, r.lineage) != r.entry_hash:
            original = original if original is not None else _original_positions(rows)
            was = original.get(r.seq)
            if was and was != r.seq and entry_hash(r.prev_hash, was, r.time, r.kind, r.gen, payload,
                                                   r.lineage) == r.entry_hash:
                report.problems.append(Problem(
                    r.seq, "reordered", f"this entry was written as seq {was}; the rows were reordered"))
            else:
                report.problems.append(Problem(
                    r.seq, "edited",
                    "content (time, kind, gen or payload) does not match its entry_hash: the entry was edited"))
        elif r.prev_hash != prev and not moved and not prev_flagged:  # a flagged neighbour explains it
            report.problems.append(Problem(
                r.seq, "broken_link",
                f"prev_hash does not match the hash of seq {r.seq - 1}: that entry was replaced by a rewritten one",
            ))
        expected, prev, prev_flagged = r.seq + 1, r.entry_hash, len(report.problems) > flagged
    return payloads


def _head_or_error(head_path: Path) -> Head | LedgerError | None:
    try:
        return read_head(head_path)
    except LedgerError as exc:
        return exc


def _check_head(rows, head_path: Path, head: Head | LedgerError | None, report: VerifyReport) -> None:
    if isinstance(head, LedgerError):
        report.problems.append(Problem(None, "head_unreadable", str(head)))
        return
    report.head = head
    if head is None:
        if rows:
            report.problems.append(Problem(
                None, "head_missing",
                f"the exported head {head_path} is missing, so a truncated tail cannot be ruled out; restore it from a "
                "backup, or if you moved the database without it on purpose, run `evolve ledger verify --write-head`",
            ))
        return
    last = report.last_seq
    if head.seq > last:
        report.problems.append(Problem(
            last + 1, "truncated",
            f"the exported head records seq {head.seq} ({head.entry_hash[:12]}) but the ledger ends at seq {last}: "
            f"entries {last + 1}..{head.seq} were removed from the tail",
        ))
        return
    at = next((r for r in rows if r.seq == head.seq), None)
    if at is not None and at.entry_hash != head.entry_hash:
        report.problems.append(Problem(
            head.seq, "rewritten",
            f"entry {head.seq} has hash {at.entry_hash[:12]} but the exported head recorded "
            f"{head.entry_hash[:12]}: history was rewritten",
        ))
    if last > head.seq:
        report.warnings.append(
            f"the ledger runs {last - head.seq} entries past the exported head "
            "(a crash after commit, or another writer's data root)"
        )


def _check_artifacts(data_root: DataRoot, rows, payloads: dict[int, dict], report: VerifyReport) -> None:
    rejected = {(r.lineage, r.gen) for r in rows if r.kind == ev.REJECTED}
    pruned = ev.pruned_paths((r.seq, r.kind, payloads[r.seq]) for r in rows if r.seq in payloads)
    hashed: dict[Path, str] = {}
    elsewhere: set[str] = set()
    for r in rows:
        if r.kind != ev.EXPORTED or r.seq not in payloads:
            continue
        if r.lineage != MAIN and not data_root.for_lineage(r.lineage).home.is_dir():
            elsewhere.add(r.lineage)
            continue
        for art in payloads[r.seq].get("artifacts", []):
            path = data_root.root / art["path"]
            if art["path"] in pruned:
                if not path.is_file():
                    report.artifacts_pruned += 1
                    continue
                report.warnings.append(
                    f"artifact {art['path']} of {_name(r.lineage, r.gen)} was pruned (seq {pruned[art['path']]}) but "
                    "is still on disk: a prune was interrupted; `evolve prune` finishes it")
            if not path.is_file():
                msg = f"artifact {art['path']} of {_name(r.lineage, r.gen)} is missing"
                if (r.lineage, r.gen) in rejected:
                    report.warnings.append(msg + " (generation was rejected; pruned?)")
                else:
                    report.problems.append(Problem(r.seq, "artifact_missing", msg + "; restore it from a backup"))
                continue
            if path not in hashed:
                hashed[path] = sha256_file(path)
                report.artifacts_checked += 1
            if hashed[path] != art["sha256"]:
                report.problems.append(Problem(
                    r.seq, "artifact_changed",
                    f"artifact {art['path']} of {_name(r.lineage, r.gen)} has sha256 {hashed[path][:12]}…, "
                    f"the ledger recorded {art['sha256'][:12]}…: the file was replaced or corrupted",
                ))
    for name in sorted(elsewhere):
        report.warnings.append(f"lineage {name} has no folder under {data_root.root}: its artifacts were not "
                               "checked (verify on the data root that holds them)")


def _name(lineage: str, gen: int | None) -> str:
    return f"generation {gen}" if lineage == MAIN else f"generation {lineage}/{gen}"


def verify(read_rows: Callable[[], list], data_root: DataRoot, head_path: Path, *,
           artifacts: bool = True) -> VerifyReport:
    """Check the whole ledger and return every problem found (not only the first).

    ``read_rows``: every row of every lineage as stored, in seq order (``Ledger.raw_rows``); ``data_root``: where the
    artifacts are; ``head_path``: the exported head to compare with."""
    start = time.perf_counter()
    report = VerifyReport(head_path=str(head_path))
    # The head is read before the rows: it is written after each commit, so rows read later
    # always reach it, even while another process appends (the other order would see a
    # "truncated" ledger whenever an append landed in between).
    head = _head_or_error(head_path)
    rows = read_rows()
    if head is None and rows:  # the first entry's head may have been written in between
        head = _head_or_error(head_path)
    report.entries = len(rows)
    report.last_seq = rows[-1].seq if rows else 0
    payloads = _check_chain(rows, report)
    _check_head(rows, head_path, head, report)
    if artifacts:
        _check_artifacts(data_root, rows, payloads, report)
    report.problems.sort(key=lambda p: (p.seq is None, p.seq or 0))
    report.seconds = time.perf_counter() - start
    return report
