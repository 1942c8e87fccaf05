"""Growing a lineage in tests the way `evolve age-up` does: build and gate a child, then decide it."""

from __future__ import annotations

from evolution import ageup, promotion


def grow(root, cfg, ledger, **kw):
    """``ageup.age_up`` (the child built, its gate result recorded), then ``promotion.decide`` with no
    swap, as the CLI does; return the child's summary."""
    summary = ageup.age_up(root, cfg, ledger, **kw)
    promotion.decide(root, ledger, summary.gen, cfg.gate.stop_after)
    return summary
