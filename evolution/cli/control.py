"""`evolve status` and `evolve resume`: where the lineage stands, and lifting the stop rule."""

from __future__ import annotations

import json

import click

from evolution.promotion import paused_reason
from evolution.ledger import Ledger
from evolution.ledger import events as ev
from evolution.paths import MAIN, DataRoot
from evolution.cli.lineage import lineage_option


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60} h {m % 60} min" if m >= 60 else f"{m} min {s} s" if m else f"{s} s"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@lineage_option
def status(as_json: bool) -> None:
    """The served generation, the age-up in progress (stage, step, ETA), karma, and whether age-ups are paused."""
    from evolution import progress
    from evolution import status as lineage_status
    from evolution.cli.karma import open_intake

    root = DataRoot.from_env().existing()
    with Ledger.open(root) as ledger:
        now = lineage_status.read(root, ledger, open_intake(root, ledger))
        info = {
            "data_root": str(root.root),
            "lineage": root.lineage,
            "served_generation": now["served"] and now["served"]["generation"],
            "generations_on_disk": root.generations(),
            "interrupted_age_up": [n for n in root.partial_generations()],
            "paused": now["paused"],
            "karma": now["karma"],
            "experiences": {k: v for k, v in now["experiences"].items()
                            if k not in ("capture_max", "capture_failures", "last_capture_failure")},  # the daemon's
            "ageup": now["ageup"]["progress"],
            "retrieval": now["retrieval"],
            "staleness": now["staleness"],
            "tasks": now["tasks"],
        }
        last = ledger.entries(kind=ev.GATE_RESULT)
        if last:
            p = last[-1].payload
            info["last_gate"] = {"child": p["child"], "verdict": p["verdict"], "metrics": p["metrics"]}
    d = root.daemon_info()
    if d is not None:
        info["daemon"] = d | {"running": progress.pid_alive(int(d.get("pid", 0)))}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"data root:        {info['data_root']}")
    if root.lineage != MAIN:
        click.echo(f"lineage:          {root.lineage}")
    served = info["served_generation"]
    job = info["ageup"]
    building = job is not None and job.get("state") == "running" and job.get("gen") == 0
    none_yet = "none yet (generation 0 is being built)" if building else "none yet (run `evolve age-up`)"
    click.echo(f"served:           {none_yet if served is None else f'generation {served}'}")
    if d is not None:
        where = f"http://{d['host']}:{d['port']}/v1"
        click.echo(f"daemon:           {'running, pid ' + str(d['pid']) + ', ' + where if info['daemon']['running'] else 'not running'}")
    click.echo(f"on disk:          {', '.join(map(str, info['generations_on_disk'])) or 'none'}")
    if job is not None and job.get("state") == "running":
        step = f", {job['train_stage'].upper()} step {job['step']}/{job['total']}" if job.get("stage") == "train" \
            and job.get("total") else ""
        click.echo(f"age-up:           generation {job.get('gen')}: {job.get('stage')}{step}, ETA {_eta(job.get('eta_s'))}")
    elif info["interrupted_age_up"]:
        click.echo(f"interrupted:      generation {info['interrupted_age_up'][-1]} (`evolve age-up` or the daemon resumes it)")
    k = info["karma"]
    click.echo(f"karma:            {k['progress']:g} of {k['threshold']:g} toward the next age-up ({k['to_next']:g} to go)"
               + (f"; request {k['open_request']['id']} {k['open_request']['status']}" if k["open_request"] else ""))
    x = info["experiences"]
    click.echo(f"experiences:      {x['experiences']} kept ({x['good']} good, {x['bad']} bad, "
               f"{x['unrated']} unrated); {x['labelled_conversations']} labelled conversations")
    for name, t in info["tasks"].items():  # [tasks]: each task's rows, and the adapter it is served with
        a = t["adapter"]
        click.echo(f"task {name + ':':<12}{t['taught_rows']} taught rows, {t['probes']} probes; adapter: "
                   + (f"generation {a['generation']}'s ({a['sha256'][:12]})" if a else "none yet"))
    r = info["retrieval"]
    if r.get("enabled") is False:
        click.echo("retrieval:        off ([retrieval] enabled = false)")
    elif r.get("pending") is None:
        click.echo(f"retrieval:        {r.get('note')}")
    else:
        click.echo(f"retrieval:        {r['pending']} lessons pending (answered from notes until a generation learns "
                   f"them), {r['carried']} carried by the weights")
    st = info["staleness"]
    last = st.get("last_check") if st.get("enabled") else None
    if st.get("enabled") is False:
        click.echo("staleness:        off ([staleness] enabled = false)")
    elif last is None:
        click.echo("staleness:        not measured yet (every [staleness] check_every_s)")
    else:
        d_ = last.get("drift")
        click.echo(f"staleness:        drift {'-' if d_ is None else f'{d_:.2f}'} of generation {last['served']} "
                   f"(threshold {st['threshold']:g}; {last['items']} items)"
                   + (f"; age-up request {last['requested']} opened" if last.get("requested") else
                      f"; {last['why_not']}" if last.get("why_not") else ""))
    if "last_gate" in info:
        g = info["last_gate"]
        nums = ", ".join(f"{k} {'-' if v is None else f'{v:.3g}'}" for k, v in g["metrics"].items())
        click.echo(f"last gate:        generation {g['child']} {g['verdict']} ({nums})")
    click.echo(f"age-ups:          {'PAUSED: ' + info['paused'] if info['paused'] else 'active'}")


@click.command()
@click.option("--reason", default="resumed by hand", show_default=True, help="Recorded in the ledger.")
@lineage_option
def resume(reason: str) -> None:
    """Lift the stop rule: allow age-ups again after they were paused."""
    with Ledger.open(DataRoot.from_env().existing()) as ledger:
        if paused_reason(ledger) is None:
            raise click.ClickException("age-ups are not paused; nothing to resume")
        entry = ledger.record(ev.ageups_resumed(reason))
    click.echo(f"age-ups resumed (ledger seq {entry.seq})")
