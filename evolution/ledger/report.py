"""``evolve report``: a PNG of the gate metrics across generations, with the lineage's fate marked.

One panel per gate metric (the child's value at each gated generation; a threshold that is a
plain number is drawn as a dashed line) under a strip showing every generation's status:
served, promoted/passed, rejected/failed, rolled back. Drawn with matplotlib's Agg canvas
directly, so it needs no display and leaves pyplot's global state alone.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from evolution.errors import LedgerError
from evolution.ledger import events as ev
from evolution.ledger.lineage import GenerationRow
from evolution.ledger.store import Ledger

log = logging.getLogger(__name__)

# status -> (legend label, marker, colour)
_STYLE = {
    "promoted": ("promoted / passed", "o", "tab:green"),
    "passed": ("promoted / passed", "o", "tab:green"),
    "rejected": ("rejected / failed", "X", "tab:red"),
    "failed": ("rejected / failed", "X", "tab:red"),
    "rolled_back": ("rolled back", "v", "tab:orange"),
}
_PENDING = ("not gated yet", ".", "tab:gray")
_SERVED = ("served", "*", "gold")


def _value(v) -> float | None:
    """A metric's number: plain, or the ``child`` field of ``{"child": .., "parent": ..}``."""
    if isinstance(v, dict):
        v = v.get("child")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _thresholds(ledger: Ledger) -> dict[str, float]:
    """Each metric's latest absolute threshold: from the checks the gate recorded (one per rule of its metric
    table), or, in an entry from before the table, a threshold recorded under the metric's own name."""
    found = {}
    for g in ledger.entries(kind=ev.GATE_RESULT):
        checks = g.payload.get("checks")
        if checks is None:
            pairs = g.payload.get("thresholds", {}).items()
        else:
            pairs = [(c["metric"], c.get("limit")) for c in checks]
        for name, t in pairs:
            if _value(t) is not None:
                found[name] = _value(t)
    return found


def render(ledger: Ledger, out: Path, *, dpi: int = 120) -> Path:
    """Draw the report of ``ledger`` into the PNG ``out``; return its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows: list[GenerationRow] = ledger.history()
    if not rows:
        raise LedgerError("the ledger is empty: nothing to plot yet (run an age-up first)")
    names = sorted({k for r in rows for k, v in r.metrics.items() if _value(v) is not None})
    thresholds = _thresholds(ledger)
    gens = [r.gen for r in rows]

    fig = Figure(figsize=(max(6.0, 0.45 * len(gens) + 3), 1.6 + 2.2 * max(1, len(names))), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1 + len(names), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": [0.6] + [2] * len(names)})[:, 0]

    strip = axes[0]
    seen = set()
    for r in rows:
        label, marker, colour = _STYLE.get(r.status, _PENDING)
        strip.scatter([r.gen], [0], marker=marker, color=colour, s=80, label=None if label in seen else label, zorder=3)
        seen.add(label)
        if r.parent is not None:
            strip.annotate("", xy=(r.gen, 0), xytext=(r.parent, 0),
                           arrowprops={"arrowstyle": "->", "color": "0.6",
                                       "connectionstyle": f"arc3,rad={0.3 / max(1, abs(r.gen - r.parent))}"})
        if r.served:
            strip.scatter([r.gen], [0.45], marker=_SERVED[1], color=_SERVED[2], edgecolors="k", s=160,
                          label=_SERVED[0], zorder=4)
    strip.set_ylim(-1.0, 0.9)  # parent -> child arcs bend below the markers
    strip.set_yticks([])
    strip.set_ylabel("lineage", fontsize=8)
    fig.suptitle(f"{len(rows)} generation(s) — {ledger.url}", fontsize=9)
    fig.legend(*strip.get_legend_handles_labels(), loc="outside lower center", fontsize=8, ncols=5, frameon=False)

    for ax, name in zip(axes[1:], names, strict=True):
        pts = [(r.gen, _value(r.metrics.get(name)), r) for r in rows if _value(r.metrics.get(name)) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="0.5", lw=1, zorder=1)
        for g, y, r in pts:
            _, marker, colour = _STYLE.get(r.status, _PENDING)
            ax.scatter([g], [y], marker=marker, color=colour, s=50, zorder=3)
            if r.served:
                ax.scatter([g], [y], marker="o", facecolors="none", edgecolors="gold", s=220, linewidths=2, zorder=4)
        if name in thresholds:
            ax.axhline(thresholds[name], ls="--", color="tab:red", lw=1, alpha=0.6)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    if not names:
        strip.text(0.5, -0.4, "no gate metrics recorded yet", transform=strip.get_yaxis_transform(),
                   ha="center", fontsize=8)
    axes[-1].set_xlabel("generation")
    axes[-1].set_xticks(gens)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    log.info("ledger: report written to %s", out)
    return out
