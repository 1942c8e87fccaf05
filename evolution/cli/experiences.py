"""`evolve experiences`: the served chats kept for rating, newest first."""

from __future__ import annotations

import json

import click

from evolution.intake import Intake
from evolution.ledger import Ledger
from evolution.paths import DataRoot
from evolution.cli.lineage import lineage_option


def _words(s: str, n: int = 8) -> str:
    words = s.split()
    return " ".join(words[:n]) + (" …" if len(words) > n else "")


@click.command()
@click.option("--label", type=click.Choice(["good", "bad", "none"]), help="Only those labelled so ('none': unrated).")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="How many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines (with the full messages and reply).")
@lineage_option
def experiences(label: str | None, limit: int, as_json: bool) -> None:
    """Served chats kept for rating: id, completion id, when, generation, label, the start of prompt and reply.

    Rate one with `evolve feedback ID good|bad` (ID: its completion id or its number here).
    """
    with Ledger.open(DataRoot.from_env().existing()) as ledger:
        items = Intake(ledger).experiences.list(label=label, limit=limit)
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in items], indent=2, ensure_ascii=False))
        return
    if not items:
        click.echo("no experiences kept" + (f" labelled {label}" if label else "")
                   + " (the daemon keeps served chats when [daemon] capture is on)")
        return
    click.echo(f"{'id':>6}  {'completion id':<38} {'when':<19}  {'gen':>4}  {'label':<8} prompt → reply")
    for e in items:
        asked = next((m["content"] for m in reversed(e.messages) if m["role"] == "user"), "")
        mark = (e.label or "-") + ("+fix" if e.corrected else "")
        gen = "-" if e.gen is None else str(e.gen)
        click.echo(f"{e.id:>6}  {e.completion_id:<38} {e.time[:19]:<19}  {gen:>4}  {mark:<8} "
                   f"{_words(asked)!r} → {_words(e.reply)!r}")
