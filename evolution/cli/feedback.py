"""`evolve feedback ID good|bad`: rate a served completion or a posted conversation by hand."""

from __future__ import annotations

import json

import click

from evolution.intake import Intake
from evolution.ledger import Ledger
from evolution.paths import DataRoot
from evolution.cli.lineage import lineage_option


def parse_id(item: str) -> tuple[str, str]:
    """``conv-N`` → conversation N; anything else (``chatcmpl-…``, an experience number) → a completion."""
    if item.startswith("conv-"):
        return "conversation", item[len("conv-"):]
    return "completion", item


@click.command()
@click.argument("item", metavar="ID")
@click.argument("label", type=click.Choice(["good", "bad"]))
@click.option("--correction", help="The reply that should have been given (trained as preferred over the one served).")
@click.option("--karma", type=float, help="Karma to grant with the rating (recorded together, or neither).")
@click.option("--key", help="Idempotency key: repeating the same rating with it changes nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@lineage_option
def feedback(item: str, label: str, correction: str | None, karma: float | None, key: str | None,
             as_json: bool) -> None:
    """Label a served chat good or bad.

    ID is a completion id (chatcmpl-…, the 'id' of a chat reply), an experience number from
    `evolve experiences`, or conv-N for posted conversation N. A newer label replaces an older
    one for training; both stay in the history.
    """
    by, item_id = parse_id(item)
    root = DataRoot.from_env().existing()
    with Ledger.open(root) as ledger:
        if karma is not None:  # its threshold (the daemon's) is read only when karma is granted
            from evolution.cli.karma import open_intake

            intake = open_intake(root, ledger)
        else:
            intake = Intake(ledger)
        r = intake.experiences.rate(item_id, label, correction=correction, karma=karma,
                                                  idempotency_key=key, by=by,
                                                  served_gen=ledger.served_generation(), source="cli")
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
        return
    what = f"conversation {r.item}" if r.by == "conversation" else f"completion {r.completion_id} (experience {r.item})"
    if r.duplicate:
        click.echo(f"key {key!r} was already used for this rating (rating {r.id}); nothing changed")
        return
    click.echo(f"rated {what} {r.label}" + (f" (replaces {r.previous})" if r.previous else "")
               + ("; the correction is kept as the preferred reply" if r.corrected else ""))
    if r.karma is not None:
        click.echo(f"granted {r.karma:g} karma (grant {r.grant_id})")
    if r.triggered is not None:
        click.echo(f"threshold crossed: age-up request {r.triggered.id} is queued")
