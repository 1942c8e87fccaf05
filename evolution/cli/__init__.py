"""The ``evolve`` command line: one module per subcommand group, errors translated here.

Library code raises ``evolution.errors.EvolutionError``; this is the one place that turns
it into a message on stderr and a non-zero exit code.
"""

from __future__ import annotations

import click

from evolution import logsetup
from evolution.cli.lineage import lineage_option
from evolution.errors import EvolutionError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EvolutionError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail to stderr.")
@click.version_option(package_name="evolution")
@lineage_option
def main(verbose: bool) -> None:
    """Grow a small language model generation by generation, safely."""
    logsetup.configure(verbose)


def _register() -> None:
    from evolution.cli import (ageup, backup, control, curriculum, daemon, experiences, export, feedback, karma, prune,
                               tokenizer, ui)

    main.add_command(ageup.age_up)
    main.add_command(daemon.daemon)
    main.add_command(karma.karma)
    main.add_command(curriculum.curriculum)
    main.add_command(control.status)
    main.add_command(control.resume)
    main.add_command(experiences.experiences)
    main.add_command(feedback.feedback)
    main.add_command(ui.ui)
    main.add_command(backup.backup)
    main.add_command(backup.restore)
    main.add_command(prune.prune)
    main.add_command(export.export)
    main.add_command(tokenizer.tokenizer)

    from evolution.cli import ledger as ledger_cli

    main.add_command(ledger_cli.ledger)
    main.add_command(ledger_cli.rollback)
    main.add_command(ledger_cli.report)


_register()
