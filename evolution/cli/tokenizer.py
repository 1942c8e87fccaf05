"""``evolve tokenizer extend``: a new lineage's own tokenizer, learned from its corpus, then its generation 0.

The library is ``evolution.vocab``; this module parses the options and prints what was added and measured.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import click

from evolution import config, promotion, vocab
from evolution.cli.lineage import lineage_option
from evolution.ledger import Ledger
from evolution.paths import MAIN, DataRoot


@click.group("tokenizer")
def tokenizer() -> None:
    """The lineage's own tokenizer."""


def _per_word(v: dict) -> str:
    if v.get("before") is None:
        return "no text"
    return f"{v['before']:.3f} → {v['after']:.3f} tokens per word ({v['words']:,} words)"


@tokenizer.command("extend")
@click.option("--tokens", "n", type=int, default=48, show_default=True,
              help=f"New tokens to learn ({vocab.MIN_TOKENS} to {vocab.MAX_TOKENS}).")
@click.option("--steps", type=click.IntRange(min=0), default=vocab.DEFAULT_STEPS, show_default=True,
              help="Training steps of the new tokens' embeddings (every other weight frozen).")
@click.option("--base", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local Hugging Face checkpoint to extend [default: embedded SmolLM2-135M-Instruct].")
@click.option("--curriculum", "curriculum_path", type=click.Path(path_type=Path), help="Curriculum directory.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--json", "as_json", is_flag=True, help="Print what was added and measured as JSON.")
@lineage_option
def extend(n: int, steps: int, base: Path | None, curriculum_path: Path | None, config_file: Path | None,
           as_json: bool) -> None:
    """Learn N new tokens from the lineage's corpus (its curriculum and the chats it holds), add them to the base
    tokenizer, train their embeddings, and build generation 0 from the result (exported, measured, served).

    Only for a lineage with no generation yet: every later generation keeps this vocabulary. Run it again after
    an interruption to resume."""
    vocab.check_count(n)
    root = DataRoot.from_env().prepare()
    overrides = {"curriculum": {"path": str(curriculum_path.resolve())}} if curriculum_path else None
    cfg = config.resolve(config_file=config_file, overrides=overrides, home=root.home)

    def on_stage(stage: str, what: str) -> None:
        if not as_json and what in ("start", "skipped"):
            click.echo(f"{'▶' if what == 'start' else '·'} {stage}", err=True)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with Ledger.open(root) as ledger:
            ext, summary = vocab.extend_lineage(root, cfg, ledger, n, steps=steps, base=base, stage_cb=on_stage)
            fate = promotion.fate(ledger, summary.gen)
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; run the same `evolve tokenizer extend` again to resume") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if as_json:
        click.echo(json.dumps({"tokenizer": {k: v for k, v in ext.items() if k != "merges"}, "generation": 0,
                               "fate": fate}, indent=2, ensure_ascii=False))
        return
    click.echo(f"lineage {root.lineage}: {ext['added']} tokens added to {ext['base']} "
               f"(vocabulary {ext['vocab_before']:,} → {ext['vocab_after']:,})")
    for part, v in ext["tokens_per_word"].items():
        click.echo(f"  {part}: {_per_word(v)}")
    t = ext["training"]
    loss = t.get("held_out_nats_per_char", {})
    if loss.get("texts"):
        click.echo(f"  loss on {loss['texts']} held-out texts, nats per character: base tokenizer {loss['base']}, "
                   f"new tokens initialised {loss['initialised']}, after {t['steps']} training steps {loss['trained']}")
    shown = ", ".join(repr(s) for s in ext["new_tokens"][:12])
    click.echo(f"  new tokens: {shown}{' …' if len(ext['new_tokens']) > 12 else ''}")
    which = "" if root.lineage == MAIN else f" --lineage {root.lineage}"
    click.echo(f"generation 0 built from it: {fate}; start the daemon with `python run_daemon.py{which} --start-gen 0`")
