"""`evolve age-up`: run one whole generation now, with progress and a final summary."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from evolution import ageup, config, promotion, train
from evolution import base as base_model
from evolution.ledger import Ledger
from evolution.paths import DataRoot
from evolution.cli.lineage import lineage_option

STAGE_TITLES = {
    "base": "generation 0: base model → safetensors",
    "data": "data: curriculum + replay",
    "train": "train: the configured stages, CPT → SFT → preference by default (LoRA)",
    "merge": "merge adapter → safetensors",
    "gguf_f16": "convert → GGUF f16",
    "quantize": "quantize + SHA-256",
    "smoke": "smoke check (llama-cpp-python)",
    "measure": "measure generation 0 (recall, generalization, style)",
    "gate": "gate: child vs parent on the GGUF (recall, generalization, style drift)",
    "finalize": "finalize (atomic rename, read-only)",
}


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"  # None: the metric had not enough data to measure


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.command("age-up")
@click.option("--quick", is_flag=True, help="Small documented setting: a whole age-up in a few minutes on a 2-core CPU.")
@click.option("--base", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local Hugging Face checkpoint for generation 0 [default: embedded SmolLM2-135M-Instruct].")
@click.option("--curriculum", "curriculum_path", type=click.Path(path_type=Path), help="Curriculum directory.")
@click.option("--phases", help="Comma-separated phase numbers to train on [default: all].")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--quantization", type=click.Choice(config.QUANTIZATIONS), help="GGUF type to serve [default: q8_0].")
@click.option("--backend", type=click.Choice(["auto", "unsloth", "hf"]), help="Training engine [default: auto].")
@click.option("--stages", help="Comma-separated training stages to run, in order "
              f"[default: {','.join(config.TrainConfig().stages)}]; a stage with too little data is skipped, "
              "saying why.")
@click.option("--restart", is_flag=True, help="Discard an interrupted age-up instead of resuming it.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@lineage_option
def age_up(quick, base, curriculum_path, phases, config_file, quantization, backend, stages, restart,
           as_json) -> None:
    """Run one whole generation now, from the latest generation (creating generation 0 first if needed)."""
    root = DataRoot.from_env().prepare()
    if base is not None:
        base_model.check_local(base)
    overrides: dict = {}
    if curriculum_path:
        overrides.setdefault("curriculum", {})["path"] = str(curriculum_path.resolve())
    if phases:
        try:
            overrides.setdefault("curriculum", {})["phases"] = [int(p) for p in phases.split(",")]
        except ValueError:
            raise click.BadParameter(f"{phases!r}: expected comma-separated numbers such as 1,2", param_hint="--phases")
    if quantization:
        overrides.setdefault("export", {})["quantization"] = quantization
    if backend:
        overrides.setdefault("train", {})["backend"] = backend
    if stages:
        overrides.setdefault("train", {})["stages"] = [s.strip() for s in stages.split(",")]
    cfg = config.resolve(quick=quick, config_file=config_file, overrides=overrides, home=root.home)
    rcfg = config.resolve_retrieval(config_file, home=root.home)  # the gate's figure with retrieval

    console = Console(stderr=True)
    started: dict[str, float] = {}
    progress = Progress(
        TextColumn("  [bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    )
    tasks: dict[str, int] = {}

    def on_step(stage: str, step: int, total: int, loss: float | None) -> None:
        if not console.is_terminal:  # a log file gets a line every 5 % instead of a live bar
            if step == total or step % max(1, total // 20) == 0:
                console.print(f"  {stage.upper()} step {step}/{total} loss {'-' if loss is None else round(loss, 3)}")
            return
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage.upper(), total=total, loss="-")
        progress.update(tasks[stage], completed=step, loss=f"{loss:.3f}" if loss is not None else "-")

    def on_stage(stage: str, what: str) -> None:
        title = STAGE_TITLES.get(stage, stage)
        if what == "start":
            started[stage] = time.perf_counter()
            console.print(f"[cyan]▶[/] {title}")
            if stage == "train":
                progress.start()
        elif what == "done":
            if stage == "train":
                progress.stop()
            console.print(f"[green]✓[/] {title} [dim]({time.perf_counter() - started[stage]:.1f} s)[/]")
        else:
            console.print(f"[dim]· {title}: already done, skipped[/]")

    console.print(f"data root: {root.root}{'  (--quick)' if cfg.quick else ''}")
    t0 = time.perf_counter()
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with Ledger.open(root) as ledger:
            summary = ageup.age_up(root, cfg, ledger, base=base, progress=on_step, stage_cb=on_stage, restart=restart,
                                   retrieval=rcfg)
            # A running daemon follows the ledger: it serves a promoted child within seconds.
            fate = promotion.decide(root, ledger, summary.gen, cfg.gate.stop_after)
    except KeyboardInterrupt:
        progress.stop()
        raise click.ClickException(
            "age-up interrupted; finished stages and the last complete checkpoint are kept — "
            "run `evolve age-up` again to resume (or --restart to start over)"
        ) from None
    finally:
        progress.stop()
        signal.signal(signal.SIGTERM, previous)
    wall = time.perf_counter() - t0
    if as_json:
        click.echo(json.dumps(summary.to_dict() | {"fate": fate, "wall_s": round(wall, 1)}, indent=2, default=str))
        return
    table = Table(title=f"generation {summary.gen} (parent {summary.parent})", show_header=False)
    table.add_row("directory", summary.gen_dir)
    table.add_row("GGUF", f"{summary.gguf.path}  {_size(summary.gguf.size)}  {summary.quantization}")
    table.add_row("SHA-256", summary.gguf.sha256)
    for a in summary.artifacts[1:]:
        table.add_row(a.kind, f"{a.path}  {_size(a.size)}")
    if summary.train:
        for st, m in train.stage_dicts(summary.train).items():
            if not m["skipped"] or m["steps"]:
                method = f"{m['method']}: " if m.get("method") else ""
                table.add_row(st.upper(), f"{method}{m['steps']} steps, {m['tokens']} tokens, "
                              f"loss {m['loss_first']:.3f} → {m['loss_last']:.3f}, {m['tokens_per_s']:.0f} tok/s")
            elif m.get("reason"):
                table.add_row(st.upper(), f"skipped: {m['reason']}")
    table.add_row("smoke reply", summary.smoke.get("reply", "")[:100])
    if summary.gate:
        g = summary.gate
        parent = g.get("parent_metrics") or {}
        nums = ", ".join(f"{k} {_num(v)}" + (f" (parent {_num(parent[k])})" if k in parent else "")
                         for k, v in g["metrics"].items())
        verdict = {("pass", promotion.PROMOTED): "[green]PASS: promoted, now served[/]",
                   ("pass", promotion.REJECTED): "[red]PASS, but it could not be served: rejected, parent still served[/]",
                   ("fail", promotion.REJECTED): "[red]FAIL: rejected, parent still served[/]"}
        table.add_row("gate", verdict.get((g["verdict"], fate), f"{g['verdict']} ({fate})"))
        table.add_row("metrics", nums)
        for r in g["reasons"]:
            table.add_row("reason", r)
    for stage, secs in summary.stage_seconds.items():
        table.add_row(f"time: {stage}", f"{secs:.1f} s")
    table.add_row("wall time", f"{wall:.1f} s")
    Console().print(table)
