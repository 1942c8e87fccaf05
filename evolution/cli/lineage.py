"""``--lineage NAME``, taken by every command that reads or writes one lineage (default ``main``).

The option sets ``$EVOLUTION_LINEAGE`` for the process (and the age-up workers it starts), which
``DataRoot.from_env`` reads, so a command needs no code of its own for it. Given on ``evolve``
itself (``evolve --lineage deacon status``) or on the command (``evolve status --lineage deacon``).
"""

from __future__ import annotations

import os

import click

from evolution.errors import ConfigError
from evolution.paths import LINEAGE_ENV, check_lineage


def _set(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    try:
        check_lineage(value)
    except ConfigError as exc:
        raise click.BadParameter(exc.problems[0]) from None
    os.environ[LINEAGE_ENV] = value


lineage_option = click.option(
    "--lineage", metavar="NAME", expose_value=False, is_eager=True, callback=_set,
    help=f"Lineage to act on (one model per role) [env {LINEAGE_ENV}; default: main].",
)
