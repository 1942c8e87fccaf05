"""`evolve status` and `evolve resume`: where the lineage stands, and lifting the stop rule."""

from __future__ import annotations

import json

import click

from evolution.ageup import paused_reason
from evolution.ledger import Ledger
from evolution.ledger import events as ev
from evolution.paths import DataRoot


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def status(as_json: bool) -> None:
    """The served generation, the latest one, an interrupted age-up, and whether age-ups are paused."""
    root = DataRoot.from_env().prepare()
    with Ledger.open(root) as ledger:
        info = {
            "data_root": str(root.root),
            "served_generation": ledger.served_generation(),
            "generations_on_disk": root.generations(),
            "interrupted_age_up": [n for n in root.partial_generations()],
            "paused": paused_reason(ledger),
        }
        last = ledger.entries(kind=ev.GATE_RESULT)
        if last:
            p = last[-1].payload
            info["last_gate"] = {"child": p["child"], "verdict": p["verdict"], "metrics": p["metrics"]}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"data root:        {info['data_root']}")
    served = info["served_generation"]
    click.echo(f"served:           {'none yet (run `evolve age-up`)' if served is None else f'generation {served}'}")
    click.echo(f"on disk:          {', '.join(map(str, info['generations_on_disk'])) or 'none'}")
    if info["interrupted_age_up"]:
        click.echo(f"interrupted:      generation {info['interrupted_age_up'][-1]} (`evolve age-up` resumes it)")
    if "last_gate" in info:
        g = info["last_gate"]
        nums = ", ".join(f"{k} {v:.3g}" for k, v in g["metrics"].items())
        click.echo(f"last gate:        generation {g['child']} {g['verdict']} ({nums})")
    click.echo(f"age-ups:          {'PAUSED: ' + info['paused'] if info['paused'] else 'active'}")


@click.command()
@click.option("--reason", default="resumed by hand", show_default=True, help="Recorded in the ledger.")
def resume(reason: str) -> None:
    """Lift the stop rule: allow age-ups again after they were paused."""
    with Ledger.open(DataRoot.from_env().prepare()) as ledger:
        if paused_reason(ledger) is None:
            raise click.ClickException("age-ups are not paused; nothing to resume")
        entry = ledger.record(ev.ageups_resumed(reason))
    click.echo(f"age-ups resumed (ledger seq {entry.seq})")
