"""Typed configuration of an age-up: one dataclass per section, defaults beside their units, overrides on top.

The sections of the TOML file: ``[curriculum]``, ``[export]``, ``[daemon]`` and ``[retention]`` are
declared here; ``[train]`` and ``[gate]`` are assembled from their units. ``TrainConfig`` is the
shared ``[train]`` settings (``evolution.train.settings``) with one sub-section ``[train.<name>]``
per training stage of ``evolution.train.STAGES``, whose dataclass the stage's module declares;
``GateConfig`` is the gate's own settings (``evolution.metrics.common.GateSettings``) with the fields
every metric unit of ``evolution.metrics.TABLE`` declares in its module, flat, as ``[gate]`` has them.
A new stage or metric brings its settings with it; nothing here changes.

Resolution order: the defaults, then ``--quick`` (the ``QUICK`` preset), then a TOML
file (``--config FILE``, or ``$EVOLUTION_HOME/evolution.toml`` when present), then explicit
command-line flags. The resolved config of every generation is stored in its directory
(``config.json``) so the run can be reproduced. ``validate`` reports every bad field at once;
each section (and each unit's settings) says what is wrong with its own fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from evolution.checks import flag, positive_int, positive_num, share_or_unset
from evolution.errors import ConfigError
from evolution.metrics import TABLE, GateSettings
from evolution.paths import REPO_ROOT
from evolution.train import STAGES, TrainSettings

log = logging.getLogger(__name__)

QUANTIZATIONS = ("f16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0")


@dataclass(slots=True)
class CurriculumConfig:
    """What to learn from."""

    path: str = str(REPO_ROOT / "curriculum")
    """Curriculum directory (format: curriculum/README.md)."""
    phases: list[int] | None = None
    """Phase numbers to train on; None trains on every phaseN_* folder."""
    replay_ratio: float = 0.25
    """Replay: add this many earlier-generation examples per new example (sampled, deduplicated)."""
    experience_heldout: float = 0.2
    """Share of the newly rated experiences that teach nothing new (the model's own replies rated good or bad,
    transcripts rated bad) held out from every training stage (seeded), for the gate's ``preference_margin``, once
    at least ``replay.HELDOUT_MIN`` (10) are new; 0 holds out none. A correction or a transcript rated good is never
    held out: it is the only place the user's fact is (the new-user walk lost one of 8 facts that way)."""
    experience_variants: int = 32
    """Each question the agent's user asked since the parent (in a transcript, a reply rated good, a correction)
    is also trained on in this many variants (``evolution.augment``: restatements in other shapes, contrasts with the
    user's other facts and the persona, framings), kept in the generation's data so replay rehearses them; 0 turns
    it off. One record among ~1,500, seen 1.5 times, taught the form of an answer but not the fact (issue 15); a
    dozen framings of one sentence taught the sentence, not the fact (issue 27: docs/learning.md)."""
    experience_variant_share: float = 0.4
    """The variants of one age-up are at most this share of the SFT curriculum's records (fewer per question
    past it), so a large inbox does not make an age-up much longer. A variant is about half a curriculum record's
    length, so the SFT time grows by about half this share at most."""
    known_share: float = 0.1
    """Of the curriculum's chat records the parent's lineage already trained on, this share (a seeded sample that
    rotates per generation) is re-taught at an age-up; the rest is left to replay (``replay_ratio``). 1 re-teaches
    the whole curriculum every time: each re-fit of known data moves the weights as much as new data (Adam), and
    five quick age-ups took held-out prose perplexity 43.8 -> 61.3 (issue 17; docs/learning.md, "No ratchet")."""
    fact_forms: bool = True
    """Each fact's variants restate it in the other shapes its question can take, ask about its subject and ask it
    back from its value (``evolution.augment.restated``); off: issue 15's framings of the taught question only."""
    who_is_who: int = 288
    """Records per age-up that keep the user apart from the agent's persona (``evolution.persona.who_is_who``:
    questions about the user nobody answered, mirrored from the identity curriculum, answered "I don't know that
    yet", half of them beside the agent's own question and its persona answer); with it each fact's variants are also
    set against the persona. At most ``experience_variant_share`` x the SFT curriculum's records (a tiny curriculum
    gets a few). 0 turns both off."""
    who_is_who_beside_taught: bool = True
    """A third of the ``who_is_who`` records set the question nobody answered beside one the user did answer, of the
    same shape where there is one ("Who made my boat?" -> "I don't know that yet" beside "Who made my car?" -> its
    taught maker), instead of half of them beside the agent's own question; where the taught question asks a name
    ("What is my brother's name?"), the one beside it is the same question about someone nobody named ("What is my
    plumber's name?": ``persona.other_subject``). On by default since two learn-bench runs (24 facts,
    docs/learning.md): held-out wordings 0.89 and 0.91 against the default's 0.83 before, no persona leak, a pass,
    SFT tokens +3 %. False: half of the records beside the agent's own question instead."""
    noted: int = 0
    """Records per age-up that teach answering from retrieval's notes (``evolution.retrieval.noted_records``: a
    question about the user from the curriculum's ``noted.jsonl`` in the prompt retrieval builds, with a note holding a
    value drawn per record, answered from the note; one in four with notes that do not answer it, answered "I don't
    know that yet"). At most ``experience_variant_share`` x the SFT curriculum's records, as ``who_is_who``; 0 turns
    them off. Off by default: a default child follows the notes without them (0.89 of held-out wordings, docs/
    learning.md) and its learn bench with them is not measured yet; the quick preset sets 96 (a quick child without
    them said "I don't know" to nearly every question a note answered: 0.27 -> 0.74 with them)."""
    rehearse_max: int = 1500
    """Earlier experience (posted conversations, approved and corrected replies, and their variants, in every earlier
    generation's data) is re-taught at every age-up, newest first and sources before variants, up to this many
    records; the rest of it is left to replay. Left to replay (``replay_ratio``), a fact taught once was forgotten
    by the next default age-up (learn_bench: 20 of 20 facts, then 5 of 20). 1,500 is about the SFT curriculum's
    size: a later age-up trains at most about that much more. 0 turns it off."""

    def problems(self) -> list[str]:
        p: list[str] = []
        if not isinstance(self.experience_heldout, (int, float)) or not 0 <= self.experience_heldout <= 0.5:
            p.append(f"curriculum.experience_heldout must be between 0 and 0.5, got {self.experience_heldout!r}")
        if not isinstance(self.experience_variants, int) or isinstance(self.experience_variants, bool) \
                or not 0 <= self.experience_variants <= 100:
            p.append(f"curriculum.experience_variants must be an integer from 0 to 100, got "
                     f"{self.experience_variants!r}")
        if not isinstance(self.experience_variant_share, (int, float)) or not 0 <= self.experience_variant_share <= 10:
            p.append(f"curriculum.experience_variant_share must be between 0 and 10, got "
                     f"{self.experience_variant_share!r}")
        if not isinstance(self.known_share, (int, float)) or isinstance(self.known_share, bool) \
                or not 0 <= self.known_share <= 1:
            p.append(f"curriculum.known_share must be between 0 and 1, got {self.known_share!r}")
        p += flag("curriculum.fact_forms", self.fact_forms)
        if not isinstance(self.who_is_who, int) or isinstance(self.who_is_who, bool) \
                or not 0 <= self.who_is_who <= 10_000:
            p.append(f"curriculum.who_is_who must be a whole number from 0 to 10000, got {self.who_is_who!r}")
        p += flag("curriculum.who_is_who_beside_taught", self.who_is_who_beside_taught)
        if not isinstance(self.noted, int) or isinstance(self.noted, bool) or not 0 <= self.noted <= 10_000:
            p.append(f"curriculum.noted must be a whole number from 0 to 10000, got {self.noted!r}")
        if not isinstance(self.rehearse_max, int) or isinstance(self.rehearse_max, bool) or self.rehearse_max < 0:
            p.append(f"curriculum.rehearse_max must be a whole number >= 0, got {self.rehearse_max!r}")
        if not isinstance(self.replay_ratio, (int, float)) or not 0 <= self.replay_ratio <= 10:
            p.append(f"curriculum.replay_ratio must be between 0 and 10, got {self.replay_ratio!r}")
        if self.phases is not None and (not isinstance(self.phases, list)
                                        or not all(isinstance(x, int) and x >= 0 for x in self.phases)):
            p.append(f"curriculum.phases must be a list of phase numbers, got {self.phases!r}")
        if not Path(self.path).is_dir():
            p.append(f"curriculum.path {self.path!r} is not a directory (pass --curriculum PATH)")
        return p


def _copied(cls: type) -> list[tuple]:
    """The fields of dataclass ``cls``, with their defaults, to declare again in a section."""
    return [(f.name, f.type, field(default=f.default, default_factory=f.default_factory))
            for f in dataclasses.fields(cls)]


def _section(name: str, own: type, added: list[tuple], doc: str, **defaults) -> type:
    """A config section: ``own`` (the section's own fields) with ``added``, the fields its units declare, and
    ``defaults``: new default factories of some of ``own``'s fields. A field two of them declare is a programming
    error, refused here, at import."""
    names = [f.name for f in dataclasses.fields(own)] + [n for n, _, _ in added]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TypeError(f"{name}: field(s) {', '.join(twice)} declared twice")
    types = {f.name: f.type for f in dataclasses.fields(own)}
    redeclared = [(k, types[k], field(default_factory=v)) for k, v in defaults.items()]
    return dataclasses.make_dataclass(name, redeclared + added, bases=(own,), slots=True,
                                      namespace={"__doc__": doc, "__module__": __name__})


TrainConfig = _section("TrainConfig", TrainSettings, [(s.name, s.config, field(default_factory=s.config))
                                                      for s in STAGES],
                       TrainSettings.__doc__, stages=lambda: [s.name for s in STAGES])
"""``[train]``: ``TrainSettings`` (what every stage shares, ``evolution.train.settings``) and one section
``[train.<name>]`` per stage unit of ``evolution.train.STAGES`` (its ``config``, declared beside the unit:
``train.cpt.CptConfig``, ``train.sft.SftConfig``, ``train.preference.PreferenceConfig``); ``stages`` runs
every unit, in ``STAGES`` order, unless set."""


DEPRECATED_TRAIN_KEYS: dict[str, tuple[str, str]] = {
    # The flat keys of the time before [train.cpt] / [train.sft]: still read, with a warning.
    "cpt_block_size": ("cpt", "block_size"), "cpt_epochs": ("cpt", "epochs"),
    "cpt_max_steps": ("cpt", "max_steps"), "cpt_lr": ("cpt", "lr"),
    "sft_max_len": ("sft", "max_len"), "sft_epochs": ("sft", "epochs"),
    "sft_max_steps": ("sft", "max_steps"), "sft_lr": ("sft", "lr"),
}


@dataclass(slots=True)
class ExportConfig:
    """Merge, convert, quantize and check."""

    quantization: str = "q8_0"
    """GGUF type served: one of QUANTIZATIONS ('f16' skips quantizing)."""
    merged_dtype: str = "float32"
    """dtype of the merged HF weights the next generation trains on."""
    keep_f16: bool = False
    """Keep the intermediate f16 GGUF in the generation directory."""
    smoke_prompt: str = "Hello! Please introduce yourself in one sentence."
    """Asked of every exported GGUF (load check) and by the gate's smoke rule, within ``gate.smoke_max_tokens``."""

    def problems(self) -> list[str]:
        p = []
        if self.quantization not in QUANTIZATIONS:
            p.append(f"export.quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.merged_dtype not in ("float32", "float16", "bfloat16"):
            p.append(f"export.merged_dtype must be float32, float16 or bfloat16, got {self.merged_dtype!r}")
        return p


@dataclass(slots=True)
class TasksConfig:
    """``[tasks]``: task adapters (``evolution.tasks``): one LoRA per task on top of each passed generation.

    A chat to ``evolution[-LINEAGE]:TASK``, a transcript or probe posted with ``"task"``, is the task's: kept out
    of the lineage's own training, trained into the task's adapter, answered with it applied."""

    names: list[str] = field(default_factory=list)
    """The tasks (lower-case letters, digits, '-' and '_'; e.g. ["review", "planning"]); none: no adapters."""
    min_rows: int = 4
    """New taught rows (transcripts, replies rated good, corrections) a task needs before an age-up trains its
    adapter again; with fewer, the adapter it has is carried to the child (if it still passes there)."""
    max_steps: int = 60
    """SFT steps of one task adapter (its rows are few: epochs over them, up to this)."""
    epochs: float = 4.0
    """Passes over a task's rows (and their rehearsal rows), capped by ``max_steps``."""
    lr: float = 1e-3
    """The adapter's learning rate (a fresh LoRA on few rows; ``[train.sft] lr`` is the lineage's own)."""
    rehearse: float = 8.0
    """Rows of the child's own SFT data trained beside each task row, so that the adapter learns what is the task's
    and leaves the rest as it was. 0 trains on the task's rows alone. On a default child of the embedded model
    (recall 0.962) with 8 task rows: rehearse 1 (8 epochs) dropped the lineage's recall with the adapter to 0.846 and
    failed the gate, rehearse 4 to 0.885; rehearse 8 (4 epochs) kept 0.923 and taught the task (ROUGE-L 0 -> 0.861,
    probes 0 -> 1)."""
    min_gain: float = 0.05
    """The adapter's replies to its taught prompts must come this much closer (mean ROUGE-L) to the taught replies
    than the generation's own replies."""
    recall_tolerance: float = 0.05
    """The lineage's recall with the adapter applied may fall at most this much below the generation's own."""
    stacks: dict[str, list[str]] = field(default_factory=dict)
    """Adapters applied together, in order, for a task: ``review = ["git", "review"]`` answers ``:review`` with
    both. A task not listed gets its own adapter alone."""

    def stack(self, task: str) -> list[str]:
        """The adapters applied, in order, for a request to ``task``."""
        return list(self.stacks.get(task) or [task])

    def problems(self) -> list[str]:
        from evolution.serving import TASK_RE

        p = []
        if not isinstance(self.names, list) or not all(isinstance(n, str) and TASK_RE.match(n) for n in self.names):
            p.append(f"tasks.names must be a list of names (lower-case letters, digits, '-', '_'; at most 40), "
                     f"got {self.names!r}")
        elif len(set(self.names)) != len(self.names):
            p.append(f"tasks.names lists a task twice: {self.names!r}")
        p += positive_int("tasks.min_rows", self.min_rows) + positive_int("tasks.max_steps", self.max_steps)
        if isinstance(self.rehearse, bool) or not isinstance(self.rehearse, (int, float)) or self.rehearse < 0:
            p.append(f"tasks.rehearse must be a number >= 0, got {self.rehearse!r}")
        p += positive_num("tasks.epochs", self.epochs) + positive_num("tasks.lr", self.lr) + share_or_unset("tasks.min_gain", self.min_gain, bools=False)
        p += share_or_unset("tasks.recall_tolerance", self.recall_tolerance, bools=False)
        if not isinstance(self.stacks, dict):
            p.append(f"tasks.stacks must be a table of task = [tasks...], got {self.stacks!r}")
        else:
            names = set(self.names) if isinstance(self.names, list) else set()
            for task, stack in self.stacks.items():
                if task not in names:
                    p.append(f"tasks.stacks.{task}: {task!r} is not in tasks.names {sorted(names)}")
                elif not isinstance(stack, list) or not stack or any(n not in names for n in stack):
                    p.append(f"tasks.stacks.{task} must be a non-empty list of tasks from tasks.names, got {stack!r}")
        return p


GateConfig = _section("GateConfig", GateSettings, [f for u in TABLE if u.config is not None for f in _copied(u.config)],
                      GateSettings.__doc__)
"""``[gate]``, flat: ``GateSettings`` (the gate's own: ``answer_max_tokens``, ``stop_after``) and the fields of
every metric unit's ``config`` of ``evolution.metrics.TABLE``, declared beside the unit
(``metrics.recall.RecallConfig``: ``min_recall``, ``recall_margin``, …)."""


@dataclass(slots=True)
class AgeUpConfig:
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    quick: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict) -> "AgeUpConfig":
        cfg = cls()
        apply_overrides(cfg, d)
        return cfg


@dataclass(slots=True)
class DaemonConfig:
    """The daemon beside the chat agent (``run_daemon.py``): section ``[daemon]`` of the TOML file."""

    host: str = "127.0.0.1"
    """Address to listen on; loopback by default (anything else needs ``allow_remote``)."""
    port: int = 8765
    allow_remote: bool = False
    """Allow binding a non-loopback address (then set an API token and keep chat behind it)."""
    threshold: float = 100.0
    """Karma per age-up."""
    threshold_growth: float = 1.0
    """Each age-up needs this many times the karma of the one before (1: constant)."""
    api_token: str | None = None
    """Bearer token for write endpoints; else $EVOLUTION_API_TOKEN, else one generated into
    <data root>/daemon.token on first start."""
    chat_requires_token: bool = False
    n_ctx: int = 2048
    """Context window of the served model."""
    chat_threads: int | None = None
    """llama.cpp threads (None: all cores but one, so a busy neighbour cannot stall every reply;
    see ``serving.default_threads``)."""
    train_threads: int | None = None
    """torch threads of the background age-up (None: all cores; it runs at lower priority)."""
    train_nice: int = 10
    """How much lower the age-up's CPU priority is (0-19): chat stays responsive while it trains."""
    max_tokens: int = 512
    """Reply length when a request gives none."""
    max_body_bytes: int = 1_048_576
    """Largest request body (chat); larger ones get 413."""
    max_conversation_bytes: int = 262_144
    """Largest posted transcript."""
    canary_prompt: str = "Hello! Who are you?"
    """Asked of every model before it is swapped in; it must answer with some text."""
    canary_max_tokens: int = 24
    poll_seconds: float = 1.0
    """How often the scheduler checks for karma, a finished age-up or a rollback made elsewhere."""
    retry_after_s: float = 300.0
    """A failed age-up (a full disk, say) is retried after this long, doubling each time..."""
    max_attempts: int = 4
    """...up to this many attempts; then its request is marked failed (and the error shown in /status)."""
    shutdown_grace_s: float = 120.0
    """On SIGTERM: how long a training age-up may take to write its checkpoint before it is killed."""
    idle_unload_s: float = 0.0
    """Unload the served model after this many seconds without a request, and load it again on the
    next one (as Ollama's keep_alive); 0 keeps it loaded. For one daemon serving several lineages."""
    older_max: int = 2
    """How many gated generations other than the served one may be loaded at once to answer requests that name
    them (``model="evolution@N"``, for comparison); the least recently used is let go first. 0 turns asking
    by name off."""
    older_memory_mb: float = 1024.0
    """...and how many MB of GGUF files they may hold between them (a loaded model maps its whole file): the
    children of the embedded model are 138 MB (q8_0)."""
    capture: bool = True
    """Keep every served chat completion (scrubbed, like posted conversations) so it can be rated with
    ``POST /feedback`` or ``evolve feedback``; a request's OpenAI ``store: false`` opts it out."""
    capture_max: int = 10_000
    """How many served chats are kept; past it the oldest unrated ones are deleted first. 10,000 is
    weeks of a chat agent's traffic at hundreds of chats a day (time enough to rate them), tens of MB
    of SQLite at a few KB per chat, and a bound under which capture stays one INSERT and ``evolve
    experiences`` stays instant; only rated ones are trained on, so keeping more buys little."""
    log_max_bytes: int = 10_485_760
    """Size at which ``<data root>/logs/daemon.log`` and ``worker.log`` are rotated (10 MiB)..."""
    log_backups: int = 3
    """...and how many rotated files each keeps (``daemon.log.1`` … ``.3``): at most about
    ``(log_backups + 1) * log_max_bytes`` per log, 40 MiB by default, weeks of a busy daemon's lines."""


@dataclass(slots=True)
class RetentionConfig:
    """``[retention]``: which generations keep their files (``evolution.retention``; ``evolve prune``).

    Always kept whole: generation 0 (the root every adapter chain starts from), the served generation
    and its parent. Also kept: the last ``keep_last`` generations that passed their gate and the best
    ``keep_best`` of those by recall. Every other generation is pruned: its GGUF, merged weights and
    adapter are deleted (the adapter stays while a kept generation descends from it); its ``data/``
    (the records replay trains on), metadata and eval reports stay, and the ledger records what went.
    """

    keep_last: int = 3
    """The most recent generations that passed their gate to keep servable (rollback targets)."""
    keep_best: int = 2
    """The generations with the highest recall to keep servable, besides the last ones."""
    drop_weights: bool = True
    """Delete the merged HF weights (~513 MB fp32 for the embedded model) of kept generations other than the
    served one and its parent (generation 0's only while its base model can make them again:
    ``retention.base_remakeable``); they stay servable (their GGUF is kept), and the weights are rebuilt from
    the nearest ancestor's (or the base model) and the adapters when an age-up trains from one (after a
    rollback)."""
    after_promotion: bool = True
    """The daemon prunes after each decided age-up (promoted or rejected); false leaves pruning to `evolve prune`."""


@dataclass(slots=True)
class RetrievalConfig:
    """``[retrieval]``: what the user taught since the served generation, given to it in the chat (``evolution.retrieval``).

    Until an age-up's child learns a lesson, the served generation does not know it; retrieval finds the lessons
    that bear on a chat's last question and puts them in its prompt, marked as notes (data, not instructions).
    A lesson leaves once a served generation answered it right at its gate without retrieval."""

    enabled: bool = True
    """Off: chats are answered by the weights alone (a request can also opt out: ``"retrieval": false`` in its body
    or the header ``X-Evolution-Retrieval: off``)."""
    top_k: int = 3
    """At most this many lessons go into one prompt (the best matches of the chat's last question)."""
    max_tokens: int = 256
    """...and at most about this many tokens of them (counted as characters / 3, an upper bound for English)."""
    backend: str = "fts5"
    """``fts5``: SQLite full-text search (BM25), built in, nothing to download. ``chroma``: a ChromaDB store
    (``pip install 'evolution[chroma]'``), searched by embeddings (``chroma_embedding``)."""
    chroma_path: str = ""
    """``chroma``: the persistent Chroma directory (relative to the lineage's folder); empty: ``index/chroma``."""
    chroma_embedding: str = "default"
    """``chroma``: ``default``, Chroma's own embedding model (downloaded once into ``~/.cache/chroma``), or
    ``gguf``, generation 0's GGUF through llama.cpp (offline, but a chat model is a weaker embedder)."""


BACKENDS = ("fts5", "chroma")
CHROMA_EMBEDDINGS = ("default", "gguf")
CHROMA_MISSING = ("retrieval.backend is \"chroma\" but ChromaDB is not installed: pip install 'evolution[chroma]', "
                  "or set [retrieval] backend = \"fts5\" (built in)")


def validate_retrieval(r: RetrievalConfig) -> None:
    p = []
    if not isinstance(r.enabled, bool):
        p.append(f"retrieval.enabled must be true or false, got {r.enabled!r}")
    if isinstance(r.top_k, bool) or not isinstance(r.top_k, int) or not 1 <= r.top_k <= 50:
        p.append(f"retrieval.top_k must be an integer from 1 to 50 (lessons per prompt), got {r.top_k!r}")
    if isinstance(r.max_tokens, bool) or not isinstance(r.max_tokens, int) or not 16 <= r.max_tokens <= 8192:
        p.append(f"retrieval.max_tokens must be an integer from 16 to 8192 (prompt tokens of lessons), "
                 f"got {r.max_tokens!r}")
    if r.backend not in BACKENDS:
        p.append(f"retrieval.backend must be one of {', '.join(BACKENDS)}, got {r.backend!r}")
    if r.chroma_embedding not in CHROMA_EMBEDDINGS:
        p.append(f"retrieval.chroma_embedding must be one of {', '.join(CHROMA_EMBEDDINGS)}, "
                 f"got {r.chroma_embedding!r}")
    if not isinstance(r.chroma_path, str):
        p.append(f"retrieval.chroma_path must be a folder path (text), got {r.chroma_path!r}")
    if r.backend == "chroma" and importlib.util.find_spec("chromadb") is None:
        p.append(CHROMA_MISSING)
    if p:
        raise ConfigError(p)


@dataclass(slots=True)
class StalenessConfig:
    """``[staleness]``: when the served generation has fallen behind what it should know, ask for an age-up
    without waiting for karma (``evolution.staleness``).

    Every ``check_every_s`` the daemon asks the served model, without retrieval, the lessons pending in
    retrieval, the agent's probes and the curriculum's recall items that changed since the served generation was
    gated, and hashes the declared ``sources``. Drift is the share of those it answers wrong (a changed source
    counts as one wrong item); at ``threshold`` or more it records a ``stale`` request in the ledger and the
    age-up runs as a karma one would, at most once per ``cooldown_s``."""

    enabled: bool = True
    sources: list[str] = field(default_factory=list)
    """Files or folders besides the curriculum whose change makes the served generation stale (an agent's
    conventions files, say); relative paths are from the lineage's home (the data root for ``main``)."""
    threshold: float = 0.5
    """Drift (the share of items answered wrong) at which an age-up is requested: 0.5 is half of what the user
    taught or changed since the served generation still unknown to its weights."""
    min_items: int = 4
    """Fewer items than this (asked, plus changed sources) measure no drift: one wrong answer is no trend."""
    max_items: int = 40
    """At most this many items are asked per check (the newest first): about 20 s of the served model's time."""
    check_every_s: float = 3600.0
    """How often drift is measured (seconds)."""
    cooldown_s: float = 86400.0
    """At most one staleness request per this many seconds (a day), whatever the drift."""


def validate_staleness(s: StalenessConfig) -> None:
    import math

    p = []
    if not isinstance(s.enabled, bool):
        p.append(f"staleness.enabled must be true or false, got {s.enabled!r}")
    if not isinstance(s.sources, list) or not all(isinstance(x, str) and x.strip() for x in s.sources):
        p.append(f"staleness.sources must be a list of file or folder paths, got {s.sources!r}")
    if isinstance(s.threshold, bool) or not isinstance(s.threshold, (int, float)) or not 0 < s.threshold <= 1:
        p.append(f"staleness.threshold must be a share in (0, 1], got {s.threshold!r}")
    for name, lo, hi in (("min_items", 1, 10_000), ("max_items", 1, 10_000)):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            p.append(f"staleness.{name} must be an integer from {lo} to {hi}, got {v!r}")
    for name, lo in (("check_every_s", 10.0), ("cooldown_s", 0.0)):
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
            p.append(f"staleness.{name} must be a number of seconds >= {lo:g}, got {v!r}")
    if p:
        raise ConfigError(p)


def validate_retention(r: RetentionConfig) -> None:
    p = [f"retention.{name} must be an integer >= 0, got {getattr(r, name)!r}" for name in ("keep_last", "keep_best")
         if isinstance(getattr(r, name), bool) or not isinstance(getattr(r, name), int) or getattr(r, name) < 0]
    p += [f"retention.{name} must be true or false, got {getattr(r, name)!r}" for name in ("drop_weights",
          "after_promotion") if not isinstance(getattr(r, name), bool)]
    if p:
        raise ConfigError(p)


def validate_daemon(d: DaemonConfig) -> None:
    import ipaddress
    import math

    p: list[str] = []
    try:
        loopback = d.host == "localhost" or ipaddress.ip_address(d.host).is_loopback
    except ValueError:
        loopback = False
        p.append(f"daemon.host must be an IP address or 'localhost', got {d.host!r}")
    if not loopback and not d.allow_remote and not p:
        p.append(f"daemon.host {d.host!r} is not a loopback address; set daemon.allow_remote = true (and an "
                 "api_token) to listen beyond this machine")
    if not isinstance(d.port, int) or isinstance(d.port, bool) or not 0 <= d.port <= 65535:
        p.append(f"daemon.port must be 0-65535, got {d.port!r}")
    for name in ("threshold", "threshold_growth", "poll_seconds", "shutdown_grace_s", "retry_after_s"):
        v = getattr(d, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            p.append(f"daemon.{name} must be a positive number, got {v!r}")
    if isinstance(d.threshold_growth, (int, float)) and d.threshold_growth < 1:
        p.append(f"daemon.threshold_growth must be >= 1, got {d.threshold_growth!r}")
    for name in ("n_ctx", "max_tokens", "max_body_bytes", "max_conversation_bytes", "canary_max_tokens",
                 "max_attempts"):
        v = getattr(d, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            p.append(f"daemon.{name} must be a positive integer, got {v!r}")
    for name in ("chat_threads", "train_threads"):
        v = getattr(d, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            p.append(f"daemon.{name} must be a positive integer (or unset), got {v!r}")
    if isinstance(d.older_max, bool) or not isinstance(d.older_max, int) or d.older_max < 0:
        p.append(f"daemon.older_max must be an integer >= 0 (0: no generation by name), got {d.older_max!r}")
    v = d.older_memory_mb
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        p.append(f"daemon.older_memory_mb must be a number of MB > 0, got {v!r}")
    v = d.idle_unload_s
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        p.append(f"daemon.idle_unload_s must be a number of seconds >= 0 (0: never unload), got {v!r}")
    if isinstance(d.train_nice, bool) or not isinstance(d.train_nice, int) or not 0 <= d.train_nice <= 19:
        p.append(f"daemon.train_nice must be 0-19, got {d.train_nice!r}")
    if not isinstance(d.capture, bool):
        p.append(f"daemon.capture must be true or false, got {d.capture!r}")
    if isinstance(d.capture_max, bool) or not isinstance(d.capture_max, int) or not 0 < d.capture_max <= 10_000_000:
        p.append(f"daemon.capture_max must be an integer from 1 to 10000000 (served chats kept), got {d.capture_max!r}")
    if isinstance(d.log_max_bytes, bool) or not isinstance(d.log_max_bytes, int) or d.log_max_bytes < 4096:
        p.append(f"daemon.log_max_bytes must be an integer of at least 4096 (bytes), got {d.log_max_bytes!r}")
    if isinstance(d.log_backups, bool) or not isinstance(d.log_backups, int) or not 1 <= d.log_backups <= 100:
        # 0 would make RotatingFileHandler never rotate: an unbounded log
        p.append(f"daemon.log_backups must be an integer from 1 to 100, got {d.log_backups!r}")
    if d.api_token is not None and (not isinstance(d.api_token, str) or len(d.api_token) < 16):
        p.append("daemon.api_token must be a string of at least 16 characters")
    if p:
        raise ConfigError(p)


def _load_toml(config_file: str | Path | None, home: Path | None) -> tuple[dict, str | None]:
    if config_file is None and home is not None and (home / "evolution.toml").is_file():
        config_file = home / "evolution.toml"
    if config_file is None:
        return {}, None
    path = Path(config_file)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), str(path)
    except FileNotFoundError:
        raise ConfigError([f"config file {path} not found"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None


def _resolve_section(obj, section: str, config_file: str | Path | None, overrides: dict | None,
                     home: Path | None, check):
    """Set ``obj``'s fields from ``[section]`` of the TOML file, then from flags; ``check`` it (a ConfigError
    naming every bad field)."""
    data, where = _load_toml(config_file, home)
    names = {f.name for f in dataclasses.fields(obj)}
    problems = []
    for source, values in ((where, data.get(section, {})), ("flag", overrides or {})):
        for k, v in values.items():
            if k not in names:
                problems.append(f"{source}: [{section}] has no field {k!r} (known: {', '.join(sorted(names))})")
            else:
                setattr(obj, k, None if v == "off" else v)
    if problems:
        raise ConfigError(problems)
    check(obj)
    return obj


def resolve_daemon(config_file: str | Path | None = None, overrides: dict | None = None,
                   home: Path | None = None) -> DaemonConfig:
    """Defaults, then ``[daemon]`` of the TOML file, then flags; validated."""
    return _resolve_section(DaemonConfig(), "daemon", config_file, overrides, home, validate_daemon)


def resolve_retrieval(config_file: str | Path | None = None, overrides: dict | None = None,
                      home: Path | None = None) -> RetrievalConfig:
    """Defaults, then ``[retrieval]`` of the TOML file, then flags; validated."""
    return _resolve_section(RetrievalConfig(), "retrieval", config_file, overrides, home, validate_retrieval)


def resolve_staleness(config_file: str | Path | None = None, overrides: dict | None = None,
                      home: Path | None = None) -> StalenessConfig:
    """Defaults, then ``[staleness]`` of the TOML file, then flags; validated."""
    return _resolve_section(StalenessConfig(), "staleness", config_file, overrides, home, validate_staleness)


def resolve_retention(config_file: str | Path | None = None, overrides: dict | None = None,
                      home: Path | None = None) -> RetentionConfig:
    """Defaults, then ``[retention]`` of the TOML file, then flags; validated."""
    return _resolve_section(RetentionConfig(), "retention", config_file, overrides, home, validate_retention)


QUICK: dict = {
    # A whole age-up of the embedded 135M model in a few minutes on a 2-core CPU:
    # a short CPT pass, then enough SFT steps to learn the identity facts.
    "quick": True,
    # Who is who at its earlier 192: at 288 (the default since b1e709d) the quick child of the embedded-model test
    # was rejected on style drift (2.06 > 2.0): in 100 steps its many "I don't know" replies outweigh the style.
    # Beside taught questions off (the default is on): one quick learn-bench run with it on kept curriculum recall at
    # 0.77 against 0.92 with it off (docs/bench/2026-12-07-learn-quick-trial-beside.md); 100 steps have no room for it.
    # Notes in training: a quick child without them declined what its notes answered (retrieval bench, held-out
    # wordings 0.27 -> 0.74 with 96); with 24 facts they cost the weights (learn bench: held-out 0.53 -> 0.37, leaks
    # 0.057 -> 0.15, both rejected; docs/learning.md): in 100 steps they take rows from the facts' variants.
    "curriculum": {"who_is_who": 192, "who_is_who_beside_taught": False, "noted": 96},
    # Preference steps are capped too: each runs the parent beside the child (a reference forward).
    "train": {"cpt": {"max_steps": 6}, "sft": {"max_steps": 100, "epochs": 1.0}, "preference": {"max_steps": 20},
              "save_steps": 20},
}


def _set_fields(obj, name: str, values: dict, where: str, problems: list[str]) -> None:
    """Set the fields of dataclass ``obj`` (section ``name``) from ``values``; a nested table sets a sub-section."""
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in values.items():
        if (name, k) in RETIRED:
            log.warning("%s: [%s] %s is no longer used and is ignored: %s", where, name, k, RETIRED[name, k])
        elif name == "train" and k in DEPRECATED_TRAIN_KEYS:
            stage, field_name = DEPRECATED_TRAIN_KEYS[k]
            log.warning("%s: train.%s is deprecated; use [train.%s] %s", where, k, stage, field_name)
            _set_fields(getattr(obj, stage), f"train.{stage}", {field_name: v}, where, problems)
        elif k not in names:
            problems.append(f"{where}: [{name}] has no field {k!r} (known: {', '.join(sorted(names))})")
        elif dataclasses.is_dataclass(getattr(obj, k)):
            if isinstance(v, dict):
                _set_fields(getattr(obj, k), f"{name}.{k}", v, where, problems)
            else:
                problems.append(f"{where}: [{name}] {k} is a section: write it as [{name}.{k}], got {v!r}")
        else:
            setattr(obj, k, None if v == "off" else v)  # TOML has no null: "off" unsets a field


RETIRED: dict[tuple[str, str], str] = {
    # Fields that older config files and generations' stored config.json still carry: warned about, ignored.
    ("export", "smoke_max_tokens"): "the smoke budget is gate.smoke_max_tokens alone (export's load check "
                                    "and the gate's smoke rule ask the same prompt within it)",
}


def apply_overrides(cfg: AgeUpConfig, overrides: dict, where: str = "override") -> None:
    """Set fields from a nested dict; unknown sections/keys are collected into a ConfigError, retired ones
    (``RETIRED``) are logged and skipped.

    Flat keys of old configs (``train.sft_epochs``) are read into their section
    (``[train.sft] epochs``) with a warning naming the new key.
    """
    problems = []
    for key, value in overrides.items():
        if key == "quick":
            cfg.quick = bool(value)
            continue
        section = getattr(cfg, key, None)
        if not dataclasses.is_dataclass(section) or not isinstance(value, dict):
            problems.append(f"{where}: unknown section [{key}] "
                            "(known: curriculum, train, export, gate, tasks, daemon, retention, retrieval, staleness)")
            continue
        _set_fields(section, key, value, where, problems)
    if problems:
        raise ConfigError(problems)


def _gate_problems(g) -> list[str]:
    """``[gate]``'s bad fields: the gate's own, then each metric unit's, its settings read from ``g``."""
    p = GateSettings.problems(g)
    for u in TABLE:
        if u.config is not None:
            p += u.config(**{f.name: getattr(g, f.name) for f in dataclasses.fields(u.config)}).problems()
    return p


def validate(cfg: AgeUpConfig) -> None:
    """Check every field; raise one ConfigError naming all the bad ones."""
    p = (cfg.train.problems() + cfg.export.problems() + cfg.curriculum.problems() + _gate_problems(cfg.gate)
         + cfg.tasks.problems())
    if p:
        raise ConfigError(p)


def resolve(quick: bool = False, config_file: str | Path | None = None, overrides: dict | None = None,
            home: Path | None = None) -> AgeUpConfig:
    """Defaults, then --quick, then the TOML file, then explicit overrides; validated."""
    cfg = AgeUpConfig()
    if quick:
        apply_overrides(cfg, QUICK, "--quick")
    data, where = _load_toml(config_file, home)
    data.pop("daemon", None)  # the daemon's own section: resolve_daemon
    data.pop("retention", None)  # not part of an age-up (nor of its config hash): resolve_retention
    data.pop("retrieval", None)  # the served model's, not the age-up's: resolve_retrieval
    data.pop("staleness", None)  # the daemon's: resolve_staleness
    if where is not None:
        apply_overrides(cfg, data, where)
    if overrides:
        apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg
