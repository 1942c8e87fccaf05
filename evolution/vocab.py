"""The lineage's own tokenizer: BPE tokens learned from its corpus, added before generation 0.

``evolve tokenizer extend`` runs it, on a lineage that has no generation yet (the vocabulary is the one
thing a LoRA age-up cannot change later):

1. **Learn.** The base tokenizer splits the lineage's corpus (the curriculum, and the chats and ratings
   the lineage already holds) into its own tokens; ``tokenizers``' BPE trainer then continues BPE on those
   token sequences (each base token one symbol), so every merge it learns joins two tokens the base
   tokenizer already emits — a word the lineage says often becomes one token.
2. **Add.** The merges are appended to the base tokenizer's merge list, below all of its own, and each
   new token gets the next id. A text without those words is split exactly as before; llama.cpp applies
   the same merges in the same order, so a served prompt is split as in training (a test checks).
   A merge that would change how llama.cpp's converter recognises the pre-tokenizer is left out.
3. **Initialise** each new token's embedding (and output row) with the mean of the rows of the base
   tokens it joins.
4. **Train** those rows, and nothing else, on the corpus (causal LM loss; every other weight frozen, so
   a text without the new tokens is read exactly as before).
5. The result is a Hugging Face checkpoint under the lineage (``tokenizer/base``) that generation 0 is
   built from like any ``--base``: exported to GGUF, measured and served.
"""

from __future__ import annotations

import ast
import inspect
import json
import logging
import shutil
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evolution.errors import GenerationError
from evolution.fsutil import fsync_dir, fsync_file

log = logging.getLogger(__name__)

MIN_TOKENS = 1
MAX_TOKENS = 8192
"""How many tokens ``extend`` adds at most: a 135M model's embedding table grows 1.6 % per 768 tokens, and a
lineage's corpus of a few hundred kilobytes rarely has more pairs seen twice."""
DEFAULT_STEPS = 30
"""Training steps of the new rows (4 blocks of 128 tokens each; about 2.6 s a step for the embedded model here).
On the default curriculum with 48 tokens, the held-out loss per character went 1.496 (initialised) → 1.405 after 10
steps → 1.321 after 20, below the base tokenizer's 1.400."""
HELD_OUT = 80
STATS_FILE = "evolution-tokenizer.json"
"""Written beside the extended checkpoint: the base it extends, the merges added, tokens per word."""
BASE_DIR = "tokenizer/base"
"""Where the extended checkpoint lives, under the lineage's folder; generation 0 records it as its base, so it
stays (retention makes generation 0's weights again from it)."""
_FIRST_SYMBOL = 0xF0000
"""Base tokens become characters of Unicode's Supplementary Private Use Area-A for the BPE trainer: 65,534 of
them, never in real text."""


@dataclass
class Corpus:
    """The lineage's text, in two parts measured apart: the curriculum and what users said (chats, ratings)."""

    curriculum: list[str] = field(default_factory=list)
    chats: list[str] = field(default_factory=list)

    @property
    def texts(self) -> list[str]:
        return self.curriculum + self.chats


@dataclass
class Extension:
    """What ``extend`` added and measured."""

    base: str
    requested: int
    added: int
    merges: list[list[str]]
    new_tokens: list[str]
    vocab_before: int
    vocab_after: int
    tokens_per_word: dict = field(default_factory=dict)
    """``{"curriculum"|"chats": {"words", "before", "after"}}`` (tokens per word)."""
    training: dict = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def curriculum_texts(cur) -> list[str]:
    """The curriculum's text: its CPT documents and every turn of its SFT examples."""
    return [d["text"] for d in cur.cpt] + [m["content"] for ex in cur.sft for m in ex["messages"] if m.get("content")]


def chat_texts(intake) -> list[str]:
    """What the lineage's users said and were answered: stored transcripts, and rated prompts with their replies
    (a corrected reply's correction, never a reply rated bad)."""
    texts: list[str] = []
    inbox = intake.inbox()
    for _, messages in inbox.conversations:
        texts += [m["content"] for m in messages if m.get("content")]
    for e in inbox.examples:
        texts += [m["content"] for m in e.prompt if m.get("content")]
        if e.label == "good":
            texts.append(e.reply)
    for p in inbox.pairs:
        texts += [m["content"] for m in p.prompt if m.get("content")] + [p.chosen]
    return texts


def corpus(cur, intake) -> Corpus:
    """The lineage's corpus: ``curriculum_texts`` and ``chat_texts``."""
    return Corpus(curriculum_texts(cur), chat_texts(intake))


def tokens_per_word(tokenizer, texts: list[str]) -> tuple[int, float | None]:
    """(words, tokens per word) of ``texts`` under ``tokenizer`` (words split at whitespace)."""
    words = sum(len(t.split()) for t in texts)
    if not words:
        return 0, None
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return words, tokens / words


def compare_per_word(before, after, parts: dict[str, list[str]]) -> dict:
    """``{part: {"words", "before", "after"}}``: tokens per word of each part's texts under tokenizer ``before``
    and ``after``."""
    out = {}
    for part, texts in parts.items():
        words, old = tokens_per_word(before, texts)
        new = tokens_per_word(after, texts)[1]
        out[part] = {"words": words, "before": None if old is None else round(old, 4),
                     "after": None if new is None else round(new, 4)}
    return out


def _converter_probe_text() -> str | None:
    """The text llama.cpp's converter tokenises to recognise a BPE pre-tokenizer (it refuses one it does not
    know), read from the installed converter; None if it cannot be found there."""
    try:
        from conversion.base import TextModel

        tree = ast.parse(textwrap.dedent(inspect.getsource(TextModel.get_vocab_base_pre)))
    except (ImportError, OSError, SyntaxError, TypeError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "chktxt" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def _word_pieces(backend, texts: list[str]) -> dict[tuple[str, ...], int]:
    """How often each pre-tokenized word of ``texts`` occurs, as the base tokenizer's tokens for it. Left out:
    words of one token (nothing to merge) and words with a digit (the base spells numbers digit by digit, and a
    date or a quantity is best learned the way the base reads every other number)."""
    counts: dict[tuple[str, ...], int] = {}
    cache: dict[str, tuple[str, ...]] = {}
    for text in texts:
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(text):
            if any(ch.isdigit() for ch in word):
                continue
            pieces = cache.get(word)
            if pieces is None:
                pieces = cache[word] = tuple(t.value for t in backend.model.tokenize(word))
            if len(pieces) > 1:
                counts[pieces] = counts.get(pieces, 0) + 1
    return counts


def learn(tokenizer, texts: list[str], n: int, min_frequency: int = 2) -> list[tuple[str, str]]:
    """Merges over the base tokenizer's tokens that add ``n`` new tokens, learned by ``tokenizers``' BPE trainer
    on ``texts`` (most frequent pair first). Fewer when the text has fewer pairs seen ``min_frequency`` times."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = tokenizer.backend_tokenizer
    words = _word_pieces(backend, texts)
    symbol: dict[str, str] = {}
    for pieces in words:
        for p in pieces:
            symbol.setdefault(p, chr(_FIRST_SYMBOL + len(symbol)))
    if len(symbol) > 0xFFFFD - _FIRST_SYMBOL:
        raise GenerationError(f"the corpus uses {len(symbol)} distinct base tokens; at most 65,534 can be merged")
    piece_of = {c: p for p, c in symbol.items()}
    vocab = tokenizer.get_vocab()
    trainer = trainers.BpeTrainer(vocab_size=len(symbol) + 2 * n + 64, min_frequency=min_frequency,
                                  initial_alphabet=list(symbol.values()), limit_alphabet=len(symbol),
                                  show_progress=False)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator((" ".join(["".join(symbol[p] for p in pieces)] * c) for pieces, c in words.items()),
                            trainer=trainer)
    merges: list[tuple[str, str]] = []
    added: set[str] = set()
    for a, b in json.loads(bpe.to_str())["model"]["merges"]:
        if len(added) >= n:
            break
        left, right = ("".join(piece_of[c] for c in s) for s in (a, b))
        merges.append((left, right))
        if left + right not in vocab:
            added.add(left + right)
    return merges


def learnable(tokenizer, texts: list[str], n: int) -> list[tuple[str, str]]:
    """``learn``'s merges, or a clear error when ``texts`` cannot give ``n`` new tokens."""
    merges = learn(tokenizer, texts, n)
    found = len({a + b for a, b in merges} - set(tokenizer.get_vocab()))
    if found < n:
        raise GenerationError(
            f"the lineage's corpus ({sum(len(t.split()) for t in texts):,} words) has only {found} pairs of tokens "
            f"seen at least twice that are not tokens yet; ask for at most {found} (--tokens), or add to the curriculum")
    return merges


def _extended_json(tokenizer_json: dict, merges: list[tuple[str, str]]) -> tuple[dict, list[str]]:
    """``tokenizer.json`` with ``merges`` appended and each new token given the next id; the new tokens."""
    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
        raise GenerationError(f"the base tokenizer is a {model.get('type')} model; only BPE tokenizers can be extended")
    vocab: dict[str, int] = model["vocab"]
    taken = set(vocab.values()) | {t["id"] for t in tokenizer_json.get("added_tokens", [])}
    next_id = max(taken) + 1
    new: list[str] = []
    for left, right in merges:
        if left + right not in vocab:
            vocab[left + right] = next_id
            new.append(left + right)
            next_id += 1
    strings = isinstance(model["merges"][0], str) if model["merges"] else False
    model["merges"] = list(model["merges"]) + [f"{a} {b}" if strings else [a, b] for a, b in merges]
    return tokenizer_json, new


def _write_tokenizer(out_dir: Path, merges: list[tuple[str, str]]):
    """Add ``merges`` to the tokenizer saved in ``out_dir``; return it loaded, and the new tokens."""
    from transformers import AutoTokenizer

    path = out_dir / "tokenizer.json"
    extended, new = _extended_json(json.loads(path.read_text(encoding="utf-8")), merges)
    path.write_text(json.dumps(extended, ensure_ascii=False), encoding="utf-8")
    return AutoTokenizer.from_pretrained(out_dir, local_files_only=True), new


def _keep_converter_happy(hf_dir: Path, base_tokenizer, merges: list[tuple[str, str]]) -> tuple[list, list[str]]:
    """``merges`` less those that change how the converter's probe text is split (llama.cpp's converter would
    not recognise the pre-tokenizer), and the tokens left out."""
    probe = _converter_probe_text()
    if probe is None:
        log.warning("llama.cpp's converter probe text was not found; the GGUF export will check the tokenizer")
        return merges, []
    want = base_tokenizer(probe, add_special_tokens=False)["input_ids"]
    base_vocab = base_tokenizer.get_vocab()
    left_out: list[str] = []
    scratch = hf_dir / ".probe"
    for _ in range(8):
        shutil.rmtree(scratch, ignore_errors=True)
        base_tokenizer.save_pretrained(scratch)  # the tokenizer only: JSON files
        tok, _ = _write_tokenizer(scratch, merges)
        shutil.rmtree(scratch, ignore_errors=True)
        ids = tok(probe, add_special_tokens=False)["input_ids"]
        if ids == want:
            return merges, left_out
        made = {a + b for a, b in merges}
        bad = {t for t in tok.convert_ids_to_tokens(ids) if t not in base_vocab or t in made}
        keep = []
        for a, b in merges:  # a merge built on a dropped token goes too
            if a + b in bad or a in bad or b in bad:
                bad.add(a + b)
                left_out.append(a + b)
            else:
                keep.append((a, b))
        merges = keep
    raise GenerationError("the extended tokenizer still splits llama.cpp's converter probe text differently; "
                          "try fewer tokens")


def nats_per_char(model, tokenizer, texts: list[str]) -> float | None:
    """The model's loss on ``texts`` in nats per character: comparable across tokenizers (per token is not)."""
    import torch

    total, chars = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            chars += len(text)
    return round(total / chars, 4) if chars else None


def _train_rows(model, tokenizer, texts: list[str], first_new: int, steps: int, lr: float, block: int,
                batch: int, seed: int) -> dict:
    """Train the embedding (and output) rows from ``first_new`` on, every other weight frozen, on the blocks of
    ``texts`` that hold a new token."""
    import torch

    from evolution.tokens import pack_cpt

    torch.manual_seed(seed)
    blocks = [b for b in pack_cpt(tokenizer, texts, block) if len(b) == block and max(b) >= first_new]
    if not blocks or steps <= 0:
        return {"steps": 0, "blocks": len(blocks), "why": "no block of the corpus holds a new token" if not blocks
                else "--steps 0"}
    for p in model.parameters():
        p.requires_grad_(False)
    rows = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not rows[0]:
        rows.append(out.weight)
    handles = []
    for w in rows:
        w.requires_grad_(True)
        mask = torch.zeros_like(w[:, :1])
        mask[first_new:] = 1.0
        handles.append(w.register_hook(lambda g, m=mask: g * m))
    optim = torch.optim.AdamW(rows, lr=lr, weight_decay=0.0)  # no decay: a row with no gradient stays exactly
    data = torch.tensor(blocks)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        x = data[torch.randint(0, len(data), (min(batch, len(data)),), generator=gen)]
        model(input_ids=x, labels=x).loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
    model.eval()
    for h in handles:
        h.remove()
    for w in rows:
        w.requires_grad_(False)
    return {"steps": steps, "blocks": len(blocks), "block": block, "batch": batch, "lr": lr,
            "seconds": round(time.perf_counter() - t0, 1)}


def _held_out(tokenizer, texts: list[str], first_new: int, seed: int) -> tuple[list[str], list[str]]:
    """(held out, the rest): up to ``HELD_OUT`` of the texts that hold a new token (a tenth at most), kept out of
    training to measure it."""
    import random

    holding = [i for i, t in enumerate(texts) if max(tokenizer(t, add_special_tokens=False)["input_ids"] or [0])
               >= first_new]
    random.Random(seed).shuffle(holding)
    held = set(holding[: min(HELD_OUT, len(holding) // 10)])
    return [texts[i] for i in sorted(held)], [t for i, t in enumerate(texts) if i not in held]


def extend(base_hf: Path, out_dir: Path, corp: Corpus, n: int, *, steps: int = DEFAULT_STEPS, lr: float = 1e-3,
           block: int = 128, batch: int = 4, seed: int = 0, base_name: str = "") -> Extension:
    """Extend the HF checkpoint ``base_hf`` (read only) with ``n`` tokens learned from ``corp``; write the result
    to ``out_dir`` (atomically: complete or absent)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_count(n)
    t0 = time.perf_counter()
    base_tok = AutoTokenizer.from_pretrained(base_hf, local_files_only=True)
    merges = learnable(base_tok, corp.texts, n)
    vocab = base_tok.get_vocab()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32, local_files_only=True)
    base_tok.save_pretrained(tmp)  # a tokenizer: JSON files, no pickle
    merges, left_out = _keep_converter_happy(tmp, base_tok, merges)
    tok, new = _write_tokenizer(tmp, merges)
    first_new = len(vocab)
    if min(tok.convert_tokens_to_ids(new), default=first_new) < first_new:
        raise GenerationError("the base tokenizer's ids are not contiguous; it cannot be extended")

    held, rest = _held_out(tok, corp.texts, first_new, seed)
    loss = {"texts": len(held), "base": nats_per_char(model, base_tok, held)}  # the base model, not yet resized

    # Initialise: each new token's rows are the mean of the rows of the base tokens it joins.
    model.resize_token_embeddings(first_new + len(new), mean_resizing=False)
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    with torch.no_grad():
        for t in new:
            pieces = base_tok(base_tok.convert_tokens_to_string([t]), add_special_tokens=False)["input_ids"]
            i = tok.convert_tokens_to_ids(t)
            emb[i] = emb[pieces].mean(0)
            if out is not None and out.weight is not emb:
                out.weight[i] = out.weight[pieces].mean(0)
    loss["initialised"] = nats_per_char(model, tok, held)
    training = _train_rows(model, tok, rest, first_new, steps, lr, block, batch, seed)
    loss["trained"] = nats_per_char(model, tok, held) if training["steps"] else loss["initialised"]
    training["held_out_nats_per_char"] = loss

    words = compare_per_word(base_tok, tok, {"curriculum": corp.curriculum, "chats": corp.chats})
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)  # the tokenizer: JSON files
    ext = Extension(base=base_name or str(base_hf), requested=n, added=len(new), merges=[list(m) for m in merges],
                    new_tokens=[tok.convert_tokens_to_string([t]) for t in new], vocab_before=first_new,
                    vocab_after=first_new + len(new), tokens_per_word=words, training=training, left_out=left_out,
                    seconds=round(time.perf_counter() - t0, 1))
    (tmp / STATS_FILE).write_text(json.dumps(ext.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
    for f in tmp.iterdir():
        fsync_file(f)
    fsync_dir(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return ext


def check_count(n: int) -> None:
    if not MIN_TOKENS <= n <= MAX_TOKENS:
        raise GenerationError(f"--tokens {n}: out of range; add between {MIN_TOKENS} and {MAX_TOKENS} tokens "
                              "(the default curriculum gives at most 58; a lineage's chats add more)")


def read(hf_dir: Path) -> dict | None:
    """The extension recorded in a checkpoint (``STATS_FILE``), or None for a tokenizer nobody extended."""
    path = Path(hf_dir) / STATS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def extend_lineage(root, cfg, ledger, n: int, *, steps: int = DEFAULT_STEPS, base: Path | None = None,
                   stage_cb=lambda stage, what: None):
    """Extend the base's tokenizer with ``n`` tokens learned from the lineage's corpus, then build generation 0
    from it (exported, measured, served). Only for a lineage without generations; an interrupted run resumes.

    Returns ``(Extension as recorded, generation 0's summary)``."""
    from evolution import ageup
    from evolution import base as base_model
    from evolution import curriculum as curriculum_mod
    from evolution.intake import Intake

    check_count(n)
    out = root.home / BASE_DIR
    resuming = read(out) is not None and root.partial_generations() == [0]
    if root.generations() or (not resuming and (root.partial_generations() or ledger.entries(gen=0))):
        raise GenerationError(
            f"lineage {root.lineage} already has generation 0; its vocabulary is fixed from then on (every later "
            "generation is a LoRA on it). Extend the tokenizer of a new lineage: `evolve tokenizer extend --lineage "
            "NAME --tokens N`")
    if base is not None:
        base_model.check_local(base)
    if not resuming:
        cur = curriculum_mod.load(cfg.curriculum.path, cfg.curriculum.phases)
        corp = corpus(cur, Intake(ledger))
        learnable(base_model.load_tokenizer(base), corp.texts, n)  # a count the corpus cannot give: said before any work
        plain = root.home / "tokenizer" / "plain.tmp"
        shutil.rmtree(plain, ignore_errors=True)
        stage_cb("base", "start")
        info = base_model.materialize(plain, base)
        stage_cb("base", "done")
        stage_cb("tokenizer", "start")
        try:
            extend(plain, out, corp, n, steps=steps, seed=cfg.train.seed, base_name=info.name)
        finally:
            shutil.rmtree(plain, ignore_errors=True)
        stage_cb("tokenizer", "done")
    summary = ageup.ensure_generation_zero(root, cfg, ledger, base=out, stage_cb=stage_cb)
    return read(out), summary
