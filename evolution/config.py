"""Typed configuration of an age-up: one dataclass per stage, defaults here, overrides on top.

Resolution order: the defaults below, then ``--quick`` (the ``QUICK`` preset), then a TOML
file (``--config FILE``, or ``$EVOLUTION_HOME/evolution.toml`` when present), then explicit
command-line flags. The resolved config of every generation is stored in its directory
(``config.json``) so the run can be reproduced. ``validate`` reports every bad field at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from evolution.errors import ConfigError
from evolution.paths import REPO_ROOT

log = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
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
    who_is_who: int = 96
    """Records per age-up that keep the user apart from the agent's persona (``evolution.persona.who_is_who``:
    questions about the user nobody answered, mirrored from the identity curriculum, answered "I don't know that
    yet", half of them beside the agent's own question and its persona answer); with it each fact's variants are also
    set against the persona. At most ``experience_variant_share`` x the SFT curriculum's records (a tiny curriculum
    gets a few). 0 turns both off."""
    rehearse_max: int = 1500
    """Earlier experience (posted conversations, approved and corrected replies, and their variants, in every earlier
    generation's data) is re-taught at every age-up, newest first and sources before variants, up to this many
    records; the rest of it is left to replay. Left to replay (``replay_ratio``), a fact taught once was forgotten
    by the next default age-up (learn_bench: 20 of 20 facts, then 5 of 20). 1,500 is about the SFT curriculum's
    size: a later age-up trains at most about that much more. 0 turns it off."""


def _positive_int(name: str, value, allow_none: bool = False) -> list[str]:
    if value is None and allow_none:
        return []
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return [f"{name} must be a positive integer, got {value!r}"]
    return []


def _positive_num(name: str, value) -> list[str]:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        return [f"{name} must be a positive number, got {value!r}"]
    return []


@dataclass(slots=True)
class CptConfig:
    """``[train.cpt]``: continual pretraining, plain causal-LM loss on raw text packed into blocks."""

    block_size: int = 256
    """Tokens per packed block."""
    epochs: float = 1.0
    max_steps: int | None = None
    """Caps the stage's optimizer steps (None: epochs decide)."""
    lr: float = 2e-4

    def problems(self, where: str) -> list[str]:
        return (_positive_int(f"{where}.block_size", self.block_size) + _positive_num(f"{where}.epochs", self.epochs)
                + _positive_int(f"{where}.max_steps", self.max_steps, allow_none=True)
                + _positive_num(f"{where}.lr", self.lr))


@dataclass(slots=True)
class SftConfig:
    """``[train.sft]``: supervised fine-tuning on chat examples, loss on the assistant's tokens only."""

    max_len: int = 384
    """Longest rendered conversation in tokens; longer ones are truncated."""
    epochs: float = 1.5
    max_steps: int | None = None
    """Caps the stage's optimizer steps (None: epochs decide)."""
    lr: float = 1e-3

    def problems(self, where: str) -> list[str]:
        return (_positive_int(f"{where}.max_len", self.max_len) + _positive_num(f"{where}.epochs", self.epochs)
                + _positive_int(f"{where}.max_steps", self.max_steps, allow_none=True)
                + _positive_num(f"{where}.lr", self.lr))


PREFERENCE_METHODS = ("auto", "kto", "dpo", "off")


@dataclass(slots=True)
class PreferenceConfig:
    """``[train.preference]``: preference learning on the ratings of served replies (KTO or DPO), with the
    parent as the reference policy (``evolution.train.preference``)."""

    method: str = "auto"
    """'auto' (DPO on corrections when there are enough, else KTO on ratings when there are enough with both
    labels, else skip), 'kto', 'dpo' or 'off'."""
    min_pairs: int = 8
    """auto: DPO needs at least this many corrections (and at least half as many as the plain ratings, or the
    ratings would be thrown away). Fewer pairs than a batch or two mostly teach the model those few prompts."""
    min_labelled: int = 16
    """auto: KTO needs at least this many labelled replies (ratings plus both sides of each correction), with
    both labels present: KTO's reference point is estimated across the batch, and one label alone gives it
    nothing to contrast."""
    lr: float = 5e-5
    """Learning rate of the LoRA weights. TRL's 1e-6 default is for full fine-tuning; LoRA moves through a
    low-rank update scaled by alpha/r and needs one to two orders of magnitude more."""
    beta: float = 0.1
    """Strength of the pull towards the parent (TRL's and both papers' default): rewards are beta times the
    log-ratio against the parent, so a larger beta allows less drift."""
    epochs: float = 1.0
    max_steps: int | None = None
    """Caps the stage's optimizer steps (None: epochs decide)."""
    max_len: int = 384
    """Longest prompt + reply in tokens (the SFT default: the same conversations fit). Older turns of a longer
    prompt are dropped first; what still does not fit loses the end of its reply (TRL's ``keep_start``)."""
    batch_size: int = 4
    """Examples per forward, instead of ``[train] batch_size`` (KTO needs at least 2: its KL estimate pairs
    each prompt with a neighbour's reply; a DPO example is two sequences)."""
    grad_accum: int = 2
    """Instead of ``[train] grad_accum``."""
    desirable_weight: float | None = None
    """KTO: weight of the good replies' loss. None balances the classes as TRL's docs advise (KTO paper, eq. 8:
    desirable_weight * n_good / (undesirable_weight * n_bad) within [1, 4/3]): it is set to n_bad / n_good."""
    undesirable_weight: float | None = None
    """KTO: weight of the bad replies' loss. None: 1.0."""
    precompute_ref_log_probs: bool = False
    """Score every example under the parent once before training, then free the parent copy, instead of a
    no-grad forward of the parent at every step. Off: on the tiny test model it was no faster (the setup ate
    what it saved), and it is redone on every resume. On: the parent's memory is not held while training."""

    def problems(self, where: str) -> list[str]:
        p = []
        if self.method not in PREFERENCE_METHODS:
            p.append(f"{where}.method must be one of {', '.join(PREFERENCE_METHODS)}, got {self.method!r}")
        for name in ("min_pairs", "min_labelled", "max_len", "grad_accum"):
            p += _positive_int(f"{where}.{name}", getattr(self, name))
        p += _positive_int(f"{where}.max_steps", self.max_steps, allow_none=True)
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 2:
            p.append(f"{where}.batch_size must be an integer of at least 2 (KTO's KL estimate pairs examples "
                     f"within a batch), got {self.batch_size!r}")
        for name in ("lr", "beta", "epochs"):
            p += _positive_num(f"{where}.{name}", getattr(self, name))
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) is not None:
                p += [e.replace("number", "number or unset") for e in _positive_num(f"{where}.{name}",
                                                                                      getattr(self, name))]
        if not isinstance(self.precompute_ref_log_probs, bool):
            p.append(f"{where}.precompute_ref_log_probs must be true or false, got {self.precompute_ref_log_probs!r}")
        return p


@dataclass(slots=True)
class TrainConfig:
    """Training stages in order (continual pretraining, SFT, preference) into one LoRA adapter on the parent.

    Settings shared by every stage live here (``[train]``); each stage has its own section,
    ``[train.<stage>]``, a field of this class named after the stage (``evolution.train``'s stage
    units read theirs).
    """

    stages: list[str] = field(default_factory=lambda: ["cpt", "sft", "preference"])
    """The stages to run, in order; each continues the adapter the one before it left."""
    cpt: CptConfig = field(default_factory=CptConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    backend: str = "auto"
    """'auto' (Unsloth when CUDA and unsloth are present, else 'hf'), 'unsloth' or 'hf'."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 5
    weight_decay: float = 0.0
    seed: int = 0
    save_steps: int = 25
    """Checkpoint every K optimizer steps."""
    save_total_limit: int = 2
    """Keep only the last N checkpoints."""
    threads: int | None = None
    """torch intra-op threads (None: torch's default); with ``processes`` > 1, shared out among the processes."""
    processes: int = 1
    """Data-parallel training processes (DDP under ``torchrun``: gloo on a CPU, NCCL with one GPU each on CUDA).
    ``batch_size`` is per process: the global batch is ``batch_size`` x ``grad_accum`` x ``processes``.
    More than 1 trains on the ``hf`` backend ('auto' picks it; 'unsloth' is refused)."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass to save memory (a third more compute). None: on for
    CUDA, off on a CPU, where a small model's activations fit in memory easily."""
    precision: str = "auto"
    """'auto' (bf16 autocast where the CPU has AVX512-BF16/AMX or the GPU supports bf16, else fp32),
    'bf16' or 'fp32'. LoRA weights and the optimizer stay fp32 either way."""

    def stage_sections(self) -> dict[str, CptConfig | SftConfig | PreferenceConfig]:
        """Every stage's own section, by stage name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if dataclasses.is_dataclass(getattr(self, f.name))}


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


@dataclass(slots=True)
class GateConfig:
    """When a child may be served. Measured on the quantized GGUF, child against parent.

    Absolute thresholds (``min_recall``, ``max_style_drift``) must be set: with either unset the
    gate passes nothing. Margins are non-inferiority bounds against the parent; None disables one.
    Calibration on the embedded model and on measured children: docs/learning.md.
    """

    min_recall: float | None = 0.7
    """Child recall (fraction of recall items answered correctly) must be at least this."""
    max_style_drift: float | None = 2.0
    """Child style drift from the style references, in reference standard deviations, at most this."""
    recall_margin: float | None = 0.05
    identity_recall_margin: float | None = 0.02
    """Recall of the persona's own facts (the identity phase's items) may not fall more than this below the parent's:
    what keeps the user's facts apart from the agent's must not take the agent's away (issue 27)."""
    """Child recall may not fall more than this below the parent's (forgetting)."""
    generalization_margin: float | None = 0.10
    """Held-out question accuracy may not fall more than this below the parent's."""
    max_perplexity_ratio: float | None = 1.5
    """Held-out text perplexity may be at most this multiple of the parent's."""
    min_probe_items: int = 5
    """``probe_recall`` needs at least this many probes (``POST /probes``) to count; with fewer it says
    "not enough data" and does not block. With five, one probe is 0.2: the coarsest step ``probe_margin``
    can still tell from no change."""
    probe_margin: float | None = 0.2
    """Probe recall may not fall more than this below the parent's: a taught fact forgotten shows. 0.2 is
    one probe in the minimum five. Measured (docs/learning.md): children that learned their facts gained 0.93
    (the learn benchmark's 40 probes) and 1.0 (the parent did not know them), so it holds no learning
    child back; it catches a child that forgot what its parent had been taught faster than it learned the new facts
    (all probes are asked every generation, so the older ones weigh in)."""
    probe_forgotten_max: float | None = 0.1
    """Of the probes the parent answered right, the child may answer at most this share wrong (with at least
    ``min_probe_items`` answered right by the parent; else not enough data). ``probe_margin`` compares means, and
    new facts learned hide old ones forgotten: a child that answered 34 of the 40 new probes and forgot 23 of the
    31 older ones its parent knew gained 0.15 and passed it (learn_bench, before experience was rehearsed)."""
    min_experience_items: int = 5
    """``experience_similarity`` needs this many approved or corrected replies the child trained on: with
    fewer, one reply moves the mean by more than 0.2 and it says "not enough data"."""
    experience_margin_se: float = 2.0
    """``experience_similarity`` may also fall this many paired standard errors (of the per-item change, child
    minus parent) below the parent when that is more than ``experience_margin``: on few items one reworded reply
    moves the mean past the margin. The learn bench's round-3 child learned its 20 new facts (0.95) and kept the
    first round's (1.00), and lost 0.056 on 18 items with a paired SE of 0.076 (three replies: a reworded one, the
    curriculum's name over an approved other name, a greeting): rejected at 0.05 alone."""
    experience_margin: float | None = 0.05
    """The child's replies to its experiences' prompts may be at most this much further (mean ROUGE-L) from
    the approved replies than its parent's. Measured (docs/learning.md): children that learned gain 0.43-0.87; the
    same age-up run twice differs by 0.002. A quick child (60 SFT steps, which teach a fact's form, not
    its name) scored 0.012 below its parent: its 6 corrections gained 0.60 on average, while 7 of the 13
    approved replies were the parent's own answers (rated good as served, so the parent repeats them at
    temperature 0) that the curriculum's persona replaced (-0.54 on average). 0.05 lets that through (a quick
    age-up is a check) and still fails a child that drifted from its approved replies without taking the
    rest (that shape scores about 0.29 below its parent)."""
    min_preference_items: int = 4
    """``preference_margin`` needs this many held-out rated replies, good and bad among them (the held-out
    20 % of at least 20 new ratings)."""
    preference_margin_drop: float | None = 0.3
    """The child's margin (nats per token, good minus bad replies it never trained on) may fall at most this
    far below its parent's: a child that learned the replies rated bad loses margin. Measured (docs/learning.md):
    such a child (tests/test_slow_experience.py) fell 0.79-0.83 below its parent (0.767 to -0.027..-0.058
    in four runs, standard error 0.06); two quick children with ratings moved by +0.08 and +0.81, and on the
    learn benchmark's 7 held-out replies the margin's change has a standard error of 0.23 (which replies
    are held out is chance). 0.3 is over one such standard error, and under half the bad child's drop."""
    min_persona_items: int = 5
    """``persona_leak`` needs this many questions about the user (probes about the user and the curriculum's
    unanswered ones) to count; with fewer it says "not enough data"."""
    persona_leak_max: float | None = 0.02
    """At most this share of the replies to questions about the user may carry a persona fact (issue 27)."""
    persona_leak_margin: float | None = 0.0
    """...and at most this much more than the parent's share."""
    unknown_margin: float | None = 0.0
    """Of the questions about the user nobody answered, the share the child answers "I don't know" (or with a
    question back) may fall at most this far below the parent's: not knowing is better than inventing."""
    answer_max_tokens: int = 64
    """Token budget of each eval answer (temperature 0)."""
    smoke_max_tokens: int = 128
    """The smoke prompt must be answered, ending with end-of-sequence, within this many tokens (the one smoke
    budget: export's load check asks within it too; ``[export] smoke_max_tokens`` is read, warned about and ignored)."""
    stop_after: int = 2
    """Pause age-ups after this many children in a row failed to improve recall over their parents."""
    # Fixed anchors (issue 17, "no ratchet"): the margins above compare a child with its parent only, so a lineage
    # could drift a permitted step at a time without limit. These bound it against generation 0 and against the
    # best generation of its lineage so far, whatever the number of steps (a cumulative budget). An anchor counts
    # only when measured on the same items as the child (the metric's fingerprint); generation 0 is re-measured
    # when its items changed. Defaults and their measurement: docs/learning.md, "No ratchet".
    anchor_perplexity_ratio: float | None = 1.10
    """Held-out text perplexity at most this multiple of generation 0's (the untrained base's general language)."""
    best_perplexity_ratio: float | None = 1.25
    """Held-out text perplexity at most this multiple of the lowest of the lineage so far."""
    best_recall_budget: float | None = 0.05
    """Recall may not fall more than this below the highest of the lineage so far (all steps together)."""
    best_generalization_budget: float | None = 0.10
    """Held-out question accuracy may not fall more than this below the highest of the lineage so far."""


@dataclass(slots=True)
class AgeUpConfig:
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    gate: GateConfig = field(default_factory=GateConfig)
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
                     home: Path | None):
    """Set ``obj``'s fields from ``[section]`` of the TOML file, then from flags."""
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
    return obj


def resolve_daemon(config_file: str | Path | None = None, overrides: dict | None = None,
                   home: Path | None = None) -> DaemonConfig:
    """Defaults, then ``[daemon]`` of the TOML file, then flags; validated."""
    d = _resolve_section(DaemonConfig(), "daemon", config_file, overrides, home)
    validate_daemon(d)
    return d


def resolve_retention(config_file: str | Path | None = None, overrides: dict | None = None,
                      home: Path | None = None) -> RetentionConfig:
    """Defaults, then ``[retention]`` of the TOML file, then flags; validated."""
    r = _resolve_section(RetentionConfig(), "retention", config_file, overrides, home)
    validate_retention(r)
    return r


QUICK: dict = {
    # A whole age-up of the embedded 135M model in a few minutes on a 2-core CPU:
    # a short CPT pass, then enough SFT steps to learn the identity facts.
    "quick": True,
    # Preference steps are capped too: each runs the parent beside the child (a reference forward).
    "train": {"cpt": {"max_steps": 6}, "sft": {"max_steps": 60, "epochs": 1.0}, "preference": {"max_steps": 20},
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
                            "(known: curriculum, train, export, gate, daemon, retention)")
            continue
        _set_fields(section, key, value, where, problems)
    if problems:
        raise ConfigError(problems)


def validate(cfg: AgeUpConfig) -> None:
    """Check every field; raise one ConfigError naming all the bad ones."""
    p: list[str] = []
    t, e, c = cfg.train, cfg.export, cfg.curriculum

    def positive_int(name, value, allow_none=False):
        p.extend(_positive_int(name, value, allow_none))

    if t.backend not in ("auto", "unsloth", "hf"):
        p.append(f"train.backend must be 'auto', 'unsloth' or 'hf', got {t.backend!r}")
    if t.backend == "unsloth" and isinstance(t.processes, int) and t.processes > 1:
        p.append(f"train.backend 'unsloth' trains in one process; with train.processes = {t.processes} use "
                 "backend 'auto' or 'hf' (transformers + PEFT under DDP), or set processes = 1")
    sections = t.stage_sections()
    if (not isinstance(t.stages, list) or not t.stages or not all(isinstance(s, str) for s in t.stages)
            or len(set(t.stages)) != len(t.stages)):
        p.append(f"train.stages must be a non-empty list of distinct stage names, got {t.stages!r}")
    else:
        p += [f"train.stages: unknown stage {s!r} (known: {', '.join(sections)})" for s in t.stages
              if s not in sections]
    for name, section in sections.items():
        p += section.problems(f"train.{name}")
    for name in ("lora_r", "lora_alpha", "batch_size", "grad_accum", "save_steps", "save_total_limit", "processes"):
        positive_int(f"train.{name}", getattr(t, name))
    positive_int("train.threads", t.threads, allow_none=True)
    if not isinstance(t.seed, int) or t.seed < 0:
        p.append(f"train.seed must be a non-negative integer, got {t.seed!r}")
    if not 0 <= t.lora_dropout < 1:
        p.append(f"train.lora_dropout must be in [0, 1), got {t.lora_dropout!r}")
    if not isinstance(t.warmup_steps, int) or t.warmup_steps < 0:
        p.append(f"train.warmup_steps must be a non-negative integer, got {t.warmup_steps!r}")
    if not t.target_modules or not all(isinstance(m, str) for m in t.target_modules):
        p.append("train.target_modules must be a non-empty list of module names")
    if t.gradient_checkpointing not in (None, True, False):
        p.append(f"train.gradient_checkpointing must be true, false or unset, got {t.gradient_checkpointing!r}")
    if t.precision not in ("auto", "fp32", "bf16"):
        p.append(f"train.precision must be 'auto', 'fp32' or 'bf16', got {t.precision!r}")
    if e.quantization not in QUANTIZATIONS:
        p.append(f"export.quantization must be one of {', '.join(QUANTIZATIONS)}, got {e.quantization!r}")
    if e.merged_dtype not in ("float32", "float16", "bfloat16"):
        p.append(f"export.merged_dtype must be float32, float16 or bfloat16, got {e.merged_dtype!r}")
    if not isinstance(c.experience_heldout, (int, float)) or not 0 <= c.experience_heldout <= 0.5:
        p.append(f"curriculum.experience_heldout must be between 0 and 0.5, got {c.experience_heldout!r}")
    if not isinstance(c.experience_variants, int) or isinstance(c.experience_variants, bool) \
            or not 0 <= c.experience_variants <= 100:
        p.append(f"curriculum.experience_variants must be an integer from 0 to 100, got {c.experience_variants!r}")
    if not isinstance(c.experience_variant_share, (int, float)) or not 0 <= c.experience_variant_share <= 10:
        p.append(f"curriculum.experience_variant_share must be between 0 and 10, got {c.experience_variant_share!r}")
    if not isinstance(c.known_share, (int, float)) or isinstance(c.known_share, bool) or not 0 <= c.known_share <= 1:
        p.append(f"curriculum.known_share must be between 0 and 1, got {c.known_share!r}")
    if not isinstance(c.fact_forms, bool):
        p.append(f"curriculum.fact_forms must be true or false, got {c.fact_forms!r}")
    if not isinstance(c.who_is_who, int) or isinstance(c.who_is_who, bool) or not 0 <= c.who_is_who <= 10_000:
        p.append(f"curriculum.who_is_who must be a whole number from 0 to 10000, got {c.who_is_who!r}")
    if not isinstance(c.rehearse_max, int) or isinstance(c.rehearse_max, bool) or c.rehearse_max < 0:
        p.append(f"curriculum.rehearse_max must be a whole number >= 0, got {c.rehearse_max!r}")
    if not isinstance(c.replay_ratio, (int, float)) or not 0 <= c.replay_ratio <= 10:
        p.append(f"curriculum.replay_ratio must be between 0 and 10, got {c.replay_ratio!r}")
    if c.phases is not None and (not isinstance(c.phases, list) or not all(isinstance(x, int) and x >= 0 for x in c.phases)):
        p.append(f"curriculum.phases must be a list of phase numbers, got {c.phases!r}")
    g = cfg.gate
    for name in ("min_recall", "recall_margin", "identity_recall_margin", "generalization_margin", "probe_margin", "probe_forgotten_max",
                 "experience_margin", "persona_leak_max", "persona_leak_margin", "unknown_margin"):
        v = getattr(g, name)
        if v is not None and (not isinstance(v, (int, float)) or not 0 <= v <= 1):
            p.append(f"gate.{name} must be between 0 and 1 (or unset), got {v!r}")
    if not isinstance(g.experience_margin_se, (int, float)) or isinstance(g.experience_margin_se, bool) \
            or g.experience_margin_se < 0:
        p.append(f"gate.experience_margin_se must be a number >= 0, got {g.experience_margin_se!r}")
    if g.preference_margin_drop is not None and (not isinstance(g.preference_margin_drop, (int, float))
                                                 or g.preference_margin_drop < 0):
        p.append(f"gate.preference_margin_drop must be a number >= 0 (or unset), got {g.preference_margin_drop!r}")
    for name in ("max_style_drift", "max_perplexity_ratio"):
        v = getattr(g, name)
        if v is not None and (not isinstance(v, (int, float)) or v <= 0):
            p.append(f"gate.{name} must be a positive number (or unset), got {v!r}")
    for name in ("anchor_perplexity_ratio", "best_perplexity_ratio"):  # the fixed anchors (no ratchet)
        v = getattr(g, name)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 1):
            p.append(f"gate.{name} must be a number >= 1 (or unset), got {v!r}: below 1 a child would have to beat "
                     "the anchor")
    for name in ("best_recall_budget", "best_generalization_budget"):
        v = getattr(g, name)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1):
            p.append(f"gate.{name} must be between 0 and 1 (or unset), got {v!r}")
    for name in ("answer_max_tokens", "smoke_max_tokens", "stop_after", "min_probe_items", "min_experience_items",
                 "min_preference_items", "min_persona_items"):
        positive_int(f"gate.{name}", getattr(g, name))
    if not Path(c.path).is_dir():
        p.append(f"curriculum.path {c.path!r} is not a directory (pass --curriculum PATH)")
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
    if where is not None:
        apply_overrides(cfg, data, where)
    if overrides:
        apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg
