"""What the dashboard shows, as JSON-ready dicts read from one data root and its ledger.

Read-only: nothing here writes the ledger or a file. The daemon's server and `evolve ui` both
build a ``View`` over the same ``DataRoot``, ``Ledger`` and ``Intake`` the rest of the package uses,
so the pages show exactly what `evolve ledger`, `evolve ledger show N` and `evolve experiences`
print (the live panel is ``evolution.status``'s, as `evolve status`).
Strings are returned as stored (chat text is untrusted input); the browser code puts them in the
page as text, never as markup.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from evolution.intake import Intake
from evolution.ledger import Ledger
from evolution.ledger import events as ev
from evolution.ledger.lineage import gate_rows
from evolution.paths import DataRoot

log = logging.getLogger(__name__)

REPLY_METRICS = ("recall", "generalization", "probe_recall")
"""Metrics whose details hold per-item replies (``items``: id, question, reply, correct)."""


class View:
    def __init__(self, root: DataRoot, ledger: Ledger, intake: Intake):
        self.root, self.ledger, self.intake = root, ledger, intake

    # -- lineage ----------------------------------------------------------------------------

    def lineage(self) -> dict:
        """Every generation: parent, verdict, status, served marker, metrics with deltas, sha256, size, times."""
        rows = self.ledger.history()
        by_gen = {r.gen: r for r in rows}
        entries = self.ledger.entries()
        sizes, seconds, moved, tasks = {}, {}, {}, {}
        for e in entries:
            if e.kind == ev.EXPORTED and e.gen is not None:
                arts = [a for a in e.payload.get("artifacts", []) if a.get("kind") == "gguf"]
                if arts:
                    sizes[e.gen] = arts[-1].get("size")
                w = e.payload.get("weights")
                if w:
                    moved[e.gen] = (w.get("total") or {}) | {"dominant": w.get("dominant")}
            elif e.kind == ev.TRAINING_FINISHED and e.gen is not None:
                seconds[e.gen] = _stage_seconds(e.payload)
            elif e.kind == ev.TASK_ADAPTER:
                tasks.setdefault(e.gen, {})[e.payload["task"]] = e.payload["verdict"]
        out = []
        for r in rows:
            d = r.to_dict()
            metrics = {k: _value(v) for k, v in r.metrics.items()}
            parent = by_gen.get(r.parent) if r.parent is not None else None
            pm = {k: _value(v) for k, v in parent.metrics.items()} if parent else {}
            d["metrics"] = metrics
            d["deltas"] = {k: v - pm[k] for k, v in metrics.items()
                           if isinstance(v, (int, float)) and isinstance(pm.get(k), (int, float))}
            d["gguf_size"] = sizes.get(r.gen)
            d["weights"] = moved.get(r.gen)  # the whole model's change against its parent and generation 0
            d["tasks"] = tasks.get(r.gen, {})  # task -> its adapter's verdict on this generation
            d["stage_seconds"] = seconds.get(r.gen) or self._generation_json(r.gen).get("stage_seconds")
            d["rollback_target"] = not r.served and (r.verdict == ev.PASS or (r.gen == 0 and r.parent is None)) \
                and r.gguf_sha256 is not None and r.pruned != ev.PRUNE_GENERATION
            out.append(d)
        return {"served": self.ledger.served_generation(), "ledger": self.ledger.url, "generations": out,
                "data_root": str(self.root.root)}

    # -- one generation ---------------------------------------------------------------------

    def generation(self, n: int) -> dict:
        """``evolve ledger show N`` plus the gate's rows, the failed rules, both models' replies and losses.

        Raises ``UnknownGeneration`` for a generation the ledger does not have."""
        d = self.ledger.generation(n)
        out = d.to_dict()
        out["gate_rows"] = gate_rows(d.gate) if d.gate else []
        out["failed"] = [c for c in (d.gate or {}).get("checks") or [] if c.get("passed") is False]
        out["reasons"] = (d.gate or {}).get("reasons") or []
        report = self._eval_report(n)
        out["replies"] = _replies(report)
        out["style"] = _style(report)
        out["losses"] = _losses(d.training)
        out["generation_json"] = self._generation_json(n)
        out["tasks"] = [e.payload for e in d.events if e.kind == ev.TASK_ADAPTER and e.gen == n]
        return out

    def _eval_report(self, n: int) -> dict:
        path = self.root.gen_dir(n) / "eval.json"
        return _read_json(path)

    def _generation_json(self, n: int) -> dict:
        return _read_json(self.root.gen_dir(n) / "generation.json")

    # -- live ---------------------------------------------------------------------------------

    def verify(self, artifacts: bool = False) -> dict:
        """``evolve ledger verify`` (chain and head; artifacts re-hashed only when asked: it reads every GGUF)."""
        return self.ledger.verify(artifacts=artifacts).to_dict()

    # -- experience ---------------------------------------------------------------------------

    def experience(self, limit: int = 30) -> dict:
        """Recent captured chats and posted conversations, newest first, with their labels."""
        chats = [e.to_dict() for e in self.intake.experiences.list(limit=limit)]
        convs = self.intake.conversations.recent(limit)
        return {"experiences": chats, "conversations": convs}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("dashboard: cannot read %s: %s", path, exc)
        return {}


def _value(v):
    return v.get("child") if isinstance(v, dict) and "child" in v else v


def _stage_seconds(training: dict) -> dict:
    return {name: st.get("seconds") for name, st in (training.get("stages") or {}).items()
            if isinstance(st, dict) and st.get("seconds") is not None}


def _replies(report: dict) -> list[dict]:
    """Per item, child's and parent's replies side by side: ``{metric, id, question, child, parent}``."""
    child = (report.get("child") or {}).get("details") or {}
    parent = (report.get("parent") or {}).get("details") or {}
    out = []
    for metric in REPLY_METRICS:
        p_items = {i.get("id"): i for i in (parent.get(metric) or {}).get("items") or []}
        for item in (child.get(metric) or {}).get("items") or []:
            p = p_items.get(item.get("id"))
            out.append({"metric": metric, "id": item.get("id"), "question": item.get("question"),
                        "child": {"reply": item.get("reply"), "correct": item.get("correct")},
                        "parent": None if p is None else {"reply": p.get("reply"), "correct": p.get("correct")}})
    return out


def _style(report: dict) -> list[dict]:
    child = ((report.get("child") or {}).get("details") or {}).get("style_drift") or {}
    parent = ((report.get("parent") or {}).get("details") or {}).get("style_drift") or {}
    c, p = child.get("replies") or [], parent.get("replies") or []
    return [{"child": c[i], "parent": p[i] if i < len(p) else None} for i in range(len(c))]


def _losses(training: dict | None) -> dict:
    """Per training stage, the logged loss by step: ``{stage: {"step": [...], "loss": [...]}}``."""
    if not training:
        return {}
    raw = training.get("losses")
    out: dict[str, dict] = {}
    if isinstance(raw, dict):
        for stage, seq in raw.items():
            out[stage] = _series(seq)
    elif isinstance(raw, list):
        for point in raw:
            if isinstance(point, dict):
                stage = point.get("stage", "train")
                s = out.setdefault(stage, {"step": [], "loss": []})
                if point.get("loss") is not None:
                    s["step"].append(point.get("step", len(s["step"])))
                    s["loss"].append(point["loss"])
    return {k: v for k, v in out.items() if v["loss"]}


def _series(seq) -> dict:
    steps, losses = [], []
    for i, p in enumerate(seq or []):
        if isinstance(p, dict):
            if p.get("loss") is not None:
                steps.append(p.get("step", i))
                losses.append(p["loss"])
        elif isinstance(p, (list, tuple)) and len(p) == 2:
            steps.append(p[0])
            losses.append(p[1])
        elif isinstance(p, (int, float)):
            steps.append(i)
            losses.append(p)
    return {"step": steps, "loss": losses}

