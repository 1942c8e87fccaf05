"""Durable file operations: atomic writes, hashing, read-only finishing."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

_CHUNK = 1 << 20
_FULL = ("No space left on device", "database or disk is full", "Disk quota exceeded", "StorageFull")
"""How a full disk reads where no errno survives: OSError, SQLite, PostgreSQL, safetensors (Rust)."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(root: str | os.PathLike, skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """SHA-256 of every file under ``root`` by POSIX path relative to it (names in ``skip`` left out)."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in skip
    }


def tree_mismatches(root: str | os.PathLike, expected: dict[str, str], skip: frozenset[str] = frozenset()) -> list[str]:
    """What differs between the files under ``root`` and ``expected`` (from ``sha256_tree``); empty if none."""
    actual = sha256_tree(root, skip)
    problems = [f"{name}: missing" for name in sorted(expected.keys() - actual.keys())]
    problems += [f"{name}: not in the manifest" for name in sorted(actual.keys() - expected.keys())]
    problems += [f"{name}: SHA-256 differs" for name in sorted(expected.keys() & actual.keys())
                 if expected[name] != actual[name]]
    return problems


def fd_path(fd: int, path: str | os.PathLike) -> Path:
    """The name that opens exactly the file open as ``fd`` (``/proc/self/fd/N`` on Linux: even if ``path`` was
    replaced since), else ``path``."""
    proc = Path(f"/proc/self/fd/{fd}")
    return proc if proc.exists() else Path(path)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    ``sync_dir=False`` skips fsyncing the folder: the rename may then be lost in a power cut
    (the old file stays), for writers that can tolerate that and care about latency.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; match the other files of a generation
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, *, sync_dir: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), sync_dir=sync_dir)


def atomic_write_json(path: str | os.PathLike, obj, *, sync_dir: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", sync_dir=sync_dir)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def make_tree_read_only(root: str | os.PathLike) -> None:
    """Drop every write bit below ``root`` (files and folders), so a finished generation stays as gated."""
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = Path(dirpath) / name
            mode = p.stat().st_mode
            p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        d = Path(dirpath)
        d.chmod(d.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def make_tree_writable(root: str | os.PathLike) -> None:
    """Undo ``make_tree_read_only`` (used only when removing a staging copy)."""
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        d.chmod(d.stat().st_mode | stat.S_IWUSR)
        for name in filenames:
            p = Path(dirpath) / name
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from, is a full disk or quota (ENOSPC / EDQUOT)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(marker in str(exc) for marker in _FULL):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def nearly_full(path: str | os.PathLike, below: int = 16 << 20) -> bool:
    """Whether the disk that holds ``path`` has less than ``below`` bytes free (16 MiB: no age-up fits)."""
    try:
        return shutil.disk_usage(path).free < below
    except OSError:
        return False


def free_space(path: str | os.PathLike) -> str:
    """``"1.2 MiB free of 200.0 MiB on the disk that holds PATH"``, for error messages."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return f"free space on the disk that holds {path} unknown"
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB on the disk that holds {path}"


def try_lock(path: str | os.PathLike):
    """An OS file lock on ``path``, taken now (released by the kernel if the process dies), or None when another
    process holds it. The caller releases it, and says what a held lock means."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock
