"""``evolve ledger`` (history), ``ledger show N``, ``ledger verify``, ``rollback --to N`` and ``report``.

The ledger lives under the data root (``$EVOLUTION_HOME``); ``--ledger-url`` or
``$EVOLUTION_LEDGER_URL`` points these commands at another database (e.g. PostgreSQL).
``ledger show N`` adds the generation's lessons (every experience, probe and held-out rated reply,
parent beside child) from the ``eval.json`` beside its GGUF, when that file is on this machine and
agrees with the ledger's gate result.

Each command acts on one lineage (``--lineage NAME``, default ``main``); ``ledger show NAME/N``
names another, ``ledger --all`` lists every lineage of the database, and ``ledger verify`` checks
the one chain they share.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from evolution import weights as weights_mod
from evolution.ledger import GenerationDetail, GenerationRow, Ledger, VerifyReport
from evolution.ledger import events as ev
from evolution.ledger import rollback as do_rollback
from evolution.cli.lineage import lineage_option
from evolution.ledger.lineage import gate_rows
from evolution.ledger.store import URL_ENV
from evolution.metrics import TABLE
from evolution.promotion import paused_reason
from evolution.paths import LINEAGE_RE, MAIN, DataRoot
from evolution.untrusted import terminal

url_option = click.option(
    "--ledger-url", envvar=URL_ENV, default=None, metavar="URL",
    help=f"SQLAlchemy URL of the ledger [env {URL_ENV}; default: SQLite under the data root].",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")


def _open(ctx: click.Context, url: str | None) -> Ledger:
    url = url or (ctx.obj or {}).get("ledger_url")
    ledger = Ledger.open(DataRoot.from_env().existing(), url)
    ctx.call_on_close(ledger.close)
    return ledger


def _console() -> Console:
    """A rich console; when piped (no terminal to size it) wide enough that tables do not fold."""
    con = Console()
    return con if con.is_terminal else Console(width=max(con.width, 160))


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _short_time(iso: str | None) -> str:
    return iso[:16].replace("T", " ") if iso else "-"


def _fmt(v) -> str:
    if isinstance(v, dict) and "child" in v:
        v = v["child"]
    if v is None:
        return "-"  # not enough data to measure it
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _metric_order(names) -> list[str]:
    """The gate's metric table first, in its order; then names it no longer has (older entries), sorted."""
    known = [u.name for u in TABLE]
    return [n for n in known if n in names] + sorted(set(names) - set(known))


_PRUNED = {"generation": "pruned", "weights": "weights pruned"}
"""What the retention policy deleted (``GenerationRow.pruned``), as the history and ``show`` say it."""


def _verdict_text(r: GenerationRow) -> str:
    """The gate's verdict and what became of the generation, in one short cell."""
    pruned = f" [dim]({_PRUNED[r.pruned]})[/]" if r.pruned else ""
    if r.verdict is None:
        return ("base" if r.gen == 0 and r.parent is None else r.status) + pruned
    fate = {"promoted": "", "passed": ", not promoted", "rolled_back": ", rolled back", "rejected": ", rejected"}
    text = r.verdict + fate.get(r.status, f", {r.status}")
    style = "red" if r.verdict != "pass" else ("yellow" if r.status == "rolled_back" else "green")
    return f"[{style}]{text}[/]{pruned}"


def _history_table(rows: list[GenerationRow], url: str, max_metrics: int = 5) -> Table:
    metric_names = _metric_order({k for r in rows for k in r.metrics})[:max_metrics]
    t = Table(caption=url, caption_style="dim", box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("", no_wrap=True)
    t.add_column("gen", justify="right", no_wrap=True)
    t.add_column("parent", justify="right", no_wrap=True)
    t.add_column("created (UTC)", min_width=10)  # folds to date / time on a narrow terminal
    t.add_column("verdict", min_width=6, overflow="fold")
    for name in metric_names:
        t.add_column(name, justify="right", overflow="fold", min_width=6)
    t.add_column("sha256", no_wrap=True)
    for r in rows:
        t.add_row(
            "[bold green]▶[/]" if r.served else "",
            str(r.gen),
            "-" if r.parent is None else str(r.parent),
            _short_time(r.created),
            _verdict_text(r),
            *(_fmt(r.metrics[n]) if n in r.metrics else "-" for n in metric_names),
            (r.gguf_sha256 or "-")[:10],
        )
    return t


def _registry(led: Ledger) -> list[dict]:
    """One row per lineage of the database: its served generation, that generation's metrics and status."""
    out = []
    for name in led.lineages():
        view = led.view(name)
        rows = view.history()
        served = next((r for r in rows if r.served), None)
        out.append({"lineage": name, "served": None if served is None else served.gen, "generations": len(rows),
                    "latest": rows[-1].gen if rows else None, "latest_status": rows[-1].status if rows else None,
                    "metrics": served.metrics if served else {}, "gguf_sha256": served.gguf_sha256 if served else None,
                    "paused": paused_reason(view)})
    return out


def _registry_table(items: list[dict], url: str, max_metrics: int = 4) -> Table:
    metric_names = _metric_order({k for i in items for k in i["metrics"]})[:max_metrics]
    t = Table(caption=url, caption_style="dim", box=box.SIMPLE_HEAD, pad_edge=False)
    for name, kw in (("lineage", {"no_wrap": True}), ("served", {"justify": "right"}), ("gens", {"justify": "right"}),
                     ("latest", {"overflow": "fold"})):
        t.add_column(name, **kw)
    for name in metric_names:
        t.add_column(name, justify="right", overflow="fold", min_width=6)
    t.add_column("sha256", no_wrap=True)
    t.add_column("status", overflow="fold")
    for i in items:
        latest = "-" if i["latest"] is None else f"{i['latest']} {i['latest_status']}"
        t.add_row(escape(i["lineage"]), "-" if i["served"] is None else str(i["served"]), str(i["generations"]),
                  latest, *(_fmt(i["metrics"][n]) if n in i["metrics"] else "-" for n in metric_names),
                  (i["gguf_sha256"] or "-")[:10], "[red]paused[/]" if i["paused"] else "[green]serving[/]"
                  if i["served"] is not None else "building")
    return t


@click.group("ledger", invoke_without_command=True)
@url_option
@json_option
@click.option("--all", "every", is_flag=True, help="Every lineage of the ledger: served generation, metrics, status.")
@lineage_option
@click.pass_context
def ledger(ctx: click.Context, ledger_url: str | None, as_json: bool, every: bool) -> None:
    """The lineage ledger: without a subcommand, the history (▶ marks the served generation)."""
    ctx.ensure_object(dict)
    ctx.obj["ledger_url"] = ledger_url
    if ctx.invoked_subcommand is not None:
        return
    led = _open(ctx, ledger_url)
    if every:
        items = _registry(led)
        if as_json:
            _echo_json({"lineages": items})
        elif not items:
            click.echo(f"the ledger at {led.url} is empty: no lineage recorded yet")
        else:
            _console().print(_registry_table(items, led.url))
        return
    rows = led.history()
    if as_json:
        _echo_json({"served": led.served_generation(), "generations": [r.to_dict() for r in rows]})
        return
    if not rows:
        which = "" if led.lineage == MAIN else f" of lineage {led.lineage}"
        click.echo(f"the ledger at {led.url} is empty: no generation{which} recorded yet")
        return
    _console().print(_history_table(rows, led.url if led.lineage == MAIN else f"{led.lineage} · {led.url}"))


def _stage_line(st: dict) -> str:
    """One training stage as recorded in ``training_finished``: method, steps, loss, the trainer's numbers."""
    parts = [st["method"]] if st.get("method") else []
    parts.append(f"{st.get('steps', 0)} steps" + (" (skipped)" if st.get("skipped") and not st.get("steps") else ""))
    if st.get("loss_first") is not None:
        parts.append(f"loss {st['loss_first']:.4g} → {st['loss_last']:.4g}")
    if st.get("tokens_per_s"):
        parts.append(f"{st['tokens_per_s']:.0f} tokens/s")
    parts += [f"{k} {v:.4g}" for k, v in (st.get("summary") or {}).items() if k.startswith("rewards/")]
    line = ", ".join(parts)
    return line + (f" — {st['reason']}" if st.get("reason") else "")


def _lessons(led: Ledger, d: GenerationDetail) -> tuple[list, str | None]:
    """The generation's lessons from its ``eval.json`` (``gate.report_lessons``), or none and why not.

    ``eval.json`` is not a hashed artifact, so its numbers are checked against the ledger's gate result
    before its items are shown: a report that does not match what the ledger recorded is not shown.
    """
    from evolution import gate  # llama.cpp and the metric units: only this command needs them

    if not d.gate or d.gate.get("verdict") not in ("pass", "fail"):
        return [], None  # measured, not gated (generation 0), or never gated: nothing was taught to it
    gguf = d.gguf
    gen_dir = (led.data_root.root / gguf["path"]).parent if gguf else led.data_root.gen_dir(d.summary.gen)
    path = gen_dir / "eval.json"
    try:
        report = json.loads(path.read_text())
        found = gate.report_lessons(report)
    except FileNotFoundError:
        return [], (f"no {path} on this machine: the lessons are in the eval.md where generation {d.summary.gen} "
                    "was built")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [], f"{path} could not be read ({exc.__class__.__name__}: {exc})"
    recorded = d.gate.get("metrics", {})
    for u, _ in found:
        mine, theirs = report.get("metrics", {}).get(u.name), recorded.get(u.name)
        if isinstance(theirs, dict):
            theirs = theirs.get("child")
        if mine is None and theirs is None:
            continue  # asked with too few items to count (experience_similarity): no value in either
        if mine is None or theirs is None or not math.isclose(mine, theirs, rel_tol=1e-9, abs_tol=1e-12):
            return [], (f"{path} does not match the ledger's gate result ({u.name} {mine} there, {theirs} in the "
                        "ledger): its lessons are not shown")
    return found, None


def _print_lessons(found: list, problem: str | None) -> None:
    con = _console()
    if problem:
        con.print(Text(f"lessons: {problem}", style="yellow"))
    for u, items in found:
        asked, wanted, score = u.lessons_columns
        t = Table(title=Text(f"lessons: {u.lessons_title}"), show_lines=True)
        for col in ("#", asked, wanted, "parent's reply", f"parent {score}", "child's reply", f"child {score}",
                    "change"):
            t.add_column(col, overflow="fold")
        for i, x in enumerate(items, 1):
            t.add_row(str(i), Text(terminal(x.asked, 60)), Text(terminal(x.wanted, 60)),
                      Text(terminal(x.parent_reply, 80)), _fmt(x.parent_score), Text(terminal(x.child_reply, 80)),
                      _fmt(x.child_score), x.outcome)
        con.print(t)


def _print_tasks(outcomes: list[dict]) -> None:
    """The task adapters gated on the generation (``task_adapter`` events): with the adapter / the generation alone."""
    if not outcomes:
        return
    t = Table(title="task adapters (with the adapter / the generation alone)")
    for col in ("task", "verdict", "trained on", "taught replies", "probes", "recall", "why"):
        t.add_column(col)
    for p in outcomes:
        w, wo = (p.get("metrics") or {}).get("with", {}), (p.get("metrics") or {}).get("without", {})
        pair = {k: f"{_fmt(w.get(k))} / {_fmt(wo.get(k))}" for k in ("taught_similarity", "probe_recall", "recall")}
        t.add_row(p["task"], p["verdict"], _fmt(p.get("trained_on")), pair["taught_similarity"], pair["probe_recall"],
                  pair["recall"], escape("; ".join(p.get("reasons") or [])) or "-")
    _console().print(t)


def _print_detail(d: GenerationDetail, lessons: list = (), lessons_problem: str | None = None) -> None:
    con = _console()
    s = d.summary
    served = " [bold green](served)[/]" if s.served else ""
    con.print(f"[bold]generation {s.gen}[/]{served} — {s.status}, created {_short_time(s.created)} UTC")
    chain = " ← ".join(str(g) for g in d.lineage)
    con.print(f"lineage: {chain}" + (f"  (base: {d.base})" if d.base else ""))
    if d.tokenizer:
        tk = d.tokenizer
        words = "; ".join(f"{part} {v['before']} → {v['after']} tokens per word" for part, v in
                          tk.get("tokens_per_word", {}).items() if v.get("before") is not None)
        con.print(f"tokenizer: the base's + {tk['added']} lineage tokens (vocabulary {tk['vocab_before']:,} → "
                  f"{tk['vocab_after']:,}); {words}")
    con.print(f"config hash: {d.config_hash or '-'}   data manifest hash: {d.manifest_hash or '-'}")
    if d.training:
        losses = d.training.get("losses")
        con.print(f"training: {d.training.get('steps')} steps; losses: {json.dumps(losses, default=str)[:200]}")
        for name, st in (d.training.get("stages") or {}).items():
            con.print(f"  {name}: {_stage_line(st)}")
    moved = d.weights
    if moved and moved.get("dominant"):
        top = moved["dominant"]
        con.print(f"[yellow]weights: layer {top['layer']} holds {top['share']:.0%} of this generation's update[/] "
                  f"(`evolve ledger show {s.gen} --weights`)")
    if d.gate:
        g = d.gate
        t = Table(title=f"gate vs parent {g.get('parent')}: {g.get('verdict')}")
        for col in ("metric", "child", "parent", "rule"):
            t.add_column(col)
        rows = {r["metric"]: r for r in gate_rows(g)}
        for name in _metric_order(rows):
            r = rows[name]
            rules = [x["rule"] + {True: "", False: " [red]✗[/]", None: ""}[x["passed"]] for x in r["rules"]]
            rules += [f"[dim]skipped: {escape(why)}[/]" for why in r["skipped"]]
            t.add_row(name, _fmt(r["child"]), _fmt(r["parent"]), "\n".join(rules) or "-")
        con.print(t)
        fig = g.get("retrieval") or {}
        if fig.get("probes"):
            con.print(f"with retrieval (for information): probe recall {_fmt(fig['probe_recall'])} against "
                      f"{_fmt(fig['without'])} on the weights alone; {fig['with_notes']} of {fig['probes']} probes "
                      f"found notes among {fig['lessons']} lessons still pending")
    _print_tasks([e.payload for e in d.events if e.kind == ev.TASK_ADAPTER and e.gen == s.gen])
    if s.reason:
        con.print(f"reason: {s.reason}")
    gone = ev.pruned_paths((e.seq, e.kind, e.payload) for e in d.events if e.gen == s.gen)
    if s.pruned:
        why = next(e for e in reversed(d.events) if e.kind == ev.PRUNED and e.gen == s.gen)
        con.print(f"[dim]{_PRUNED[s.pruned]} by the retention policy (seq {why.seq}): {escape(why.payload['reason'])}[/]")
    _print_lessons(lessons, lessons_problem)
    if d.artifacts:
        t = Table(title="artifacts")
        for col in ("path", "kind", "size", "sha256", ""):
            t.add_column(col)
        for a in d.artifacts:
            t.add_row(a["path"], a["kind"], f"{a['size']:,}", a["sha256"][:16],
                      f"pruned (seq {gone[a['path']]})" if a["path"] in gone else "")
        con.print(t)
    for name, obj in (("config", d.config), ("data manifest", d.manifest)):
        if obj:
            con.print(f"{name}:")
            con.print_json(json.dumps(obj, default=str))
    t = Table(title="events")
    for col in ("seq", "time (UTC)", "kind"):
        t.add_column(col)
    for e in d.events:
        t.add_row(str(e.seq), _short_time(e.time), e.kind)
    con.print(t)


def _generation_ref(value: str) -> tuple[str | None, int]:
    """``N`` or ``LINEAGE/N`` (``ledger show``)."""
    name, _, number = value.rpartition("/")
    if not number.isdigit() or (name and not LINEAGE_RE.match(name)):
        raise click.BadParameter(f"{value!r} is not a generation: give N or LINEAGE/N (for example 3 or deacon/3)")
    return name or None, int(number)


@ledger.command("show")
@click.argument("ref", metavar="[LINEAGE/]N")
@url_option
@json_option
@click.option("--weights", "show_weights", is_flag=True,
              help="Only how its weights moved, per layer: the adapter's update and the change against the parent "
                   "and generation 0.")
@lineage_option
@click.pass_context
def show(ctx: click.Context, ref: str, ledger_url: str | None, as_json: bool, show_weights: bool) -> None:
    """All about generation N: lineage to the base, config, data manifest, metrics, artifacts, events, and
    its lessons: each experience, probe and held-out rated reply with the parent's and the child's reply.
    LINEAGE/N names a generation of another lineage."""
    name, n = _generation_ref(ref)
    led = _open(ctx, ledger_url)
    if name is not None:
        led = led.view(name)
    d = led.generation(n)
    if show_weights:
        rec = d.weights
        if as_json:
            _echo_json({"gen": n, "weights": rec})
        elif rec is None:
            click.echo(f"generation {n} has no weight record: generation 0, or built before weights were measured")
        else:
            click.echo("\n".join([f"generation {n}: how its weights moved, per layer"] + weights_mod.table(rec)))
        return
    found, problem = _lessons(led, d)
    if as_json:
        _echo_json(d.to_dict() | {"lessons": {u.name: [asdict(x) for x in items] for u, items in found},
                                  "lessons_problem": problem})
    else:
        _print_detail(d, found, problem)


def _print_report(r: VerifyReport) -> None:
    for w in r.warnings:
        click.echo(f"warning: {w}", err=True)
    if r.ok:
        head = f"head seq {r.head.seq}" if r.head else "no head yet"
        pruned = f", {r.artifacts_pruned} pruned" if r.artifacts_pruned else ""
        click.echo(f"ledger OK: {r.entries} entries, {head}, "
                   f"{r.artifacts_checked} artifact(s) re-hashed{pruned}, {r.seconds:.2f} s")
        return
    first = r.first_bad_seq
    where = f", first bad seq {first}" if first else ""
    click.echo(f"ledger FAILED verification: {len(r.problems)} problem(s){where}", err=True)
    for p in r.problems:
        where = f"seq {p.seq}" if p.seq is not None else "head"
        click.echo(f"  {where}: {p.what}: {p.message}", err=True)


@ledger.command("verify")
@url_option
@json_option
@click.option("--no-artifacts", is_flag=True, help="Skip re-hashing the artifacts on disk (chain and head only).")
@click.option("--head", "head_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Check against this exported head file (e.g. a backup copy) instead of the data root's.")
@click.option("--write-head", is_flag=True,
              help="If the chain is intact but the head file is missing, write a new one.")
@lineage_option
@click.pass_context
def verify(ctx: click.Context, ledger_url, as_json: bool, no_artifacts: bool, head_path, write_head: bool) -> None:
    """Recompute the hash chain (every lineage's entries: one chain), compare with the exported head, re-hash
    artifacts; exit 1 on any problem."""
    led = _open(ctx, ledger_url)
    report = led.verify(artifacts=not no_artifacts, head=head_path)
    if write_head and all(p.what == "head_missing" for p in report.problems):
        head = led.export_head()
        report = led.verify(artifacts=not no_artifacts, head=head_path)
        if head is not None and not as_json:
            click.echo(f"wrote a new exported head at seq {head.seq} to {led.head_path}", err=True)
    if as_json:
        _echo_json(report.to_dict())
    else:
        _print_report(report)
    if not report.ok:
        ctx.exit(1)


@click.command("rollback")
@click.option("--to", "to", type=click.IntRange(min=0), required=True, help="Generation to serve.")
@click.option("--reason", default="manual rollback", show_default=True, help="Why, for the ledger.")
@url_option
@lineage_option
@click.pass_context
def rollback(ctx: click.Context, to: int, reason: str, ledger_url: str | None) -> None:
    """Serve generation N again: it must have passed its gate (or be 0) and its GGUF must match the ledger.

    Appends a rolled_back event and deletes nothing. A running daemon switches within
    seconds; a stopped one starts on N.
    """
    led = _open(ctx, ledger_url)
    entry = do_rollback(led, to, reason)
    click.echo(f"rolled back from generation {entry.payload['from']} to {to} (ledger seq {entry.seq})")


@click.command("report")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG to write [default: <data root>/ledger/report.png; lineage NAME: report-NAME.png].")
@url_option
@lineage_option
@click.pass_context
def report(ctx: click.Context, output: Path | None, ledger_url: str | None) -> None:
    """Draw the gate metrics across generations as a PNG, served / rejected / rolled back marked."""
    from evolution.ledger.report import render  # matplotlib is slow to import; only this command needs it

    led = _open(ctx, ledger_url)
    name = "report.png" if led.lineage == MAIN else f"report-{led.lineage}.png"
    out = render(led, output or led.data_root.ledger_dir / name)
    click.echo(f"wrote {out}")
