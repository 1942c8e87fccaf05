"""What a finished generation directory says about itself: ``generation.json``, typed.

``GenerationSummary`` is written once, when a generation is complete (``ageup``), and read by
everything that acts on a built generation without re-deriving it: promotion, the daemon, the
CLI's summary and the next age-up's ETA. The ledger's own view of a generation (folded from its
events) is ``evolution.ledger.lineage.GenerationRow``; this file is the one on disk.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from evolution.errors import IntegrityError
from evolution.export import Artifact
from evolution.fsutil import sha256_file

SUMMARY_FILE = "generation.json"
HELDOUT_FILE = "preference_heldout.jsonl"
"""In ``data/``: rated replies held out of every training stage, for the gate's ``preference_margin``."""


@dataclass
class GenerationSummary:
    """The typed result of building a generation: what the ledger, gate and daemon consume."""

    gen: int
    parent: int | None
    base: str
    gen_dir: str
    gguf: Artifact
    artifacts: list[Artifact]
    quantization: str
    config_hash: str
    manifest_hash: str | None
    stage_seconds: dict[str, float]
    train: dict | None
    smoke: dict
    created_at: str
    resumed: bool = False
    gate: dict | None = None
    """verdict, reasons, metrics, parent_metrics, thresholds ("measured" for generation 0)."""
    weights: dict | None = None
    """How the weights moved against the parent and generation 0, per layer (``evolution.weights``); None for
    generation 0 and for a generation built before it was measured."""
    tasks: dict | None = None
    """Task -> what the ``tasks`` stage did for it (``evolution.tasks.TaskOutcome``); None without ``[tasks]``."""

    @property
    def verdict(self) -> str | None:
        return (self.gate or {}).get("verdict")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, gen_dir: Path) -> "GenerationSummary":
        d = json.loads((gen_dir / SUMMARY_FILE).read_text())
        d["gguf"] = Artifact(**d["gguf"])
        d["artifacts"] = [Artifact(**a) for a in d["artifacts"]]
        return cls(**d)

    def check_files(self, gen_dir: Path) -> None:
        """Re-hash every artifact against this summary; raise IntegrityError on the first mismatch."""
        for a in self.artifacts:
            if sha256_file(gen_dir / a.path) != a.sha256:
                raise IntegrityError(f"{gen_dir / a.path} does not match its {SUMMARY_FILE}; the generation was "
                                     "changed after it was built — move it aside to continue")
