"""`python run_daemon.py` / `evolve daemon`: serve the current generation and age up on karma."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from evolution import base as base_model
from evolution import config, logsetup
from evolution.cli.lineage import lineage_option
from evolution.errors import ConfigError, EvolutionError
from evolution.paths import DataRoot, check_lineage


@click.command("daemon")
@click.option("--start-gen", type=click.IntRange(min=0),
              help="Where a new lineage starts: 0 builds generation 0 from the base model. An existing lineage "
                   "continues from its served generation (`evolve rollback --to N` to change it).")
@click.option("--host", help="Address to listen on [default: 127.0.0.1].")
@click.option("--port", type=click.IntRange(0, 65535), help="Port [default: 8765].")
@click.option("--threshold", type=float, help="Karma per age-up [default: 100].")
@click.option("--threshold-growth", type=float, help="Factor by which each age-up's threshold grows [default: 1].")
@click.option("--quick", is_flag=True, help="Age up with the small --quick setting (minutes on a 2-core CPU).")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="TOML config ([daemon] plus the age-up sections) [default: $EVOLUTION_HOME/evolution.toml; "
                   "lineage NAME: $EVOLUTION_HOME/lineages/NAME/evolution.toml].")
@click.option("--base", type=click.Path(path_type=Path),
              help="Local Hugging Face checkpoint for generation 0 [default: embedded SmolLM2-135M-Instruct].")
@click.option("--curriculum", "curriculum_path", type=click.Path(path_type=Path), help="Curriculum directory.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
@lineage_option
@click.option("--lineages", "lineages", metavar="NAME,NAME",
              help="Serve several lineages from this one process and port, routed by the OpenAI 'model' field "
                   "(evolution-NAME); each reads its own evolution.toml; the first answers unrouted requests.")
def daemon(start_gen, host, port, threshold, threshold_growth, quick, config_file, base, curriculum_path,
           verbose, lineages) -> None:
    """Serve the current generation over an OpenAI-compatible API and age up whenever karma crosses the threshold."""
    from evolution.daemon import Daemon, run

    logsetup.configure(verbose)
    try:
        names = [n.strip() for n in lineages.split(",")] if lineages else [DataRoot.from_env().lineage]
        if len(set(names)) != len(names):
            raise ConfigError([f"--lineages {lineages!r} names a lineage twice"])
        if base is not None:
            base = base.expanduser().resolve()
            base_model.check_local(base)
        overrides = {"curriculum": {"path": str(curriculum_path.resolve())}} if curriculum_path else None
        flags = {k: v for k, v in {"host": host, "port": port, "threshold": threshold,
                                   "threshold_growth": threshold_growth}.items() if v is not None}
        daemons = []
        for name in names:
            root = DataRoot.from_env(lineage=check_lineage(name)).prepare()
            cfg = config.resolve(quick=quick, config_file=config_file, overrides=overrides, home=root.home)
            dcfg = config.resolve_daemon(config_file, flags, home=root.home)
            rcfg = config.resolve_retention(config_file, home=root.home)
            qcfg = config.resolve_retrieval(config_file, home=root.home)
            scfg = config.resolve_staleness(config_file, home=root.home)
            daemons.append(Daemon(root, cfg, dcfg, base, start_gen, rcfg, qcfg, scfg))
        first = daemons[0]
        logsetup.to_file(first.root.logs / "daemon.log", first.dcfg.log_max_bytes, first.dcfg.log_backups)
        code = run(*daemons)
    except EvolutionError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)  # 2 is click's usage error; see the README's exit codes
    sys.exit(code)
