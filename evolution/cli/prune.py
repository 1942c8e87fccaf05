"""``evolve prune [--dry-run]``: apply the ``[retention]`` policy to one lineage's generations
(``--lineage NAME``, default ``main``; its ``pruned`` events carry the lineage like every other event).

The library is ``evolution.retention``; this module only resolves the policy and prints the plan.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from evolution import config, retention
from evolution.cli.ledger import json_option, url_option
from evolution.cli.lineage import lineage_option
from evolution.ledger import Ledger
from evolution.ledger import events as ev
from evolution.paths import MAIN, DataRoot


@click.command("prune")
@click.option("--dry-run", is_flag=True, help="Print what would be kept and deleted; change nothing.")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="TOML config whose [retention] section is the policy [default: $EVOLUTION_HOME/evolution.toml; "
                   "lineage NAME: $EVOLUTION_HOME/lineages/NAME/evolution.toml].")
@click.option("--keep-last", type=click.IntRange(min=0), help="Keep the last N generations that passed their gate.")
@click.option("--keep-best", type=click.IntRange(min=0), help="Keep the best M of those by recall.")
@url_option
@json_option
@lineage_option
def prune(dry_run: bool, config_file, keep_last, keep_best, ledger_url, as_json: bool) -> None:
    """Delete the files of generations the retention policy does not keep, recording each deletion in the ledger.

    Kept: generation 0, the served generation and its parent, the last --keep-last that passed their gate and
    the best --keep-best by recall. Kept generations other than 0, the served one and its parent lose only
    their merged weights (rebuilt from the adapters when needed). Every generation's data/ stays.
    """
    root = DataRoot.from_env().existing()
    flags = {k: v for k, v in {"keep_last": keep_last, "keep_best": keep_best}.items() if v is not None}
    cfg = config.resolve_retention(config_file, flags, home=root.home)
    with Ledger.open(root, ledger_url) as led:
        p = retention.prune(root, led, cfg, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(p.to_dict() | {"dry_run": dry_run, "lineage": root.lineage}, indent=2, sort_keys=True))
        return
    if root.lineage != MAIN:
        click.echo(f"lineage {root.lineage}")
    for gen, why in sorted(p.kept.items()):
        click.echo(f"keep generation {gen}: {'; '.join(why)}")
    verb = "would delete" if dry_run else "deleted"
    for d in p.deletions:
        what = "GGUF and weights" if d.scope == ev.PRUNE_GENERATION else "merged weights"
        click.echo(f"{verb} generation {d.gen}'s {what} ({d.bytes / 1e6:.1f} MB): {d.reason}")
        for a in d.artifacts:
            click.echo(f"  {a['path']}  {a['sha256'][:16]}")
    if not p.deletions:
        click.echo("nothing to prune")
    else:
        click.echo(f"{verb} {p.bytes / 1e6:.1f} MB in all" + ("" if dry_run else "; recorded in the ledger"))
