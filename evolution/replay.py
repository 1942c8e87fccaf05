"""The training set of one generation: this curriculum plus a replay sample of earlier generations.

Each generation keeps the exact records each training stage trained on in ``gen_NNNN/data/``,
one file per stage named after it (``cpt.jsonl``, ``sft.jsonl``, …). A new age-up takes each
stage's records from the selected curriculum (and the conversation inbox) and adds, per new
record, ``replay_ratio`` records sampled (seeded) from the same stage's file of earlier
generations that are not already in the new set — so facts taught once keep being rehearsed
after the curriculum or the inbox moves on. Nothing here knows a stage by name: a new stage's
data replays as soon as generations hold its file. The manifest names every input file with
its SHA-256, and hashes each stage's file. What the user taught since the parent arrives as one
``evolution.intake.Inbox``; the ``[curriculum]`` settings (``config.CurriculumConfig``) say how much of
each source is taken.

**Recency.** New facts may contradict old ones (the user moved; the agent's favourite book
changed). Chat records (those with ``messages``: SFT examples) are compared by their prompt (the
first user message, case and punctuation folded: ``messages.prompt_key``), and, within a
stage, for each prompt only the answers of its most authoritative, most recent source are
trained on:

1. the curriculum, as it is now (the operator's curated statement of truth, re-read at every
   age-up; the gate's recall questions come from it, so chat cannot overwrite them);
2. conversations received since the parent's age-up — the newest transcript for a prompt
   wins over older ones;
3. replayed records of earlier generations — the newest generation holding a prompt wins;
   older generations' answers to it are no longer replayed.

Rated replies (preference records: ``prompt`` and a reply with its label, or a chosen/rejected
pair) follow the same rule by their prompt, with one difference: within one source every rating
of a prompt is kept (several replies to one prompt, rated good and bad, are what KTO contrasts; a
re-rated reply already has one newest label, ``ExperienceStore.labelled``). So the ratings of a
prompt received since the parent replace every older generation's ratings of it, and a newer
generation's ratings of a prompt replace an older one's; a new rating held out for the gate
(``heldout``) supersedes the older ones all the same, though no stage trains on it.

**Known curriculum.** A chat record of the curriculum that the parent's lineage already trained on
(``known_dirs``: their data) is not re-taught in full at every age-up: only ``known_share`` of them
(seeded per generation, so the sample rotates) join the new records; the rest stay in the replay
pool with every other earlier record. With Adam a step moves the weights about the learning rate
whatever the loss, so re-fitting what the parent already knows is drift, not learning: over five
quick age-ups the held-out prose perplexity rose 43.8 -> 61.3 (issue 17). Raw text (continual
pretraining's general prose) carries no prompt and is always trained on in full.

**Rehearsed experience.** What the agent lived through is the lineage's memory, not one more record among
the curriculum's: the chat records of earlier generations that came from experience (posted conversations,
approved and corrected replies, and their variants; each generation's manifest lists the keys of the chat
records it took from the inbox or rehearsed, ``lived``, and a variant names its source) are re-taught at every
age-up, newest generation first and sources before their variants, up to
``rehearse_max`` records; the rest of them are left to replay. Sampled back at ``replay_ratio`` among about
1,700 earlier records, a fact taught once was forgotten by the next age-up (``bench/learn_bench.py``: the
first round's 20 facts went from 20 of 20 to 5 of 20 after one more default age-up).

Dropped examples are counted in the manifest (``superseded``). Paraphrases of one question are
different prompts here; a contradiction phrased differently is left to the gate.

**Ratings.** Served replies rated since the parent (``Inbox.examples`` / ``pairs``) reach the stages
through their ``inbox`` like transcripts (a good reply or a correction is an SFT example; every
rated reply is a preference record). A reply rated bad, or corrected, is never trained on as a chat
record, from any source: the curriculum, the inbox or replay (``Inbox.not_to_imitate``). The manifest
records the newest rating taken (``experiences.through``) so the next generation takes only newer ones.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from evolution import augment, persona
from evolution.config import CurriculumConfig
from evolution.curriculum import Curriculum
from evolution.fsutil import atomic_write_json, atomic_write_text, sha256_file
from evolution.generation import HELDOUT_FILE
from evolution.intake import Inbox
from evolution.messages import prompt_key
from evolution.paths import DataRoot
from evolution.train import STAGES, Stage


def _key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _prompt(record: dict) -> str | None:
    """The prompt a record answers (recency is decided per prompt): a chat record's or a rated reply's (a variant
    answers its source's prompt); None for other records (raw text)."""
    if "variant_of" in record:
        return record["variant_of"]
    if "unanswered" in record:  # persona.who_is_who: a question about the user nobody answered
        return record["unanswered"]
    if "messages" in record:
        return prompt_key(record["messages"])
    return prompt_key(record["prompt"]) if "prompt" in record else None


def _banned(record: dict, banned: set[str]) -> bool:
    """A record of a reply rated bad or corrected, or a variant made from one."""
    return _key(record) in banned or record.get("source") in banned


def _variants(rows: list[dict], n: int, budget: int, rng: random.Random, systems: list[str], fact_forms: bool,
              contrast: tuple[list[str], list[tuple[str, str]]]) -> list[dict]:
    """``augment.variants`` of the new chat records ``rows``, ``n`` per exchange, fewer per record when
    all of them would pass ``budget`` records; each names its source (``variant_of``, ``source``). ``contrast``: the
    persona's facts and the identity curriculum's exchanges (empty: no variant sets the fact against the persona)."""
    chats = [r for r in rows if "messages" in r]
    exchanges = sum(len(augment.exchanges(r["messages"])) for r in chats)
    if exchanges and n * exchanges > budget:
        n = budget // exchanges
    out: list[dict] = []
    taught = [x for r in chats for x in augment.exchanges(r["messages"])]
    for r in chats if n > 0 else []:
        out += [{"messages": m, "variant_of": _prompt(r), "source": _key(r)}
                for m in augment.variants(r["messages"], n, rng, systems, fact_forms, *contrast, others=taught)]
    return out


def _taught_texts(records: list[dict]) -> list[str]:
    """The user's and the assistant's words of experience chat records: the subjects the user taught."""
    return [m["content"] for r in records for m in r.get("messages", []) if m["role"] in ("user", "assistant")]


def _newest_inbox(inbox: list[tuple[int, dict]], taken: set[str]) -> tuple[list[dict], int]:
    """The inbox records whose prompt is not in ``taken``: for chat records, one per prompt, the newest (highest
    order); every rated reply (a source's ratings of one prompt are kept together)."""
    keep: dict = {}
    for order, record in sorted(inbox, key=lambda c: c[0]):
        p = _prompt(record)
        keep[order if p is None or "messages" not in record else p] = record
    rows = [r for r in keep.values() if _prompt(r) not in taken]
    return rows, len(inbox) - len(rows)


def _lived(data_dir: Path, stage: str) -> set[str]:
    """The keys of the chat records a generation took from experience or rehearsed (its manifest's ``lived``);
    none for data written before it was kept (their variants still name their source)."""
    manifest = data_dir / "manifest.json"
    if not manifest.is_file():
        return set()
    return set(json.loads(manifest.read_text()).get("lived", {}).get(stage, []))


def _through(gen_dir: Path, source: str) -> int:
    manifest = gen_dir / "data" / "manifest.json"
    if not manifest.is_file():
        return 0
    return int(json.loads(manifest.read_text()).get(source, {}).get("through", 0))


def conversations_through(gen_dir: Path) -> int:
    """The id of the last conversation a generation's data took in (0: none; ``Intake.inbox``)."""
    return _through(gen_dir, "conversations")


def experiences_through(gen_dir: Path) -> int:
    """The id of the last rating a generation's data took in (0: none; ``Intake.inbox``)."""
    return _through(gen_dir, "experiences")


def _not_to_imitate(inbox: Inbox) -> set[str]:
    """The chat records (by ``_key``) of every reply rated bad or corrected: never trained on as SFT."""
    return {_key({"messages": prompt + [{"role": "assistant", "content": reply}]})
            for prompt, reply in inbox.not_to_imitate}


HELDOUT_MIN = 10


def heldout_record(item) -> dict:
    """A held-out rating in ``preference.jsonl``'s record format."""
    if hasattr(item, "chosen"):
        return {"prompt": item.prompt, "chosen": item.chosen, "rejected": item.rejected}
    return {"prompt": item.prompt, "reply": item.reply, "label": item.label}


def _teaches(item) -> bool:
    """Whether a rating carries text the model did not write: a correction, or a transcript rated good (the agent
    posted what it was told). Held out, that text would never be trained on, and the fact in it never learned."""
    return hasattr(item, "chosen") or (item.label == "good" and item.item.startswith("conversation:"))


def _hold_out(inbox: Inbox, share: float, rng: random.Random) -> tuple[Inbox, Inbox]:
    """Take a seeded ``share`` of the new ratings that teach nothing new (the model's own replies rated good or bad,
    transcripts rated bad: ``_teaches``) out of ``inbox``: no stage trains on them. Returns (the rest, the ratings
    taken out: only their ``examples`` and ``pairs``); nothing is taken while fewer than ``HELDOUT_MIN`` are
    eligible."""
    items = [("e", i) for i, e in enumerate(inbox.examples) if not _teaches(e)] + \
        [("p", i) for i, p in enumerate(inbox.pairs) if not _teaches(p)]
    if len(items) < HELDOUT_MIN:
        return inbox, Inbox()
    chosen = set(rng.sample(items, max(1, round(share * len(items)))))
    taken = [inbox.examples[i] if k == "e" else inbox.pairs[i] for k, i in sorted(chosen)]
    # A rated transcript is also a posted conversation: held out, it is no chat record either.
    convs = {t.item for t in taken if t.item.startswith("conversation:")}
    keep = replace(inbox, conversations=[c for c in inbox.conversations if f"conversation:{c[0]}" not in convs],
                   examples=[e for i, e in enumerate(inbox.examples) if ("e", i) not in chosen],
                   pairs=[p for i, p in enumerate(inbox.pairs) if ("p", i) not in chosen])
    held = Inbox(examples=[e for i, e in enumerate(inbox.examples) if ("e", i) in chosen],
                 pairs=[p for i, p in enumerate(inbox.pairs) if ("p", i) in chosen])
    return keep, held


def _known_sampled(rows: list[dict], stage: str, known_dirs: Sequence[Path], share: float,
                   rng: random.Random) -> tuple[list[dict], list[int], set[str]]:
    """``rows`` (a stage's curriculum records) with only ``share`` of the chat records the lineage already trained
    on (found in ``known_dirs/<stage>.jsonl``), in their order; [re-taught, left to replay]; the prompts of those
    left to replay (still the curriculum's: no conversation may answer them)."""
    seen = {_key(r) for d in known_dirs for r in _read_jsonl(d / f"{stage}.jsonl")}
    known = [i for i, r in enumerate(rows) if _prompt(r) is not None and _key(r) in seen]
    keep = set(rng.sample(known, round(share * len(known))))
    dropped = set(known) - keep
    return [r for i, r in enumerate(rows) if i not in dropped], [len(keep), len(dropped)], \
        {_prompt(rows[i]) for i in dropped}


def materialize(root: DataRoot, cur: Curriculum, child: int, out: Path, settings: CurriculumConfig,
                inbox: Inbox = Inbox(), *, seed: int = 0, stages: Sequence[Stage] = STAGES,
                known_dirs: Sequence[Path] = (), capped: Mapping[str, int] | None = None) -> dict:
    """Write ``out/<stage>.jsonl`` for each of ``stages`` and ``out/manifest.json``; return the manifest.

    ``inbox``: what was taught since the parent (``Intake.inbox``): the transcripts posted since its cursor and the
    ratings given since its cursor, of which each stage takes what it learns from (``Stage.inbox``); every reply
    rated bad or corrected, new or not (``Inbox.not_to_imitate``), is kept out of the chat records (an earlier
    generation may have learned it before it was rated). ``seed`` (``[train] seed``) and ``child`` seed every sample.
    ``known_dirs``: the data of the parent's lineage. ``settings`` (``[curriculum]``) says how much of each source:

    - ``experience_heldout``: the share of the new ratings that teach nothing new (seeded; once at least
      ``HELDOUT_MIN`` are; never a correction or a transcript rated good: ``_teaches``) written to
      ``out/preference_heldout.jsonl`` instead of any stage: the gate's ``preference_margin`` asks them;
    - ``replay_ratio``: per new record, this many records of earlier generations;
    - ``experience_variants``: per exchange of each new chat record a stage takes from the inbox, this many
      variants (``evolution.augment``, seeded) join it, at most ``experience_variant_share`` × the stage's
      curriculum records in all (fewer per record past that); counted in the manifest (``variants``). Replay is
      sampled per record before them, so they do not grow it; ``fact_forms``: the variants restate each fact in
      other shapes (``augment.restated``);
    - ``known_share``: of the curriculum's chat records found in ``known_dirs``, this share is re-taught (counted
      in the manifest: ``known``), the rest left to replay;
    - ``rehearse_max``: at most this many earlier experience chat records re-taught (counted in the manifest:
      ``rehearsed``); 0: none, experience is replayed like the rest;
    - ``who_is_who``: this many records (at most ``experience_variant_share`` x the stage's curriculum records)
      that keep the user apart from the agent's persona join each stage that learns from chat records
      (``persona.who_is_who``: questions about the user nobody answered, beside the agent's own; counted in the
      manifest), and each fact's variants set it against the persona too; the inbox's probe questions are
      subjects the user taught, so never asked as unanswered.

    ``capped``: per stage, the records its capped steps see in one pass (``train.capped_records``). Where a stage
    has more, what was taught since the parent comes first — the inbox's records, then a sample of the rehearsed
    ones, the variants and who-is-who, together at most ``CAPPED_TAUGHT_SHARE`` of them — and the curriculum and
    replay are sampled to fill the rest; the file holds only those (the manifest's ``capped``: kept and left).
    Without it, 100 quick SFT steps drew 800 of 2,300 records at random and missed most facts taught.
    """
    replay_ratio, heldout, known_share = settings.replay_ratio, settings.experience_heldout, settings.known_share
    variants, variant_share = settings.experience_variants, settings.experience_variant_share
    rehearse_max, fact_forms, who_is_who = settings.rehearse_max, settings.fact_forms, settings.who_is_who
    conversations, through, probes = list(inbox.conversations), inbox.conversations_since, inbox.probes
    banned = _not_to_imitate(inbox)
    rng = random.Random(seed * 1_000_003 + child)
    held_inbox = Inbox()
    if heldout > 0:
        inbox, held_inbox = _hold_out(inbox, heldout, random.Random(seed * 1_000_003 + child + 7))
    held = [heldout_record(t) for t in [*held_inbox.examples, *held_inbox.pairs]]
    data: dict[str, list[dict]] = {}
    replayed: dict[str, int] = {}
    made: dict[str, int] = {}
    sources: dict[str, str] = {}
    known_counts: dict[str, list[int]] = {}
    rehearsed: dict[str, int] = {}
    lived_keys: dict[str, list[str]] = {}
    contrast = (persona.persona_facts(cur), persona.identity_exchanges(cur)) if who_is_who > 0 else ([], [])
    who: dict[str, int] = {}
    noted: dict[str, int] = {}
    capped_counts: dict[str, dict[str, int]] = {}
    taken_from_inbox = superseded = 0
    read_inbox = read_ratings = False  # no stage learns from them: leave them for a later generation's
    for stage in stages:
        new = [r for r in stage.curriculum(cur) if _key(r) not in banned]
        n_curriculum = len(new)
        to_replay: set[str] = set()
        if known_share < 1:
            new, known_counts[stage.name], to_replay = _known_sampled(new, stage.name, known_dirs, known_share,
                                                                      random.Random(seed * 1_000_003 + child + 13))
        n_taught = len(new)
        taken = {p for r in new if (p := _prompt(r)) is not None}
        to_replay -= taken  # a prompt the curriculum still re-teaches (another record of it) is not replayed
        taken |= to_replay
        curriculum_prompts = set(taken)
        received = [(order, r) for order, r in stage.inbox(inbox) if not _banned(r, banned)]
        read_inbox |= bool(stage.inbox(Inbox(conversations=conversations)))
        read_ratings |= bool(stage.inbox(Inbox(examples=inbox.examples, pairs=inbox.pairs)))
        inbox_rows, dropped = _newest_inbox(received, taken)
        new += inbox_rows
        taken |= {p for r in inbox_rows if (p := _prompt(r)) is not None}
        # held out for the gate, not trained on, but newer than what earlier generations hold for these prompts
        taken |= {p for _, r in stage.inbox(held_inbox) if (p := _prompt(r)) is not None}
        taken_from_inbox += len(inbox_rows)
        superseded += dropped
        have = {_key(r) for r in new}
        pool: list[dict] = []
        lived: list[dict] = []  # the pool's experience chat records, newest generation first
        claimed = set(taken) - to_replay  # the known curriculum left to replay: its records are in the pool
        for g in sorted(root.generations(), reverse=True):  # newest generation first: it wins a prompt
            if g >= child:
                continue
            f = root.gen_dir(g) / "data" / f"{stage.name}.jsonl"
            if f.is_file():
                sources[str(f.relative_to(root.root))] = sha256_file(f)
            prompts_here: set[str] = set()
            theirs = _lived(root.gen_dir(g) / "data", stage.name)
            for r in _read_jsonl(f):
                k = _key(r)
                if _banned(r, banned):
                    superseded += 1
                    continue
                p = _prompt(r)
                if p is not None:
                    if p in claimed:
                        superseded += k not in have
                        continue
                    prompts_here.add(p)
                if k not in have:
                    have.add(k)
                    pool.append(r)
                    if "messages" in r and ("variant_of" in r or k in theirs):
                        lived.append(r)
            claimed |= prompts_here
        # an earlier generation's "I don't know" to a question about the user on a subject the user has taught since
        taught = _taught_texts(inbox_rows + lived) + list(probes)
        pool = [r for r in pool if "unanswered" not in r or not persona.taught_about(r["unanswered"], taught)]
        n_new = len(new)
        rehearse = sorted(lived, key=lambda r: "variant_of" in r)[:rehearse_max]  # stable: newest first within each
        if rehearse:
            again = {_key(r) for r in rehearse}
            pool = [r for r in pool if _key(r) not in again]
            new += rehearse
        rehearsed[stage.name] = len(rehearse)
        lived_keys[stage.name] = sorted({_key(r) for r in inbox_rows + rehearse if "messages" in r})
        pool.sort(key=_key)  # the sample must not depend on directory order
        n = min(len(pool), round(replay_ratio * n_new))
        new += rng.sample(pool, n)
        replayed[stage.name] = n
        extra = _variants(inbox_rows, variants, int(variant_share * n_curriculum),
                          random.Random(seed * 1_000_003 + child + 11), augment.system_prompts(new[:n_taught]),
                          fact_forms, contrast)
        if who_is_who > 0 and any("messages" in r for r in new[:n_curriculum]):
            n_who = min(who_is_who, int(variant_share * n_curriculum))  # within the variants' share, as they are
            extra += persona.who_is_who(cur, n_who, random.Random(seed * 1_000_003 + child + 17), taught,
                                        [q["question"] for q in cur.about_user],
                                        persona.user_facts(inbox_rows + rehearse + extra)
                                        if settings.who_is_who_beside_taught else ())
        if settings.noted > 0 and any("messages" in r for r in new[:n_curriculum]):
            from evolution.retrieval import noted_records

            extra += noted_records(cur, min(settings.noted, int(variant_share * n_curriculum)),
                                   random.Random(seed * 1_000_003 + child + 23), taught,
                                   [q["question"] for q in cur.about_user])
        # the curriculum answers its own prompts: no variant may reword a question into one of them
        extra = [r for r in extra if _key(r) not in have and prompt_key(r["messages"]) not in curriculum_prompts]
        new += extra
        budget = (capped or {}).get(stage.name)
        if budget is not None and len(new) > budget:
            n_all = len(new)
            new = _within(new, budget, inbox_rows, rehearse + extra, random.Random(seed * 1_000_003 + child + 19))
            kept = {id(r) for r in new}
            extra = [r for r in extra if id(r) in kept]
            capped_counts[stage.name] = {"kept": len(new), "left": n_all - len(new)}
        made[stage.name] = sum("source" in r for r in extra)
        who[stage.name] = sum("unanswered" in r and "noted" not in r for r in extra)
        noted[stage.name] = sum("noted" in r for r in extra)
        data[stage.name] = new
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in data.items():
        _write_jsonl(out / f"{name}.jsonl", rows)
    if held:
        _write_jsonl(out / HELDOUT_FILE, held)
    files = {f"curriculum/{k}": v for k, v in cur.manifest()["files"].items()} | sources
    manifest = {
        "curriculum": str(cur.root),
        "files": files,
        "replayed": replayed,
        "rehearsed": rehearsed,
        "lived": {name: keys for name, keys in lived_keys.items() if keys},
        "variants": made,
        "who_is_who": {name: n for name, n in who.items() if n},
        "noted": {name: n for name, n in noted.items() if n},
        "capped": capped_counts,
        "known": {name: {"retaught": k[0], "left_to_replay": k[1]} for name, k in known_counts.items()},
        "counts": {name: len(rows) for name, rows in data.items()},
        "conversations": {"taken": taken_from_inbox,
                          "through": max([through] + [c for c, _ in conversations]) if read_inbox else through,
                          "superseded": superseded},
        "experiences": {"taken": len(inbox.examples) + len(inbox.pairs) if read_ratings else 0,
                        "through": inbox.ratings_through if read_ratings else inbox.ratings_since},
        "heldout": {HELDOUT_FILE: len(held)},
        "data": {f: sha256_file(out / f) for f in [f"{name}.jsonl" for name in data] + ([HELDOUT_FILE] if held else [])},
    }
    manifest["sha256"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


CAPPED_TAUGHT_SHARE = 0.5
"""Of the records a capped stage sees (``materialize``'s ``capped``), at most this share is what was taught since
the parent: the rest keeps the curriculum's recall (the quick child's gate asks it as it asks the facts)."""


def _within(records: list[dict], budget: int, first: list[dict], then: list[dict], rng: random.Random) -> list[dict]:
    """``budget`` of ``records`` in their order: ``first`` (the inbox's) and a sample of ``then`` (rehearsed,
    variants, who-is-who) up to ``CAPPED_TAUGHT_SHARE`` of it, the others sampled to fill the rest."""
    mine = {id(r) for r in first + then}
    others = [r for r in records if id(r) not in mine]
    share = max(1, int(budget * CAPPED_TAUGHT_SHARE), budget - len(others))  # more where the others leave room
    taught = first[:share]
    taught += rng.sample(then, min(len(then), share - len(taught)))
    keep = {id(r) for r in taught} | {id(r) for r in rng.sample(others, min(len(others), budget - len(taught)))}
    return [r for r in records if id(r) in keep]


def read(data_dir: Path, stages: Sequence[str]) -> dict[str, list[dict]]:
    """The records each of ``stages`` trains on, by stage name (none for a stage without a file)."""
    return {name: _read_jsonl(data_dir / f"{name}.jsonl") for name in stages}
