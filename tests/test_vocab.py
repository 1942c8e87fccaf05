"""``evolve tokenizer extend``: tokens learned from the lineage's corpus, added to the base tokenizer, their rows
initialised and trained (nothing else), split the same way by llama.cpp, and generation 0 built and served from it.

A tiny Llama with the real SmolLM2 tokenizer stands in for the base; its curriculum repeats words the SmolLM2
tokenizer splits into several tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoTokenizer

from evolution import ageup, vocab
from evolution.cli import main as cli
from evolution.errors import GenerationError
from evolution.ledger import Ledger, events as ev
from evolution.paths import DataRoot
from tests.conftest import make_tiny_cfg, make_tiny_curriculum, toml_of, write_jsonl

RARE = ["heron", "barometer", "windowsill", "anemones", "cupboard", "lighthouses", "kilometre", "pliers",
        "Tromsø", "hallway", "cellar", "tidying", "spoonful", "peelings", "squeaky", "Tidewater"]
"""Words the SmolLM2 tokenizer splits into two or more tokens."""


def _curriculum(root):
    cur = make_tiny_curriculum(root)
    cpt = cur / "phase0_language" / "cpt.jsonl"
    rows = [json.loads(line) for line in cpt.read_text().splitlines()]
    write_jsonl(cpt, rows + [{"text": f"The {RARE[i % 16]} by the {RARE[(i + 3) % 16]} and the "
                                      f"{RARE[(i + 7) % 16]}, note {i}."} for i in range(96)])
    return cur


@pytest.fixture
def cfg(tmp_path):
    c = make_tiny_cfg(_curriculum(tmp_path / "curriculum"))
    c.curriculum.path = str(tmp_path / "curriculum")
    return c


@pytest.fixture
def corp(cfg):
    from evolution import curriculum
    from evolution.intake.inbox import Inbox

    class _NoChats:  # a lineage that holds no chats yet
        def inbox(self):
            return Inbox()

    return vocab.corpus(curriculum.load(cfg.curriculum.path), _NoChats())


def test_learned_tokens_are_the_corpus_words_the_base_splits(tokenizer, corp):
    merges = vocab.learn(tokenizer, corp.texts, 12)
    new = {a + b for a, b in merges} - set(tokenizer.get_vocab())
    assert len(new) == 12
    words = {tokenizer.convert_tokens_to_string([t]).strip() for t in new}
    assert words & set(RARE), words
    for a, b in merges:  # every merge joins tokens the base (or an earlier merge) has; no digits
        assert not any(ch.isdigit() for ch in a + b)


def test_extend_adds_rows_initialised_and_trained_and_changes_nothing_else(tiny_base, tokenizer, corp, tmp_path):
    out = tmp_path / "ext"
    ext = vocab.extend(tiny_base, out, corp, 12, steps=0)
    tok = AutoTokenizer.from_pretrained(out)
    assert ext.added == 12 and len(tok) == len(tokenizer) + 12 == ext.vocab_after
    before, after = load_file(tiny_base / "model.safetensors"), load_file(out / "model.safetensors")
    emb0, emb1 = before["model.embed_tokens.weight"], after["model.embed_tokens.weight"]
    assert emb1.shape[0] == emb0.shape[0] + 12
    assert torch.equal(emb1[: emb0.shape[0]], emb0)
    for name, w in before.items():
        if name != "model.embed_tokens.weight":
            assert torch.equal(after[name], w), name
    first = ext.vocab_before
    for i, word in enumerate(ext.new_tokens):  # each new row is the mean of its old pieces' rows
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(pieces) > 1
        assert torch.allclose(emb1[first + i], emb0[pieces].mean(0), atol=1e-6)
    for word in RARE:  # each rare word reads in fewer tokens, most in one
        assert len(tok(f" {word}")["input_ids"]) <= len(tokenizer(f" {word}")["input_ids"])
    assert sum(len(tok(f" {w}")["input_ids"]) == 1 for w in RARE) >= 5
    # The corpus reads in fewer tokens; a text without the new words is split exactly as before.
    per_word = ext.tokens_per_word["curriculum"]
    assert per_word["after"] < per_word["before"]
    plain = "My sister keeps bees on the roof of her house."
    assert tok(plain)["input_ids"] == tokenizer(plain)["input_ids"]
    assert json.loads((out / vocab.STATS_FILE).read_text())["added"] == 12

    trained = vocab.extend(tiny_base, tmp_path / "trained", corp, 12, steps=4)
    emb2 = load_file(tmp_path / "trained" / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(emb2[:first], emb0), "a row of the base vocabulary changed in training"
    assert not torch.allclose(emb2[first:], emb1[first:]), "training left the new rows as initialised"
    assert trained.training["steps"] == 4 and trained.training["blocks"] > 0


def test_llama_cpp_splits_text_as_the_extended_tokenizer_does(tiny_base, tokenizer, corp, tmp_path):
    import llama_cpp

    from evolution import export

    vocab.extend(tiny_base, tmp_path / "ext", corp, 12, steps=0)
    export.to_gguf_f16(tmp_path / "ext", tmp_path / "ext.gguf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "ext")
    llm = llama_cpp.Llama(str(tmp_path / "ext.gguf"), vocab_only=True, verbose=False)
    try:
        assert llm.n_vocab() == len(tok)
        texts = [t for t in corp.texts if any(w in t for w in RARE)][:40] + [f"Is the {w} near the {v}?" for w, v in zip(RARE, reversed(RARE))]
        seen_new = 0
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
            seen_new += sum(i >= len(tokenizer) for i in ids)
        assert seen_new > 20
    finally:
        llm.close()


def test_out_of_range_or_more_than_the_corpus_has_is_a_clear_error(tiny_base, corp, tmp_path):
    for n in (0, -3, vocab.MAX_TOKENS + 1):
        with pytest.raises(GenerationError, match="out of range"):
            vocab.extend(tiny_base, tmp_path / "x", corp, n)
    with pytest.raises(GenerationError, match=r"has only \d+ pairs .* ask for at most \d+"):
        vocab.extend(tiny_base, tmp_path / "x", corp, 4000)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tmp").exists()


def test_extend_builds_generation_zero_served_from_the_new_tokenizer_and_refuses_a_started_lineage(
        tiny_base, cfg, tmp_path, monkeypatch):
    import llama_cpp

    root = DataRoot.from_env().prepare()
    with Ledger.open(root) as led:
        ext, summary = vocab.extend_lineage(root, cfg, led, 10, steps=2, base=tiny_base)
        assert summary.gen == 0 and led.served_generation() == 0
        created = led.entries(gen=0, kind=ev.GENERATION_CREATED)[0].payload
        assert created["source"]["tokenizer"]["added"] == 10
        assert "+ 10 lineage tokens" in created["source"]["name"]
        gguf = root.gen_dir(0) / summary.gguf.path
        llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
        assert llm.n_vocab() == ext["vocab_after"]
        llm.close()
        with pytest.raises(GenerationError, match="already has generation 0"):
            vocab.extend_lineage(root, cfg, led, 10, steps=2, base=tiny_base)
    other = root.for_lineage("other").prepare()
    with Ledger.open(other) as led:  # more tokens than the corpus can give: said before the base is even copied
        with pytest.raises(GenerationError, match=r"ask for at most \d+"):
            vocab.extend_lineage(other, cfg, led, 4000, base=tiny_base)
    assert not (other.home / "tokenizer").exists()
    # the CLI says the same, and a bad size is refused before anything is read
    r = CliRunner().invoke(cli, ["tokenizer", "extend", "--tokens", "0"])
    assert r.exit_code != 0 and "out of range" in r.output
    r = CliRunner().invoke(cli, ["tokenizer", "extend", "--tokens", "10", "--base", str(tiny_base),
                                 "--curriculum", cfg.curriculum.path])
    assert r.exit_code != 0 and "already has generation 0" in r.output
    r = CliRunner().invoke(cli, ["ledger", "show", "0"])
    assert r.exit_code == 0 and "+ 10 lineage tokens (vocabulary" in r.output, r.output


@pytest.mark.slow
def test_killed_while_generation_zero_exports_it_resumes_with_the_same_tokenizer_and_ages_up(
        tiny_base, cfg, tmp_path):
    root = DataRoot(tmp_path / "home")
    d = cfg.to_dict()
    d.pop("quick")
    conf = tmp_path / "evolution.toml"
    conf.write_text(toml_of(d))

    def extend(fault: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "EVOLUTION_FAULTS"} | {"EVOLUTION_HOME": str(root.root)}
        env |= {"EVOLUTION_FAULTS": fault} if fault else {}
        return subprocess.run([sys.executable, "-c", "from evolution.cli import main; main()", "tokenizer", "extend",
                               "--tokens", "10", "--steps", "2", "--base", str(tiny_base), "--config", str(conf)],
                              env=env, capture_output=True, text=True, timeout=600)

    r = extend("gguf_export=kill@1")
    assert r.returncode == -9, r.stderr[-2000:]
    weights = root.home / vocab.BASE_DIR / "model.safetensors"
    written = (weights.stat().st_mtime_ns, weights.read_bytes())
    assert root.partial_generations() == [0] and not root.generations()
    r = extend(None)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "10 tokens added" in r.stdout and "generation 0 built from it: promoted" in r.stdout
    assert (weights.stat().st_mtime_ns, weights.read_bytes()) == written, "the resumed run learned the tokens again"
    with Ledger.open(root) as led:
        assert led.served_generation() == 0
        # the lineage grows as any other: a LoRA child on the extended vocabulary, merged and exported
        child = ageup.age_up(root, cfg, led)
        tok = AutoTokenizer.from_pretrained(root.gen_dir(1) / "hf")
        assert len(tok) == json.loads((root.home / vocab.BASE_DIR / vocab.STATS_FILE).read_text())["vocab_after"]
        assert child.gen == 1 and led.verify(artifacts=True).ok


def test_the_default_token_count_is_one_the_repositorys_curriculum_can_give(tokenizer):
    """`evolve tokenizer extend` with no --tokens works on the curriculum a new user starts with."""
    from evolution import curriculum
    from evolution.cli.tokenizer import extend as extend_cmd
    from evolution.config import AgeUpConfig

    default = next(p.default for p in extend_cmd.params if p.name == "n")
    texts = vocab.curriculum_texts(curriculum.load(AgeUpConfig().curriculum.path))
    merges = vocab.learnable(tokenizer, texts, default)
    assert len({a + b for a, b in merges} - set(tokenizer.get_vocab())) == default
