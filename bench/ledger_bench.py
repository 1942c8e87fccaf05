"""Ledger benchmark: append latency (p50 / p99) and verify time for 10,000 entries.

    python bench/ledger_bench.py [-n 10000] [--pg-url URL]

Runs on SQLite in a temp data root, and on PostgreSQL too when ``--pg-url`` or
``$EVOLUTION_TEST_PG_URL`` is given (in a throwaway schema, dropped afterwards). Each append is
one durable transaction (SQLite: WAL, synchronous=FULL) plus the exported-head update, as in
production. Verify recomputes the whole chain and checks the head; artifact hashing is excluded.
Goal on the reference machine: SQLite p99 <= 10 ms, verify <= 1 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from evolution.ledger import Ledger, events
from evolution.paths import DataRoot

GOAL_P99_MS, GOAL_VERIFY_S = 10.0, 1.0


def _event(i: int) -> events.Event:
    """A realistic mix: mostly small events, every 50th a gate result with metrics."""
    if i % 50 == 0:
        return events.gate_result(i // 50, i // 50 + 1, {"recall": 0.8, "generalization": 0.7, "style_drift": 0.05},
                                  {"recall": 0.75, "style_drift": 0.1}, "pass")
    return events.karma_threshold_crossed(karma=i, threshold=100)


def run(url: str | None, n: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as home:
        led = Ledger.open(DataRoot(Path(home)), url)
        try:
            lat = []
            for i in range(n):
                t = time.perf_counter()
                led.record(_event(i))
                lat.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            report = led.verify(artifacts=False)
            verify_s = time.perf_counter() - t
            if not report.ok:
                raise SystemExit(f"verify failed: {report.problems[:3]}")
        finally:
            led.close()
    q = statistics.quantiles(lat, n=100)
    return {"p50": q[49], "p99": q[98], "max": max(lat), "verify": verify_s, "entries": report.entries}


def _pg_schema_url(base: str):
    url = sa.make_url(base)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    schema = f"ledger_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    scoped = url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)

    def drop():
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()

    return scoped, drop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=10_000, help="entries to append (default 10000)")
    ap.add_argument("--pg-url", default=os.environ.get("EVOLUTION_TEST_PG_URL"), help="also run on this PostgreSQL")
    args = ap.parse_args()

    rows = [("sqlite", run(None, args.n))]
    if args.pg_url:
        scoped, drop = _pg_schema_url(args.pg_url)
        try:
            rows.append(("postgresql", run(scoped, args.n)))
        finally:
            drop()

    print(f"{'backend':<11} {'entries':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'verify s':>9}")
    for name, r in rows:
        print(f"{name:<11} {r['entries']:>7} {r['p50']:>7.2f} {r['p99']:>7.2f} {r['max']:>7.1f} {r['verify']:>9.3f}")
    sqlite = rows[0][1]
    ok = sqlite["p99"] <= GOAL_P99_MS and all(r["verify"] <= GOAL_VERIFY_S for _, r in rows)
    print(f"goal (SQLite p99 <= {GOAL_P99_MS:g} ms, verify <= {GOAL_VERIFY_S:g} s): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
