"""`evolve karma`: how much karma there is, and `evolve karma add N` to grant some by hand."""

from __future__ import annotations

import json

import click

from evolution import config
from evolution.cli.lineage import lineage_option
from evolution.intake import Intake
from evolution.ledger import Ledger
from evolution.paths import DataRoot


def open_intake(root: DataRoot, ledger: Ledger) -> Intake:
    """The lineage's intake with the karma threshold its daemon uses (its daemon.json, else the config)."""
    info = root.daemon_info()
    if info is not None:
        return Intake(ledger, info["threshold"], info.get("threshold_growth", 1.0))
    d = config.resolve_daemon(home=root.home)
    return Intake(ledger, d.threshold, d.threshold_growth)


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@lineage_option
@click.pass_context
def karma(ctx, as_json: bool) -> None:
    """Karma so far, toward the next age-up, and the age-up requests it made."""
    if ctx.invoked_subcommand is not None:
        return
    root = DataRoot.from_env().existing()
    with Ledger.open(root) as ledger:
        k = open_intake(root, ledger).karma
        state, requests = k.state(), k.requests()
    if as_json:
        click.echo(json.dumps(state.to_dict() | {"requests": [r.__dict__ for r in requests]}, indent=2))
        return
    click.echo(f"karma: {state.total:g} in all; {state.progress:g} of {state.threshold:g} toward the next age-up "
               f"({state.to_next:g} to go)")
    for r in requests[-10:]:
        click.echo(f"  request {r.id}  {r.time[:19]}  at {r.karma:g} (threshold {r.threshold:g})  {r.status}"
                   + (f"  {r.outcome}" if r.outcome else ""))


@karma.command("add", context_settings={"ignore_unknown_options": True})  # "-5" is an amount, refused below
@click.argument("amount", type=float)
@click.option("--reason", default="", help="Why (kept with the grant).")
@click.option("--key", help="Idempotency key: the same key is only counted once.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@lineage_option
def add(amount: float, reason: str, key: str | None, as_json: bool) -> None:
    """Grant AMOUNT karma. Crossing the threshold asks the daemon for an age-up."""
    root = DataRoot.from_env().existing()
    with Ledger.open(root) as ledger:
        grant = open_intake(root, ledger).karma.add(amount, reason, key, source="cli",
                                                    served_gen=ledger.served_generation())
    if as_json:
        click.echo(json.dumps(grant.to_dict(), indent=2))
        return
    s = grant.state
    if grant.duplicate:
        click.echo(f"key {key!r} was already counted (grant {grant.id}); nothing added")
    else:
        click.echo(f"added {amount:g} karma (grant {grant.id}); {s.progress:g} of {s.threshold:g} toward the next age-up")
    if grant.triggered:
        click.echo(f"threshold crossed: age-up request {grant.triggered.id} is queued; a running daemon starts it "
                   "(`python run_daemon.py`), or run `evolve age-up` yourself")
