"""Disk per generation under the retention policy, and the time to rebuild dropped merged weights.

    python bench/retention_bench.py --home DIR [--json OUT]

DIR is a data root holding generations 0 and 1 of the embedded model (what ``bench/ageup_bench.py
--home DIR`` or ``evolve age-up --quick`` leaves); it is not changed: the bench works on a copy (the
ledger copied, the generation files hard-linked). In the copy, as a user would:

1. ``rollback --to 0``, then ``prune`` keeping the last generation that passed: generation 1 is kept
   (servable) but is neither served nor the served one's parent, so it loses its merged weights;
2. ``rollback --to 1`` and ``retention.rebuild_weights`` (what the next age-up calls): generation 1's
   weights merged again from generation 0's and its adapter, hashed against its ``exported`` record;
3. ``rollback --to 0`` and ``prune`` keeping nothing but generation 0: generation 1 is pruned.

Prints the size of generation 1 whole, kept without merged weights and pruned (target: at most 200 MB
for a kept generation beyond the served one and its parent), and the rebuild time against the age-up's
own merge stage (from generation 1's ``generation.json``; a chain of k generations takes about k merges).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import Contention

from evolution import retention
from evolution.config import RetentionConfig
from evolution.generation import GenerationSummary
from evolution.ledger import Ledger, rollback
from evolution.paths import DataRoot

MB = 1e6


def _copy(src: DataRoot, dst: Path) -> DataRoot:
    """The ledger copied, the generations hard-linked (a prune unlinks the copy's names only)."""
    shutil.copytree(src.ledger_dir, dst / "ledger")
    subprocess.run(["cp", "-al", str(src.checkpoints), str(dst / "checkpoints")], check=True)
    return DataRoot(dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True, help="data root with generations 0 and 1 (not changed)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    src = DataRoot(args.home.resolve())
    if src.generations()[:2] != [0, 1]:
        sys.exit(f"{src.root} has no generations 0 and 1; make them with `EVOLUTION_HOME={src.root} evolve age-up "
                 "--quick`")
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="retention-bench-", dir=src.root.parent) as tmp:
        root = _copy(src, Path(tmp))
        with Ledger.open(root) as led:
            whole = retention.disk_usage(root)
            out["gen0_mb"], out["whole_mb"] = whole[0] / MB, whole[1] / MB
            if led.served_generation() != 0:
                rollback(led, 0, "retention bench")
            plan = retention.prune(root, led, RetentionConfig(keep_last=1, keep_best=0))
            assert [(d.gen, d.scope) for d in plan.deletions] == [(1, "weights")], plan.deletions
            out["kept_mb"] = retention.disk_usage(root)[1] / MB

            rollback(led, 1, "retention bench")
            busy, t0 = Contention(), time.perf_counter()
            seconds = retention.rebuild_weights(root, led, 1)
            out["rebuild_s"], out["busy"] = time.perf_counter() - t0, busy.others()
            assert seconds is not None and led.verify().ok
            out["merge_stage_s"] = GenerationSummary.load(root.gen_dir(1)).stage_seconds.get("merge")

            rollback(led, 0, "retention bench")
            retention.prune(root, led, RetentionConfig(keep_last=0, keep_best=0))
            out["pruned_mb"] = retention.disk_usage(root)[1] / MB
            report = led.verify()
            assert report.ok, report.problems
    print(f"generation 0 (always kept, the root of every rebuild): {out['gen0_mb']:.0f} MB")
    print(f"generation 1 whole (served, or the served one's parent): {out['whole_mb']:.0f} MB")
    print(f"generation 1 kept, merged weights dropped:              {out['kept_mb']:.0f} MB "
          f"({out['kept_mb'] / out['whole_mb']:.2f}x whole; target <= 200 MB)")
    print(f"generation 1 pruned (data/ and metadata only):          {out['pruned_mb']:.1f} MB")
    merge = out["merge_stage_s"]
    ratio = f" ({out['rebuild_s'] / merge:.2f}x the age-up's merge stage, {merge:.1f} s)" if merge else ""
    print(f"rebuild of generation 1's merged weights, sha256 as recorded: {out['rebuild_s']:.1f} s{ratio}; "
          f"other processes used {out['busy']:.0%} of the CPU meanwhile")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
