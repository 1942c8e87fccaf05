"""Where things live on disk: the data root and the generation directories.

Everything the project writes lives under one data root: ``$EVOLUTION_HOME`` when set,
otherwise the repository itself (its ``checkpoints/`` and ``ledger/`` folders).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GEN_RE = re.compile(r"^gen_(\d{4,})$")


def gen_name(n: int) -> str:
    return f"gen_{n:04d}"


@dataclass(frozen=True)
class DataRoot:
    """The folders under one data root."""

    root: Path

    @classmethod
    def from_env(cls, override: str | os.PathLike | None = None) -> "DataRoot":
        if override is not None:
            return cls(Path(override).expanduser().resolve())
        env = os.environ.get("EVOLUTION_HOME")
        return cls(Path(env).expanduser().resolve() if env else REPO_ROOT)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def ledger_dir(self) -> Path:
        return self.root / "ledger"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def gen_dir(self, n: int) -> Path:
        return self.checkpoints / gen_name(n)

    def staging_dir(self, n: int) -> Path:
        """Where generation ``n`` is built; renamed to ``gen_dir(n)`` only when complete."""
        return self.checkpoints / f"{gen_name(n)}.partial"

    def generations(self) -> list[int]:
        """Numbers of the complete generation directories, ascending."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for p in self.checkpoints.iterdir():
            m = GEN_RE.match(p.name)
            if m and p.is_dir():
                found.append(int(m.group(1)))
        return sorted(found)
