"""`evolve curriculum check | generate`: validate the curriculum, expand templates."""

from __future__ import annotations

import json
from pathlib import Path

import click

from evolution import curriculum as cur
from evolution.fsutil import atomic_write_text
from evolution.paths import REPO_ROOT

DEFAULT = REPO_ROOT / "curriculum"


@click.group()
def curriculum() -> None:
    """Validate the curriculum or expand its templates."""


@curriculum.command()
@click.argument("path", type=click.Path(path_type=Path), default=DEFAULT)
def check(path: Path) -> None:
    """Validate every file of the curriculum at PATH; report every bad line as file:line."""
    c = cur.load(path)
    for w in c.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(
        f"ok: {len(c.cpt)} CPT documents, {len(c.sft)} SFT examples, {len(c.recall)} recall, "
        f"{len(c.generalization)} generalization, {len(c.heldout_text)} held-out texts, {len(c.style)} style items"
    )


@curriculum.command()
@click.argument("templates", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-n", "count", type=click.IntRange(min=1), default=200, show_default=True, help="Examples to generate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output file [default: sft.generated.jsonl beside TEMPLATES].")
def generate(templates: Path, count: int, seed: int, out: Path | None) -> None:
    """Expand TEMPLATES (a templates.jsonl) into up to N distinct SFT examples."""
    rows = cur.generate(templates, count, seed)
    out = out or templates.with_name("sft.generated.jsonl")
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    click.echo(f"wrote {len(rows)} examples to {out}")
