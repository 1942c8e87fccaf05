"""Where things live on disk: the data root and the generation directories.

Everything the project writes lives under one data root: ``$EVOLUTION_HOME`` when set,
otherwise the repository itself (its ``checkpoints/`` and ``ledger/`` folders).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
GEN_RE = re.compile(r"^gen_(\d{4,})$")
PARTIAL_RE = re.compile(r"^gen_(\d{4,})\.partial$")


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

    def prepare(self) -> "DataRoot":
        """Create the data root's folders, or say clearly why it cannot be used."""
        from evolution.errors import ConfigError

        try:
            for d in (self.checkpoints, self.ledger_dir):
                d.mkdir(parents=True, exist_ok=True)
                probe = d / ".write-test"
                probe.write_bytes(b"")
                probe.unlink()
        except OSError as exc:
            raise ConfigError([
                f"data root {self.root} is not usable ({exc.strerror}: {exc.filename}); set EVOLUTION_HOME "
                "to a writable directory, or unset it to use the repository's checkpoints/ and ledger/"
            ]) from None
        return self

    def existing(self) -> "DataRoot":
        """``prepare`` for commands that read or add to a lineage: a data root that does not exist is a
        mistake (a typo in ``EVOLUTION_HOME``), not a new one to create and report as empty."""
        from evolution.errors import ConfigError

        if not self.root.exists():
            raise ConfigError([
                f"data root {self.root} does not exist: check EVOLUTION_HOME (a typo?), or unset it to use "
                "the repository's checkpoints/ and ledger/; `evolve age-up` or the daemon creates a new one"
            ])
        return self.prepare()

    @property
    def ageup_lock(self) -> Path:
        return self.checkpoints / ".ageup.lock"

    @contextlib.contextmanager
    def exclusive(self, busy: str) -> Iterator[None]:
        """Hold the lock under which generations change (an age-up, a prune): one at a time per data root.

        An OS file lock, released even if the process dies; ``busy`` is the error's message when it is held."""
        from evolution.errors import EvolutionError
        from evolution.fsutil import try_lock

        self.checkpoints.mkdir(parents=True, exist_ok=True)
        lock = try_lock(self.ageup_lock)
        if lock is None:
            raise EvolutionError(f"{busy} (lock {self.ageup_lock})")
        try:
            yield
        finally:
            lock.release()

    def gen_dir(self, n: int) -> Path:
        return self.checkpoints / gen_name(n)

    def staging_dir(self, n: int) -> Path:
        """Where generation ``n`` is built; renamed to ``gen_dir(n)`` only when complete."""
        return self.checkpoints / f"{gen_name(n)}.partial"

    def _numbered(self, pattern: re.Pattern) -> list[int]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.checkpoints.iterdir() if (m := pattern.match(p.name)) and p.is_dir())

    def generations(self) -> list[int]:
        """Numbers of the complete generation directories, ascending."""
        return self._numbered(GEN_RE)

    def partial_generations(self) -> list[int]:
        """Numbers of generations under construction (``gen_NNNN.partial/``), ascending."""
        return self._numbered(PARTIAL_RE)
