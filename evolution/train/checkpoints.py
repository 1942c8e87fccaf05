"""Checkpoints and finished adapters we can trust: SHA-256 ``COMPLETE`` markers, resume, rejection.

A checkpoint counts only once the trainer has finished writing it: ``mark_complete`` (called
from ``on_save``) drops a ``COMPLETE`` marker holding the SHA-256 of every file of it, so after
a kill -9 the next run resumes from the last complete one. A complete checkpoint whose files
changed since (a flipped bit, a tampered optimizer state) is moved aside to ``<stage>/rejected/``
and the one before it is used. A finished stage leaves ``<stage>/adapter`` plus
``<stage>/metrics.json`` with the adapter's hashes; it is trusted only while they still match.

Nothing is unpickled from disk: weights are safetensors, and the trainer's optimizer, scheduler
and RNG states go through ``torch.load(weights_only=True)``, forced by ``weights_only_loads``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from evolution.fsutil import atomic_write_json, fsync_dir, sha256_tree, tree_mismatches
from evolution.train.stage import StageMetrics

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"


def reject(path: Path, why: str) -> None:
    """Move a checkpoint or adapter that failed its check to ``<stage>/rejected/`` (kept for a post-mortem)."""
    dest = path.parent / "rejected" / f"{path.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    dest.parent.mkdir(exist_ok=True)
    log.warning("rejecting %s: %s; moved to %s", path, why, dest)
    path.rename(dest)


def mark_complete(ckpt: Path, step: int) -> None:
    """Record that the trainer finished writing ``ckpt``, with the hash of every file in it."""
    from evolution import faults

    faults.point("checkpoint_save")  # test hook (evolution/faults.py): written, not yet marked complete
    atomic_write_json(ckpt / COMPLETE, {"step": step, "sha256": sha256_tree(ckpt, skip=frozenset({COMPLETE}))})


def checkpoint_problems(ckpt: Path) -> list[str]:
    """Why the checkpoint ``ckpt`` (marked complete) cannot be trusted; empty if it can."""
    try:
        marker = json.loads((ckpt / COMPLETE).read_text())
    except (ValueError, UnicodeDecodeError):
        return [f"{COMPLETE} marker is not the JSON this version writes"]
    if not isinstance(marker, dict) or not isinstance(marker.get("sha256"), dict):
        return [f"{COMPLETE} marker has no file hashes"]
    return tree_mismatches(ckpt, marker["sha256"], skip=frozenset({COMPLETE}))


def last_complete_checkpoint(stage_dir: Path) -> Path | None:
    """The highest checkpoint the trainer finished writing whose files still hash as written.

    Incomplete checkpoints (a kill while saving) are removed; complete ones whose files changed
    since are moved aside to ``<stage>/rejected/``, and the one before them is used.
    """
    complete = []
    for ckpt in sorted(stage_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        if (ckpt / COMPLETE).is_file():
            complete.append(ckpt)
        else:
            log.warning("removing incomplete checkpoint %s (interrupted while saving)", ckpt)
            shutil.rmtree(ckpt, ignore_errors=True)
    for ckpt in reversed(complete):
        problems = checkpoint_problems(ckpt)
        if not problems:
            return ckpt
        reject(ckpt, "its files changed after it was saved (" + "; ".join(problems[:5]) + ")")
    return None


def save_adapter(model, stage_dir: Path, metrics: StageMetrics, backend: str) -> None:
    """Write ``<stage>/adapter`` beside, then rename (a half-saved adapter never looks finished); then
    ``metrics.json`` with the adapter's hashes, which marks the stage finished."""
    tmp = stage_dir / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    fsync_dir(tmp)
    shutil.rmtree(stage_dir / "adapter", ignore_errors=True)  # left by a crash before metrics.json
    tmp.rename(stage_dir / "adapter")
    atomic_write_json(stage_dir / "metrics.json",
                      asdict(metrics) | {"backend": backend, "adapter_sha256": sha256_tree(stage_dir / "adapter")})


def finished(stage_dir: Path) -> StageMetrics | None:
    """The metrics of a finished stage whose adapter is as it was written; None to (re)run it."""
    if not ((stage_dir / "metrics.json").is_file() and (stage_dir / "adapter").is_dir()):
        return None
    d = json.loads((stage_dir / "metrics.json").read_text())
    d.pop("backend", None)
    hashes = d.pop("adapter_sha256", None)
    problems = tree_mismatches(stage_dir / "adapter", hashes) if isinstance(hashes, dict) else []
    if problems:  # run the stage again, from its last good checkpoint
        reject(stage_dir / "adapter", "it changed after training (" + "; ".join(problems[:5]) + ")")
        (stage_dir / "metrics.json").unlink()
        return None
    m = StageMetrics(**d)
    m.skipped = True
    return m


@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside refuses pickled code, whatever its caller passes or the environment says.

    Resuming loads the trainer's optimizer, scheduler and RNG states with ``torch.load``; a
    checkpoint is a file on disk, so it gets no more trust than one.
    """
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
