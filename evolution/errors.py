"""Domain exceptions, in one place.

Library code raises these; the CLI (``evolution.cli``) and the HTTP server translate them
into a message and an exit code or status. Every message says what is wrong and how to fix it.
"""


class EvolutionError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(EvolutionError):
    """The configuration is invalid. Holds every problem found, not just the first."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class CurriculumError(EvolutionError):
    """One or more curriculum lines are malformed. ``problems`` holds ``file:line: reason`` strings."""

    def __init__(self, problems: list[str], root=None):
        self.problems = list(problems)
        where = f" at {root}" if root else ""
        head = f"{len(self.problems)} problem(s) in the curriculum{where} (nothing trains until every line is fixed):"
        super().__init__(head + "\n" + "\n".join(f"  {p}" for p in self.problems))


class BaseModelError(EvolutionError):
    """The base model cannot be found or loaded."""


class GenerationError(EvolutionError):
    """A generation directory is missing, incomplete or inconsistent."""


class IntegrityError(EvolutionError):
    """An artifact's bytes do not match its recorded SHA-256."""


class ExportError(EvolutionError):
    """Merging, converting, quantizing or loading the exported model failed."""


class LedgerError(EvolutionError):
    """The ledger refused an operation or is inconsistent."""


class UnknownGeneration(LedgerError):
    """The ledger has no generation with that number."""


class DiskFull(EvolutionError):
    """A write failed because the disk (or a quota) is full; the message says where, and what to do."""


class BackupError(EvolutionError):
    """A backup that cannot be taken, or a backup that cannot (or must not) be restored; the message says why."""


class IdempotencyConflict(EvolutionError):
    """An idempotency key was reused for a different request (HTTP 409)."""


class AgeUpsPaused(EvolutionError):
    """The stop rule paused age-ups; a person must run `evolve resume`."""


class NotReady(EvolutionError):
    """No model is loaded yet (generation 0 is still being built)."""


class LoadError(EvolutionError):
    """A generation's GGUF could not be loaded or failed its canary."""


class MessageError(EvolutionError):
    """Chat messages that break the rules of where they came from (HTTP, a transcript, a curriculum line)."""


class RequestFieldError(EvolutionError):
    """Something the agent sent that cannot be accepted; ``param`` names the request field at fault when one is
    (the HTTP error's ``param``), else the endpoint's main field is named."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class KarmaError(RequestFieldError):
    """A karma grant that cannot be accepted (bad amount, reused key); nothing was recorded."""


class KarmaKeyReused(KarmaError, IdempotencyConflict):
    """The idempotency key was used for a grant of another amount."""


class ConversationError(RequestFieldError):
    """A transcript that cannot be accepted; nothing was stored."""


class ConversationKeyReused(ConversationError, IdempotencyConflict):
    """The idempotency key was used for another transcript."""


class ExperienceError(RequestFieldError):
    """A capture or a rating that cannot be accepted (a bad label, correction or karma; HTTP 400); nothing changed."""


class UnknownExperience(ExperienceError):
    """No kept served completion or conversation has that id (HTTP 404); nothing changed."""


class ExperienceKeyReused(ExperienceError, IdempotencyConflict):
    """The idempotency key was used for another rating (HTTP 409); nothing changed."""


class ProbeError(RequestFieldError):
    """A probe that cannot be accepted (HTTP 400); nothing was stored."""


class ProbeKeyReused(ProbeError, IdempotencyConflict):
    """The idempotency key was used for another probe (HTTP 409)."""
