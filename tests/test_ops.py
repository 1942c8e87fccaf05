"""Operations: size-bounded rotating logs of the daemon and its worker, the systemd unit, ``GET /metrics``.

The SIGTERM contract the unit relies on (a real ``run_daemon.py`` stops with exit 0, its worker at a
checkpoint, nothing half-written) is ``tests/test_daemon.py::test_sigterm_during_training_writes_a_checkpoint_and_exits_0``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from evolution import config, logsetup
from evolution.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _sizes(folder: Path, name: str) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.glob(name + "*")}


def test_the_daemon_log_rotates_and_its_files_stay_within_the_bound(tmp_path):
    path = tmp_path / "logs" / "daemon.log"
    handler = logsetup.to_file(path, max_bytes=4096, backups=2)
    log = logging.getLogger("evolution.test_ops")
    try:
        for i in range(400):  # ~40 KB: ten times the bound of one file
            log.warning("line %04d %s", i, "x" * 60)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    sizes = _sizes(path.parent, "daemon.log")
    assert set(sizes) == {"daemon.log", "daemon.log.1", "daemon.log.2"}, sizes  # the oldest were dropped
    assert all(s <= 4096 for s in sizes.values()) and sum(sizes.values()) <= 3 * 4096
    assert "line 0399" in path.read_text() and "line 0000" not in "".join(
        (path.parent / n).read_text() for n in sizes)


def test_the_worker_output_is_copied_into_a_rotating_log(tmp_path):
    from evolution.daemon import workers

    path = tmp_path / "logs" / "worker.log"
    script = "import sys\nfor i in range(2000): print(f'line {i:04d} ' + 'y' * 70)\nsys.exit(3)"
    proc, pump = workers.spawn_logged([sys.executable, "-c", script], {}, path, max_bytes=16_384, backups=2)
    w = workers.Worker(proc, None, False, path, pump)
    proc.wait(60)
    assert w.finished() and w.code == 3
    sizes = _sizes(path.parent, "worker.log")
    assert set(sizes) == {"worker.log", "worker.log.1", "worker.log.2"}, sizes
    assert sum(sizes.values()) <= 3 * 16_384
    assert w.tail(1).startswith("line 1999 ")  # every line reached the file before the worker was collected


@pytest.mark.parametrize("field,value,message", [
    ("log_backups", 0, "daemon.log_backups must be an integer from 1 to 100"),
    ("log_max_bytes", 100, "daemon.log_max_bytes must be an integer of at least 4096"),
])
def test_log_bounds_are_validated(field, value, message):
    with pytest.raises(ConfigError, match=message):
        config.resolve_daemon(None, {field: value})


def test_default_log_bound_is_tens_of_megabytes():
    d = config.DaemonConfig()
    assert (d.log_backups + 1) * d.log_max_bytes <= 64 * 2**20
