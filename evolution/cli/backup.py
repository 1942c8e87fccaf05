"""``evolve backup DEST`` and ``evolve restore SRC DATA_ROOT``: a consistent copy of a data root, and back.

The library is ``evolution.backup``; this module only parses options and prints what happened.
"""

from __future__ import annotations

from pathlib import Path

import click

from evolution import backup as bk
from evolution.cli.ledger import url_option
from evolution.paths import MAIN, DataRoot


@click.command("backup")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--no-models", is_flag=True,
              help="Leave out the weights (GGUF, merged safetensors, adapter): the ledger and the generations' "
                   "metadata and data only.")
@url_option
def backup(dest: Path, no_models: bool, ledger_url: str | None) -> None:
    """Back up the data root ($EVOLUTION_HOME) into the new folder DEST, safely while the daemon runs.

    The ledger is copied as one snapshot (SQLite's online backup, or pg_dump for PostgreSQL) with its
    exported head, then every generation it names; a MANIFEST.json holds each file's SHA-256. DEST
    appears only when the backup is complete.
    """
    r = bk.backup(DataRoot.from_env(lineage=MAIN), dest, url=ledger_url, models=not no_models)  # every lineage
    head = f"head seq {r.head.seq}" if r.head else "empty ledger"
    gens = ", ".join(str(g) for g in r.generations) or "none"
    click.echo(f"backed up {r.files} files ({r.bytes / 2**20:.1f} MiB; {head}; generations {gens}) to {r.dest} "
               f"in {r.seconds:.1f} s")
    if r.left_out:
        click.echo(f"left out {len(r.left_out)} weight file(s) (--no-models): `evolve ledger verify` on a root "
                   "restored from this backup needs them from elsewhere")


@click.command("restore")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data_root", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True,
              help="Restore over a data root that has a ledger or generations (they are moved to "
                   "DATA_ROOT/.before-restore-TIME/, not deleted). A running daemon is refused even so.")
@url_option
def restore(src: Path, data_root: Path, force: bool, ledger_url: str | None) -> None:
    """Check the backup SRC against its manifest, then restore it as the data root DATA_ROOT.

    Start the daemon with EVOLUTION_HOME=DATA_ROOT afterwards; it serves the generation the backup's
    ledger names.
    """
    r = bk.restore(src, DataRoot.from_env(data_root, lineage=MAIN), url=ledger_url, force=force)
    head = f"head seq {r.head.seq}" if r.head else "empty ledger"
    served = "none" if r.served is None else str(r.served)
    click.echo(f"restored {r.files} files to {r.root} ({head}; served generation {served})")
    if r.moved_aside:
        click.echo(f"what was there before is in {r.moved_aside}")
    if r.kept:
        click.echo(f"kept {len(r.kept)} weight file(s) from the replaced root that hash as the ledger records")
    if r.missing:
        click.echo("weights the backup left out and the ledger records are missing; copy them in, then run "
                   "`evolve ledger verify`:\n" + "\n".join(f"  {p}" for p in r.missing), err=True)
    click.echo(f"next: EVOLUTION_HOME={r.root} evolve ledger verify")
