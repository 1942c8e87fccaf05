"""The reliability suite's shared pieces: the tally of its figures, and data roots built once.

``tally`` counts, per area, the trials run, the faults injected and survived (every check after
the fault passed), the bad inputs tried and the data lost. ``pytest_terminal_summary`` prints
it as the table the README shows; with ``EVOLUTION_RELIABILITY_REPORT=PATH`` it is also written
there as JSON. A fault counts as survived only when the block that injected it finished without
a failed assertion, and a test records the data it lost before it asserts that none was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from tests.conftest import make_daemon_cfg, make_tiny_cfg, make_tiny_curriculum

REPORT_ENV = "EVOLUTION_RELIABILITY_REPORT"


@dataclass
class Row:
    trials: int = 0
    faults: int = 0
    survived: int = 0
    bad_inputs: int = 0
    lost: int = 0


class Tally:
    """What the suite did and what it cost, by area (``"kill -9 · checkpoint save"``, …)."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.started = time.time()

    def row(self, area: str) -> Row:
        return self.rows.setdefault(area, Row())

    @contextlib.contextmanager
    def fault(self, area: str, n: int = 1):
        """One trial that injects ``n`` faults; they count as survived if the block ends without an error."""
        row = self.row(area)
        row.trials += 1
        row.faults += n
        yield
        row.survived += n

    def bad_input(self, area: str, n: int = 1) -> None:
        row = self.row(area)
        row.trials += 1
        row.bad_inputs += n

    def trial(self, area: str) -> None:
        self.row(area).trials += 1

    def lost(self, area: str, n: int) -> None:
        self.row(area).lost += n

    def total(self) -> Row:
        t = Row()
        for r in self.rows.values():
            for k, v in asdict(r).items():
                setattr(t, k, getattr(t, k) + v)
        return t

    def table(self) -> str:
        head = ("area", "trials", "faults injected", "faults survived", "bad inputs", "data lost")
        rows = [(a, *asdict(r).values()) for a, r in sorted(self.rows.items())]
        rows.append(("total", *asdict(self.total()).values()))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]

        def line(cells) -> str:
            return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

        return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])

    def to_dict(self) -> dict:
        return {"wall_s": round(time.time() - self.started, 1), "areas": {a: asdict(r) for a, r in self.rows.items()},
                "total": asdict(self.total())}


TALLY = Tally()


@pytest.fixture(scope="session")
def tally() -> Tally:
    return TALLY


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not TALLY.rows:
        return
    terminalreporter.write_sep("=", "reliability figures")
    terminalreporter.write_line(TALLY.table())
    terminalreporter.write_line(f"wall time {time.time() - TALLY.started:.0f} s")
    if os.environ.get(REPORT_ENV):
        Path(os.environ[REPORT_ENV]).write_text(json.dumps(TALLY.to_dict(), indent=2) + "\n")
        terminalreporter.write_line(f"written to {os.environ[REPORT_ENV]}")


# -- data roots built once for the whole suite ---------------------------------------------------


def daemon_config_file(tmp_path: Path, cfg) -> Path:
    """``cfg`` (an ``AgeUpConfig``) as the TOML file ``run_daemon.py --config`` reads, polling fast."""
    from tests.conftest import toml_of

    d = cfg.to_dict()
    d.pop("quick")
    d["daemon"] = {"poll_seconds": 0.3}
    path = tmp_path / "evolution-test.toml"
    path.write_text(toml_of(d))
    return path


def copy_root(src: Path, dst: Path) -> Path:
    """A writable copy of a data root (finished generations are read-only; the copy keeps their modes)."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def gen0(tmp_path_factory, taught_base):
    """A data root serving generation 0 of ``taught_base`` (measured, promoted), and its age-up config."""
    from evolution import ageup
    from evolution.ledger import Ledger
    from evolution.paths import DataRoot

    home = tmp_path_factory.mktemp("gen0")
    cfg = make_daemon_cfg(make_tiny_cfg(make_tiny_curriculum(home / "curriculum")))
    root = DataRoot(home / "root")
    with Ledger.open(root.prepare()) as ledger:
        ageup.ensure_generation_zero(root, cfg, ledger, base=taught_base)
        assert ledger.served_generation() == 0
    return root, cfg


@pytest.fixture(scope="session")
def lineage(tmp_path_factory, gen0):
    """``tests/conftest.py``'s lineage (generation 1 promoted over 0), built once for this whole suite."""
    from tests.lineage_util import grow
    from evolution.ledger import Ledger
    from evolution.paths import DataRoot

    src, cfg = gen0
    root = DataRoot(copy_root(src.root, tmp_path_factory.mktemp("lineage") / "root"))
    with Ledger.open(root) as ledger:
        grow(root, cfg, ledger)
        assert ledger.served_generation() == 1
    return root, cfg


def evolve(root, *args: str, spec: str | None = None) -> subprocess.CompletedProcess:
    """``evolve ARGS`` as its own process on the data root ``root``, with ``EVOLUTION_FAULTS=spec`` if given."""
    from evolution import faults

    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != faults.ENV} | {"EVOLUTION_HOME": str(root.root),
                                                                       "PYTHONPATH": str(repo)}
    if spec:
        env[faults.ENV] = spec
    return subprocess.run([sys.executable, "-c", "from evolution.cli import main; main()", *args], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def tmpfs(path: Path, size: str) -> Path:
    """Mount a ``size``-limited tmpfs at ``path`` (a real disk that fills up); skip if not permitted (fail under
    ``EVOLUTION_REQUIRE_TMPFS=1``)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        why = (f"a size-limited filesystem needs `mount -t tmpfs` (root); it failed: {r.stderr.strip()[:200]}; "
               "the injected-ENOSPC tests cover the same code paths")
        if os.environ.get("EVOLUTION_REQUIRE_TMPFS") == "1":  # set by .ci/run: CI must not pass by skipping
            pytest.fail(f"tmpfs required but {why}")
        pytest.skip(why)
    return path


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size)``: a fresh size-limited filesystem, unmounted after the test."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        mounted.append(tmpfs(tmp_path / f"disk{len(mounted)}", size))
        return mounted[-1]

    yield make
    for m in mounted:
        umount(m)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` with one file until only ``leave`` bytes are free; delete the file to free the space."""
    filler = disk / "filler.bin"
    free = shutil.disk_usage(disk).free - leave
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 20)
        while free > 0:
            try:
                free -= f.write(chunk[: min(len(chunk), free)])
                f.flush()
            except OSError:
                break
    return filler
