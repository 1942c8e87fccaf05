"""The hash chain: canonical encoding of an entry and its SHA-256.

``entry_hash = sha256(canonical_json({"prev", "seq", "time", "kind", "gen", "payload"}))`` where
``prev`` is the previous entry's hash (``GENESIS`` for seq 1). Canonical JSON is UTF-8, keys
sorted, no whitespace, no NaN/Infinity, so any process on any platform computes the same bytes.
Binding ``seq`` into the hash makes a moved entry detectable even when its neighbours are intact.
"""

from __future__ import annotations

import hashlib
import json

from evolution.errors import LedgerError

GENESIS = "0" * 64


def canonical_json(obj) -> str:
    """The one JSON spelling hashed and stored for a payload."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LedgerError(
            f"ledger payloads must be plain JSON (dict, list, str, finite numbers, bool, None): {exc}"
        ) from exc


def entry_hash(prev_hash: str, seq: int, time: str, kind: str, gen: int | None, payload: dict) -> str:
    body = {"prev": prev_hash, "seq": seq, "time": time, "kind": kind, "gen": gen, "payload": payload}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()
