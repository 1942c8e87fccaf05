"""``evolve export ollama [N]``: a gated generation as a Modelfile and its GGUF, for Ollama and LM Studio.

The library is ``evolution.ollama``; this module only parses the options and prints what was written.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from evolution import ollama
from evolution.cli.ledger import json_option, url_option
from evolution.cli.lineage import lineage_option
from evolution.ledger import Ledger
from evolution.paths import DataRoot


@click.group("export")
def export() -> None:
    """Hand a generation to another runtime."""


@export.command("ollama")
@click.argument("gen", type=click.IntRange(min=0), required=False)
@click.option("--out", type=click.Path(path_type=Path), help="Directory for the Modelfile and the GGUF "
              "[default: $EVOLUTION_HOME/exports/ollama/gen_NNNN].")
@click.option("--name", help="Ollama model name [default: evolution-<lineage>:gen-<N>].")
@click.option("--force", is_flag=True, help="Replace a Modelfile or GGUF already in --out.")
@click.option("--no-create", is_flag=True, help="Only write the files; do not run `ollama create`.")
@url_option
@json_option
@lineage_option
def export_ollama(gen: int | None, out: Path | None, name: str | None, force: bool, no_create: bool, ledger_url,
                  as_json: bool) -> None:
    """Write generation GEN (default: the one served) as a Modelfile beside its GGUF, checked against the ledger's
    SHA-256, and run `ollama create` where Ollama is installed. LM Studio loads the GGUF in that directory."""
    root = DataRoot.from_env().existing()
    with Ledger.open(root, ledger_url) as led:
        done = ollama.export(root, led, gen, out, name, force=force, create=not no_create)
    if as_json:
        click.echo(json.dumps(done.to_dict(), indent=2, sort_keys=True))
        return
    click.echo(f"generation {done.gen} ({done.format} chat template): {done.modelfile}")
    click.echo(f"  {done.gguf}  sha256 {done.sha256[:16]}")
    if done.created:
        click.echo(f"ollama create {done.name}: done; run it with `ollama run {done.name}`")
    else:
        click.echo(f"to load it in Ollama: ollama create {done.name} -f {done.modelfile}")
