"""Backups of a data root, taken while the daemon runs, and their restore onto another (or the same) root.

A backup is a folder::

    MANIFEST.json              format, when, from where, the ledger's head, the SHA-256 of every file
    ledger/ledger.db           the SQLite ledger, copied with SQLite's online backup API (one snapshot)
      or ledger/ledger.dump    a PostgreSQL ledger, ``pg_dump --format=custom`` of the same snapshot
    ledger/HEAD.json           the exported head: the snapshot's last entry
    checkpoints/gen_NNNN/...   every generation the snapshot's ledger knows: metadata, data, eval reports,
                               and the weights (GGUF, merged safetensors, adapter) unless ``models=False``
    lineages/NAME/checkpoints/gen_NNNN/...   the same for every other lineage of the ledger
    tokenizer/base/...         a lineage's own tokenizer and the base it extended (``evolve tokenizer extend``,
                               ``evolution.vocab``): generation 0 is remade from it; lineages/NAME/tokenizer/ likewise

Consistency: the ledger is copied first, as one snapshot; a generation directory is complete
and read-only before its ``exported`` event is recorded (it is renamed into place, then
recorded), so copying afterwards the directories of the generations the snapshot records as
exported gives a root that verifies. A generation still being built at the snapshot (a
``gen_NNNN.partial``, or finished but not yet recorded) is left out: restored, its age-up starts
again under a new number, as after a crash (the ledger keeps its ``training_started``). The daemon's token, its
``daemon.json`` and logs are not copied.

The backup is built in a hidden folder beside ``DEST`` (``.NAME.partial-PID``) and renamed to
``DEST`` only when complete, so ``DEST`` is either absent or whole: a kill or a full disk leaves
no ``DEST``, only that folder, which the next backup to the same place removes.

``restore`` re-hashes every file against the manifest before it writes anything, refuses a
data root that holds a ledger or generations unless forced (and a root whose daemon is running
even then), moves what it replaces to ``.before-restore-TIME/`` instead of deleting it, and
verifies the restored ledger.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy.engine import make_url

from evolution import faults, vocab
from evolution.errors import BackupError, DiskFull
from evolution.fsutil import (atomic_write_json, free_space, fsync_dir, is_disk_full, make_tree_read_only,
                              sha256_file)
from evolution.ledger import events as ev
from evolution.ledger.head import HEAD_NAME, Head, read_head, write_head
from evolution.ledger.store import DB_NAME, URL_ENV, Ledger
from evolution.paths import DataRoot
from evolution.progress import pid_alive

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
FORMAT = 1
PG_DUMP = "ledger/ledger.dump"
TOKENIZER = vocab.BASE_DIR.split("/")[0]
"""The main lineage's folder of its own tokenizer, under the data root (``evolution.vocab``)."""
MODEL_SUFFIXES = (".gguf", ".safetensors")
"""Weights: what ``models=False`` leaves out (the GGUF, the merged HF weights, the adapter)."""


@dataclass
class BackupResult:
    dest: Path
    files: int
    bytes: int
    head: Head | None
    generations: list[int]
    left_out: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class RestoreResult:
    root: Path
    files: int
    head: Head | None
    served: int | None
    moved_aside: Path | None
    kept: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _is_model(rel: str) -> bool:
    return rel.endswith(MODEL_SUFFIXES)


def _resolve(url: str | None) -> str | None:
    return url or os.environ.get(URL_ENV) or None


def _libpq_url(url: str) -> str:
    """A SQLAlchemy URL as pg_dump / pg_restore take it (no ``+driver``), password included."""
    u = make_url(url)
    return u.set(drivername="postgresql").render_as_string(hide_password=False)


# -- backup ----------------------------------------------------------------------------------------


def _sqlite_snapshot(db: Path, out: Path) -> None:
    """One consistent copy of a live SQLite database (WAL and all) through the online backup API."""
    src = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    try:
        dst = sqlite3.connect(out)
        try:
            src.backup(dst)  # all pages in one step: a single read transaction, so one point in time
            dst.execute("PRAGMA journal_mode=DELETE")  # a self-contained file, no -wal beside it
        finally:
            dst.close()
    finally:
        src.close()


def _pg_snapshot(url: str, schema: str, out: Path) -> None:
    """``pg_dump`` of the ledger's schema (one consistent snapshot) in pg_restore's custom format."""
    try:
        r = subprocess.run(["pg_dump", "--format=custom", "--no-owner", "--no-privileges", f"--schema={schema}",
                            "--file", str(out), "--dbname", _libpq_url(url)], capture_output=True, text=True,
                           check=False)
    except FileNotFoundError:
        raise BackupError("pg_dump is not installed: install the PostgreSQL client tools (the version of the "
                          "server or newer) to back up a PostgreSQL ledger") from None
    if r.returncode != 0:
        if is_disk_full(OSError(r.stderr)):
            raise OSError(28, f"No space left on device (pg_dump: {r.stderr.strip()})")
        raise BackupError(f"pg_dump of the ledger failed: {r.stderr.strip()}")


def _snapshot_ledger(root: DataRoot, url: str | None, work: Path) -> tuple[dict, Head | None, set[int], dict]:
    """Copy the ledger into ``work``; return its manifest entry, last entry, generations and artifacts.

    The snapshot is opened and its chain checked against the source's exported head (read before
    the copy, so the copy reaches it): a ledger that does not verify is not backed up as if it did.
    """
    (work / "ledger").mkdir(parents=True)
    with Ledger.open(root, url) as src:
        display, head_path, is_pg = src.url, src.head_path, src.engine.url.get_backend_name() != "sqlite"
        src_db = None if is_pg else Path(src.engine.url.database)
        if is_pg:
            with src.reading() as conn:
                schema = conn.exec_driver_sql("SELECT current_schema()").scalar_one()
    source_head = work / ".source-head.json"
    if head_path.is_file():
        shutil.copyfile(head_path, source_head)
    if is_pg:
        _pg_snapshot(url, schema, work / PG_DUMP)
        snap_url, info = url, {"kind": "postgresql", "file": PG_DUMP, "url": display, "schema": schema}
    else:
        _sqlite_snapshot(src_db, work / "ledger" / DB_NAME)
        snap_url, info = f"sqlite:///{work / 'ledger' / DB_NAME}", {"kind": "sqlite", "file": f"ledger/{DB_NAME}",
                                                                    "url": display}
    faults.point("backup_copy")
    scratch = DataRoot(work / ".scratch")
    with Ledger.open(scratch, snap_url) as snap:
        if is_pg:  # the dump is one snapshot; the rows read here may be later, so cut them at the dump's end
            rows, last = _pg_dump_rows(snap, work / PG_DUMP)
        else:
            rows = snap.raw_rows()
            last = rows[-1] if rows else None
        report = snap.verify(artifacts=False, head=source_head)
        if report.problems:
            raise BackupError(
                f"the ledger at {display} does not verify ({report.problems[0].message}); `evolve ledger verify` "
                "shows every problem. A backup of it would not restore to a root that verifies; keep your last good one")
    shutil.rmtree(scratch.root, ignore_errors=True)
    source_head.unlink(missing_ok=True)
    head = Head(seq=last.seq, entry_hash=last.entry_hash, ledger=display) if last is not None else None
    gens = {(r.lineage, r.gen) for r in rows if r.kind == ev.EXPORTED}
    artifacts = {}
    for r in rows:
        if r.kind == ev.EXPORTED:
            for a in json.loads(r.payload).get("artifacts", []):
                artifacts[a["path"]] = a["sha256"]
    info["head"] = None if head is None else {"seq": head.seq, "entry_hash": head.entry_hash}
    return info, head, gens, artifacts


def _pg_dump_rows(snap: Ledger, dump: Path):
    """The ledger rows the dump holds: read from the dump's data section, not the live database."""
    r = subprocess.run(["pg_restore", "--data-only", "--table=ledger_entries", "--file=-", str(dump)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise BackupError(f"pg_restore could not read back the dump it just wrote: {r.stderr.strip()}")
    seqs = []
    in_copy = False
    for line in r.stdout.splitlines():
        if line.startswith("COPY ") and "ledger_entries" in line:
            in_copy = True
            continue
        if in_copy:
            if line == "\\.":
                break
            seqs.append(int(line.split("\t", 1)[0]))
    top = max(seqs, default=0)
    rows = [row for row in snap.raw_rows() if row.seq <= top]
    return rows, (rows[-1] if rows else None)


def _copy_file(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())
    faults.point("backup_copy")
    return sha256_file(dst)


def _clear_stale(dest: Path) -> None:
    """Remove hidden partial backups to ``dest`` whose process is gone (a kill -9 mid-backup)."""
    for p in dest.parent.glob(f".{dest.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            log.info("backup: removing %s, left by a backup that did not finish", p)
            shutil.rmtree(p, ignore_errors=True)


def backup(root: DataRoot, dest: Path, *, url: str | None = None, models: bool = True) -> BackupResult:
    """Snapshot ``root`` (its ledger at ``url``, default the SQLite file under it) into the new folder ``dest``."""
    t0 = time.perf_counter()
    url = _resolve(url)
    dest = Path(dest).expanduser().absolute()
    if url is None and not (root.ledger_dir / DB_NAME).is_file():
        raise BackupError(f"{root.root} has no ledger ({root.ledger_dir / DB_NAME}): nothing to back up. Set "
                          "EVOLUTION_HOME to the data root the daemon uses")
    if dest.exists():
        raise BackupError(f"{dest} already exists; back up into a new folder (nothing was written)")
    blocking = next((p for p in dest.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise BackupError(f"cannot write the backup to {dest}: {blocking} is a file, not a folder (nothing was written)")
    if dest == root.root or root.root in dest.parents:
        raise BackupError(f"{dest} is inside the data root {root.root}; back up to another place, ideally another disk")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale(dest)
        work = dest.parent / f".{dest.name}.partial-{os.getpid()}"
        work.mkdir()
    except PermissionError as exc:
        raise BackupError(f"cannot write the backup to {dest}: {exc.strerror} ({exc.filename}); choose a folder you "
                          "can write (nothing was written)") from None
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFull(f"the disk is full: cannot start a backup in {dest.parent} ({free_space(dest.parent)}); "
                           "nothing was written") from exc
        raise BackupError(f"cannot write the backup to {dest}: {exc}") from exc
    try:
        result = _build(root, url, work, models)
        work.rename(dest)
        fsync_dir(dest.parent)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if is_disk_full(exc):  # an OSError, or SQLite's "database or disk is full" from the snapshot
            raise DiskFull(f"the disk is full: the backup to {dest} did not fit ({free_space(dest.parent)}); nothing "
                           "was written there and the data root is untouched. Free space or back up elsewhere") from exc
        if isinstance(exc, PermissionError):
            raise BackupError(f"cannot write the backup to {dest}: {exc.strerror} ({exc.filename}); nothing was "
                              "written") from exc
        raise
    result.dest, result.seconds = dest, time.perf_counter() - t0
    log.info("backup: %d files, %.1f MiB, head seq %s, to %s in %.1f s", result.files, result.bytes / 2**20,
             result.head.seq if result.head else "-", dest, result.seconds)
    return result


def _build(root: DataRoot, url: str | None, work: Path, models: bool) -> BackupResult:
    info, head, gens, artifacts = _snapshot_ledger(root, url, work)
    files: dict[str, str] = {}
    files[info["file"]] = sha256_file(work / info["file"])
    if head is not None:
        atomic_write_json(work / "ledger" / HEAD_NAME, {"seq": head.seq, "entry_hash": head.entry_hash,
                                                         "ledger": head.ledger})
        files[f"ledger/{HEAD_NAME}"] = sha256_file(work / "ledger" / HEAD_NAME)
    left_out: dict[str, str] = {}
    copied, others = [], {}
    folders = []
    for lineage, n in sorted(gens):
        src = root.for_lineage(lineage).gen_dir(n)
        if not src.is_dir():
            continue  # named in the ledger but not on disk (pruned, or never finished): verify says which
        if lineage == root.lineage:
            copied.append(n)
        else:
            others.setdefault(lineage, []).append(n)
        folders.append(src)
    # A lineage's own tokenizer: the base its generation 0 was built from, and remade from (it is no generation).
    folders += [t for t in (root.for_lineage(name).home / vocab.BASE_DIR
                            for name in sorted({name for name, _ in gens} | {root.lineage})) if t.is_dir()]
    for src in folders:
        for p in sorted(src.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(root.root).as_posix()
            if not models and _is_model(rel):
                left_out[rel] = artifacts.get(rel) or sha256_file(p)  # so a forced restore can keep it
                continue
            files[rel] = _copy_file(p, work / rel)
    manifest = {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": str(root.root),
        "ledger": info,
        "models": models,
        "generations": copied,
        "lineage_generations": others,
        "files": files,
        "left_out": left_out,
    }
    atomic_write_json(work / MANIFEST, manifest)
    for d in sorted({(work / rel).parent for rel in files} | {work}, key=lambda p: -len(p.parts)):
        fsync_dir(d)
    size = sum((work / rel).stat().st_size for rel in files)
    return BackupResult(dest=work, files=len(files), bytes=size, head=head, generations=copied, left_out=left_out)


# -- restore ---------------------------------------------------------------------------------------


def read_manifest(src: Path) -> dict:
    try:
        m = json.loads((src / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupError(f"{src} is not a backup: it has no {MANIFEST}") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"the manifest {src / MANIFEST} is unreadable ({exc}); the backup is damaged") from None
    if m.get("format") != FORMAT:
        raise BackupError(f"{src} is a backup of format {m.get('format')!r}; this evolve reads format {FORMAT}")
    return m


def check(src: Path) -> dict:
    """Re-hash every file of the backup at ``src`` against its manifest; ``BackupError`` naming each that differs."""
    src = Path(src)
    m = read_manifest(src)
    problems = []
    for rel, digest in sorted(m["files"].items()):
        p = src / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: SHA-256 differs from the manifest (changed or corrupted)")
    present = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()} - {MANIFEST}
    problems += [f"{rel}: not in the manifest (added)" for rel in sorted(present - m["files"].keys())]
    if problems:
        raise BackupError(f"the backup at {src} does not match its manifest; nothing was restored:\n"
                          + "\n".join(f"  {p}" for p in problems))
    return m


def live_reasons(root: DataRoot) -> list[str]:
    """Why ``root`` is in use: a ledger, generations, a running daemon (empty when it is free to restore into)."""
    why = []
    if (root.ledger_dir / DB_NAME).exists():
        why.append(f"it has a ledger ({root.ledger_dir / DB_NAME})")
    if root.generations() or root.partial_generations():
        why.append(f"it has generations in {root.checkpoints}")
    running = _daemon_running(root)
    return why + ([f"a daemon is running on it (pid {running['pid']})"] if running else [])


def _daemon_running(root: DataRoot) -> dict | None:
    info = root.daemon_info()
    return info if info and isinstance(info.get("pid"), int) and pid_alive(info["pid"]) else None


def restore(src: Path, root: DataRoot, *, url: str | None = None, force: bool = False) -> RestoreResult:
    """Restore the backup at ``src`` as data root ``root`` (its ledger at ``url``, default SQLite under it)."""
    src = Path(src).expanduser().absolute()
    m = check(src)
    kind = m["ledger"]["kind"]
    url = _resolve(url)
    if kind == "postgresql" and not url:
        raise BackupError("this backup holds a PostgreSQL ledger: pass --ledger-url (or set "
                          f"{URL_ENV}) naming an empty database to restore it into")
    if kind == "sqlite" and url:
        raise BackupError(f"this backup holds a SQLite ledger, restored under the data root; unset {URL_ENV} / "
                          "--ledger-url")
    running = _daemon_running(root)
    if running:
        raise BackupError(f"a daemon is running on {root.root} (pid {running['pid']}); stop it first (SIGTERM), then "
                          "restore (with --force to replace what is there). If no daemon runs there, that pid is "
                          f"another process's: delete {root.root / 'daemon.json'}")
    why = live_reasons(root)
    if why and not force:
        raise BackupError(f"{root.root} is a live data root: {'; '.join(why)}. Restore into a new folder, or pass "
                          "--force to move what is there aside (to .before-restore-TIME/) and restore over it")
    root.root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".restore-", dir=root.root))
    try:
        for rel in m["files"]:
            if rel != PG_DUMP:
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / rel, stage / rel)
        moved = _swap_in(root, stage, m)
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if is_disk_full(exc):
            raise DiskFull(f"the disk is full: the restore to {root.root} did not fit ({free_space(root.root)}); "
                           "what was there is untouched") from exc
        raise
    shutil.rmtree(stage, ignore_errors=True)
    kept, missing = _reclaim_models(root, moved, m)
    for n in m["generations"]:
        make_tree_read_only(root.gen_dir(n))  # as the age-up left them
    for lineage, numbers in m.get("lineage_generations", {}).items():
        for n in numbers:
            make_tree_read_only(root.for_lineage(lineage).gen_dir(n))
    if kind == "postgresql":
        _pg_restore(src / PG_DUMP, url, m["ledger"]["schema"])
    with Ledger.open(root, url) as led:
        head = m["ledger"]["head"]
        if head is not None:
            (root.ledger_dir / HEAD_NAME).unlink(missing_ok=True)  # the backup's copy; the ledger's own is written
            write_head(led.head_path, Head(seq=head["seq"], entry_hash=head["entry_hash"], ledger=led.url))
        served = led.served_generation()
        head_now = read_head(led.head_path)
    return RestoreResult(root=root.root, files=len(m["files"]), head=head_now, served=served, moved_aside=moved,
                         kept=kept, missing=missing)


def _swap_in(root: DataRoot, stage: Path, m: dict) -> Path | None:
    """Move the data root's ledger/ and checkpoints/ aside (if any) and the staged ones into place."""
    moved = None
    for name in ("ledger", "checkpoints", "lineages", TOKENIZER, "daemon.json"):
        if (root.root / name).exists():
            if moved is None:
                moved = root.root / f".before-restore-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
                moved.mkdir()
            (root.root / name).rename(moved / name)
    for name in ("ledger", "checkpoints", "lineages", TOKENIZER):
        if (stage / name).exists():
            (stage / name).rename(root.root / name)
    root.prepare()
    fsync_dir(root.root)
    return moved


def _reclaim_models(root: DataRoot, moved: Path | None, m: dict) -> tuple[list[str], list[str]]:
    """For a backup without models: bring back from the replaced root each weight file that hashes as recorded."""
    kept, missing = [], []
    for rel, digest in sorted(m.get("left_out", {}).items()):
        old = moved / rel if moved else None
        if old is not None and old.is_file() and digest and sha256_file(old) == digest:
            (root.root / rel).parent.chmod(0o755)
            shutil.copy2(old, root.root / rel)
            kept.append(rel)
        else:
            missing.append(rel)
    return kept, missing


def _pg_restore(dump: Path, url: str, schema: str) -> None:
    """``pg_restore`` into ``url``'s database, which must not hold a ledger yet (nothing there is dropped).

    The tables go into the schema they were dumped from (normally ``public``); when that schema
    already exists there (``public`` in a new database does), the dump's ``CREATE SCHEMA`` is skipped.
    """
    from sqlalchemy import create_engine, inspect, text

    shown = make_url(url).render_as_string(hide_password=True)
    engine = create_engine(make_url(url).set(drivername="postgresql+psycopg"))
    try:
        if inspect(engine).has_table("ledger_entries", schema=schema):
            raise BackupError(f"the database {shown} already holds a ledger in schema {schema}; restore a PostgreSQL "
                              "backup into a new, empty database")
        with engine.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_namespace WHERE nspname = :s"), {"s": schema}).first()
    finally:
        engine.dispose()
    try:
        listing = subprocess.run(["pg_restore", "--list", str(dump)], capture_output=True, text=True, check=True).stdout
        skip = (f"SCHEMA - {schema} ", f"COMMENT - SCHEMA {schema} ")
        keep = [line for line in listing.splitlines() if not (exists and any(k in line for k in skip))]
        with tempfile.NamedTemporaryFile("w", suffix=".toc", delete=False) as f:
            f.write("\n".join(keep) + "\n")
        r = subprocess.run(["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error", "--use-list", f.name,
                            "--dbname", _libpq_url(url), str(dump)], capture_output=True, text=True, check=False)
        Path(f.name).unlink(missing_ok=True)
    except FileNotFoundError:
        raise BackupError("pg_restore is not installed: install the PostgreSQL client tools") from None
    except subprocess.CalledProcessError as exc:
        raise BackupError(f"pg_restore cannot read {dump}: {exc.stderr.strip()}") from None
    if r.returncode != 0:
        raise BackupError(f"pg_restore into {shown} failed: {r.stderr.strip()}")
