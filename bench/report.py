"""What every bench writes beside its figures: the machine, how busy it was, the commit, and a dated report.

A figure taken beside a busy neighbour is not a figure (two busy processes on 2 cores slow each other far more than
twice), so each report says what else ran: ``Contention`` measures the CPU time other processes used during the run.
``write`` puts ``docs/bench/<date>-<name>.md`` (a table to read) and ``.json`` (every number, for a later run to
compare with) in the repository; ``docs/performance.md`` and ``docs/learning.md`` link the reports behind their figures.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REPORTS = Path(os.environ.get("EVOLUTION_BENCH_REPORTS") or REPO / "docs" / "bench")
"""Where reports go: ``docs/bench`` unless ``EVOLUTION_BENCH_REPORTS`` names another directory (a smoke run's)."""


class Contention:
    """How much CPU other processes used meanwhile: a benchmark run beside a busy neighbour is not a figure.

    torch's OpenMP threads wait for each other at every op; one busy process, even at nice 19, costs
    training up to 10x here (measured: SFT 21 instead of 190 tokens/s).
    """

    def __init__(self):
        self.t0 = self._sample()
        self.peak = 0.0
        self._last = self.t0

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        busy, total = sum(cpu) - cpu[3] - cpu[4], sum(cpu)
        # utime, stime, and those of finished children (a benchmark that runs the product as a subprocess)
        own = sum(int(x) for x in Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:15])
        return busy, total, own

    @staticmethod
    def _share(a, b) -> float:
        (b0, t0, o0), (b1, t1, o1) = a, b
        return max(0.0, (b1 - b0) - (o1 - o0)) / max(t1 - t0, 1)

    def tick(self) -> None:
        """Note the other load since the last tick (its peak is reported); call it now and then."""
        now = self._sample()
        self.peak = max(self.peak, self._share(self._last, now))
        self._last = now

    def others(self) -> float:
        """Fraction of the machine's CPU time used by other processes since this object was made."""
        return self._share(self.t0, self._sample())


def machine() -> dict:
    """The machine a figure was taken on."""
    cpu = "unknown"
    flags: set[str] = set()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    mem = 0
    if Path("/proc/meminfo").is_file():
        mem = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) // 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mib": mem, "python": platform.python_version(),
            "bf16": bool({"avx512_bf16", "amx_bf16"} & flags), "amx": "amx_tile" in flags,
            "load_avg_at_start": list(os.getloadavg())}


def commit() -> str:
    """The commit measured (with '+dirty' when the work tree had changes)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write(name: str, title: str, body: list[str], data: dict, contention: Contention | None = None,
          started: float | None = None, out: Path = REPORTS) -> Path:
    """``docs/bench/<date>-<name>.md`` and ``.json``: the machine, the other load, the commit, then ``body``
    (Markdown lines: the table, the baseline measured in the same run) and ``data`` (every number). Returns the
    Markdown file's path."""
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    meta = {"bench": name, "date": now.isoformat(timespec="seconds"), "commit": commit(), "machine": machine(),
            "wall_s": round(time.time() - started, 1) if started else None}
    if contention is not None:
        contention.tick()  # the interval since the last tick counts toward the peak (a bench that never ticked)
        meta["other_load"] = {"mean": round(contention.others(), 3), "peak": round(contention.peak, 3)}
    stem = out / f"{now:%Y-%m-%d}-{name}"
    stem.with_suffix(".json").write_text(json.dumps(meta | {"results": data}, indent=1, ensure_ascii=False) + "\n")
    m = meta["machine"]
    load = meta.get("other_load")
    head = [f"# {title}", "",
            f"- date: {meta['date']}; commit `{meta['commit']}`; wall time {meta['wall_s']} s",
            f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_mib']} MiB, native bf16: {m['bf16']}",
            "- other load (share of the machine's CPU used by other processes): "
            + (f"mean {load['mean']:.1%}, peak {load['peak']:.1%}" if load else "not measured"),
            f"- every number: `{stem.name}.json`", ""]
    stem.with_suffix(".md").write_text("\n".join(head + body) + "\n")
    return stem.with_suffix(".md")
