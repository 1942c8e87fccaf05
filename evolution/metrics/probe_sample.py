"""Which probes a gate asks, so that the gate does not grow with the lineage's age.

Every probe posted (``POST /probes``) used to be asked at every later gate: about 0.27 s a probe on
2 cores, so a lineage with 1,000 probes spent four and a half minutes on them at each age-up, and
more with every one posted. A gate now asks (``choose``):

1. every probe no gate of the lineage has asked yet (posted since: the facts just taught, the
   point of the gate);
2. every probe the last ``probe_every - 1`` gates of the lineage did not ask, so that no probe is
   silently retired: in any ``probe_every`` consecutive generations of a lineage each probe is
   asked at least once;
3. up to ``probe_sample`` probes in all (or ``posted / probe_every``, whichever is more, so the
   rotation keeps up), drawn from the rest stratified by age (quartiles of the order they were
   posted in) and by the answer at the last gate that asked them (right, wrong): each stratum
   gives its share, the longest unasked first, ties in a seeded order.

Below ``probe_sample`` probes every probe is asked, as before. The lineage's gates are its
generations' ``gate_result`` entries in the ledger: each records which probes it asked and which the
child answered right (``Sample.record``). A gate recorded before this sample existed counts as having
asked none (the next gate asks every probe, as it did then). The parent is asked the same sample
(its replies are remembered, ``evolution.metrics.answers``); the forgetting rule
(``gate.probe_forgotten_max``) then counts on the sample, and ``power`` says how likely the sample
was to catch a child that forgot twice the allowed share.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

STRATA_AGES = 4
"""Age strata: quartiles of the order the probes were posted in."""


@dataclass(frozen=True)
class Asked:
    """What one earlier gate of the lineage asked: probe ids, and those the child answered right."""

    gen: int
    asked: frozenset[str]
    right: frozenset[str]


@dataclass
class Sample:
    items: list[dict]
    """The probes to ask, oldest first (``ProbeStore.items``' format)."""
    posted: int
    new: int
    """Never asked by a gate of the lineage."""
    due: int
    """Not asked by the last ``every - 1`` gates."""
    drawn: int
    every: int

    def record(self, right: Sequence[str], power: dict) -> dict:
        """What the gate's ledger entry keeps: enough for the next gate's ``history``, and the forgetting rule's
        ``power`` on the sample (``power_summary``)."""
        return {"asked": [i["id"] for i in self.items], "right": sorted(right), "posted": self.posted,
                "new": self.new, "due": self.due, "drawn": self.drawn, "every": self.every, "power": power}


def report_lines(rec: dict) -> list[str]:
    """The gate report's lines on the sample (``rec``: ``Sample.record``)."""
    asked, posted, every = len(rec["asked"]), rec["posted"], rec["every"]
    if asked == posted:
        lines = [f"Probes: all {posted} posted were asked."]
    else:
        lines = [f"Probes: {asked} of {posted} posted were asked: {rec['new']} no gate of the lineage had asked, "
                 f"{rec['due']} the last {every - 1} gates had not asked (gate.probe_every), {rec['drawn']} drawn "
                 "by age and last answer (gate.probe_sample)."]
    pw = rec.get("power") or {}
    if pw and asked < posted:
        lines.append(f"The forgetting rule counted on the {pw['known']} asked that the parent answered right: it "
                     f"fails a child that forgot {2 * pw['limit']:.2f} of them with probability "
                     f"{pw['at_twice_limit']:.2f}, and catches 80 % of children from a forgetting rate of "
                     f"{pw['caught_80pct_from']:.2f}.")
    return lines + [""]


def history(gates: Mapping[int, dict | None]) -> list[Asked]:
    """The lineage's gates, oldest first (``gates``: generation -> its ``gate_result`` payload, in lineage order);
    a gate recorded before the sample existed (no ``probes``) asked none that the record can show."""
    out = []
    for gen, payload in gates.items():
        rec = (payload or {}).get("probes") or {}
        out.append(Asked(gen, frozenset(rec.get("asked", ())), frozenset(rec.get("right", ()))))
    return out


def choose(probes: Sequence[dict], past: Sequence[Asked], most: int, every: int, seed: int) -> Sample:
    """The probes a gate asks (see the module's docstring); ``past``: the lineage's gates, oldest first."""
    budget = max(most, math.ceil(len(probes) / every))
    if len(probes) <= budget:
        return Sample(list(probes), len(probes), len(probes), 0, 0, every)
    last: dict[str, int] = {}  # probe id -> index of the newest gate that asked it
    outcome: dict[str, bool] = {}
    for n, gate in enumerate(past):
        for pid in gate.asked:
            last[pid], outcome[pid] = n, pid in gate.right
    recent = len(past) - (every - 1)  # a probe last asked before this gate index is due now
    new = [p for p in probes if p["id"] not in last]
    due = [p for p in probes if p["id"] in last and last[p["id"]] < recent]
    rest = [(i, p) for i, p in enumerate(probes) if p["id"] in last and last[p["id"]] >= recent]
    room = budget - len(new) - len(due)
    drawn: list[dict] = []
    if room > 0 and rest:
        rng = random.Random(seed)
        strata: dict[tuple[int, bool], list[dict]] = {}
        for i, p in rest:
            strata.setdefault((i * STRATA_AGES // len(probes), outcome[p["id"]]), []).append(p)
        for members in strata.values():
            rng.shuffle(members)
            members.sort(key=lambda p: last[p["id"]])  # stable: the longest unasked first, ties shuffled
        for key, k in _allocate({k: len(v) for k, v in sorted(strata.items())}, min(room, len(rest))).items():
            drawn += strata[key][:k]
    chosen = {p["id"] for p in new + due + drawn}
    return Sample([p for p in probes if p["id"] in chosen], len(probes), len(new), len(due), len(drawn), every)


def _allocate(sizes: Mapping, total: int) -> dict:
    """``total`` split over strata in proportion to their ``sizes`` (largest remainders), none over its size."""
    whole = sum(sizes.values())
    share = {k: total * n / whole for k, n in sizes.items()}
    out = {k: min(sizes[k], math.floor(s)) for k, s in share.items()}
    for k in sorted(share, key=lambda k: share[k] - math.floor(share[k]), reverse=True):
        if sum(out.values()) >= total:
            break
        if out[k] < sizes[k]:
            out[k] += 1
    return out


def forgetting_power(known: int, limit: float, rate: float) -> float:
    """The chance that ``gate.probe_forgotten_max`` = ``limit`` fails a child on ``known`` probes its parent
    answered right, when the child in truth forgets ``rate`` of all such probes (binomial: each sampled probe
    forgotten independently)."""
    allowed = math.floor(limit * known + 1e-9)  # the rule passes up to this many lost
    return 1.0 - sum(math.comb(known, k) * rate ** k * (1 - rate) ** (known - k) for k in range(allowed + 1))


def power_summary(known: int, limit: float | None) -> dict:
    """The sample's power, for the report: at twice the limit, and the smallest rate caught 80 % of the time."""
    if limit is None or known == 0:
        return {}
    rate80 = next((r / 100 for r in range(1, 101) if forgetting_power(known, limit, r / 100) >= 0.8), 1.0)
    return {"known": known, "limit": limit, "at_twice_limit": round(forgetting_power(known, limit, min(1.0, 2 * limit)), 3),
            "caught_80pct_from": rate80}
