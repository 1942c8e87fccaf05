"""The hash chain: canonical encoding of an entry and its SHA-256.

``entry_hash = sha256(canonical_json({"prev", "seq", "time", "kind", "gen", "payload"}))`` where
``prev`` is the previous entry's hash (``GENESIS`` for seq 1). Canonical JSON is UTF-8, keys
sorted, no whitespace, no NaN/Infinity, so any process on any platform computes the same bytes.
Binding ``seq`` into the hash makes a moved entry detectable even when its neighbours are intact.

Lineages: one chain runs through every lineage's entries in seq order (one global order, one
head, one ``verify``). An entry of a lineage other than ``main`` also hashes ``"lineage": NAME``;
a ``main`` entry hashes exactly the fields above, so entries written before lineages existed
verify unchanged, and moving an entry to another lineage (either way) breaks its hash.
"""

from __future__ import annotations

import hashlib
import json

from evolution.errors import LedgerError
from evolution.paths import MAIN

GENESIS = "0" * 64


def canonical_json(obj) -> str:
    """The one JSON spelling hashed and stored for a payload."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LedgerError(
            f"ledger payloads must be plain JSON (dict, list, str, finite numbers, bool, None): {exc}"
        ) from exc


def entry_hash(prev_hash: str, seq: int, time: str, kind: str, gen: int | None, payload: dict,
               lineage: str = MAIN) -> str:
    body = {"prev": prev_hash, "seq": seq, "time": time, "kind": kind, "gen": gen, "payload": payload}
    if lineage != MAIN:
        body["lineage"] = lineage
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()
