"""How a generation's weights moved: per layer, the LoRA update it trained and the merged change it made.

After the merge, an age-up measures (``measure``), per transformer layer (``model.layers.N``; the embeddings,
the final norm and the output head as their own rows):

- ``adapter_norm``: the Frobenius norm of the update the adapter adds, ``scaling · B @ A`` summed over the
  layer's adapted modules (root of the sum of squares);
- ``vs_parent``: the merged weights' relative change against the parent, ``‖W − W_parent‖ / ‖W_parent‖``
  over the layer's tensors;
- ``vs_gen0``: the same against generation 0 (the lineage's drift since it began; None where generation 0's
  merged weights were pruned).

It is kept in the generation's ``weights.json`` and in its ``exported`` ledger entry (``evolve ledger show N
--weights`` prints it; the dashboard draws ``vs_gen0`` across generations). A generation where one layer holds
more than ``DOMINANT_SHARE`` of the update (its share of the squared adapter norms; at least four times an even
share, or 0.9 in a model of four layers or fewer) is flagged: ``dominant`` names the layer, ``evolve ledger show`` and the age-up's log say so. Tensors are
read one at a time (``safetensors.safe_open``): memory stays about one tensor of each model.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

log = logging.getLogger(__name__)

FILE = "weights.json"
DOMINANT_SHARE = 0.25
"""A layer with more than this share of the update's squared norm (and four times an even share) dominates: in a
model of 30 layers (the embedded one) an even share is 0.033."""

ALL = "all"
"""The key of the whole model's change in ``relative_change``."""

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> str:
    """The row a tensor counts in: the layer number, or ``embeddings``, ``lm_head``, ``norm``, ``other``."""
    if m := _LAYER.search(name):
        return m.group(1)
    if "embed" in name:
        return "embeddings"
    if "lm_head" in name:
        return "lm_head"
    return "norm" if "norm" in name else "other"


def _order(rows: Iterable[str]) -> list[str]:
    return sorted(rows, key=lambda r: (0, int(r)) if r.isdigit() else (1 if r == "embeddings" else 2, r))


def adapter_norms(adapter_dir: Path) -> dict[str, float]:
    """Per row, the norm of the update the LoRA adapter in ``adapter_dir`` adds (``scaling · B @ A``)."""
    import torch
    from safetensors import safe_open

    conf = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    r, alpha = conf["r"], conf.get("lora_alpha", conf["r"])
    scaling = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
    squares: dict[str, float] = {}
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        for a_name in sorted(n for n in names if ".lora_A." in n):
            b_name = a_name.replace(".lora_A.", ".lora_B.")
            if b_name not in names:
                continue
            delta = scaling * (f.get_tensor(b_name).float() @ f.get_tensor(a_name).float())
            row = layer_of(a_name)
            squares[row] = squares.get(row, 0.0) + float(torch.linalg.matrix_norm(delta) ** 2)
    return {row: math.sqrt(v) for row, v in squares.items()}


def relative_change(new_hf: Path, old_hf: Path) -> dict[str, float]:
    """Per row, ``‖new − old‖ / ‖old‖`` over the tensors both hold (one tensor at a time); ``ALL``: over all."""
    return relative_changes(new_hf, {"old": old_hf})["old"]


def relative_changes(new_hf: Path, olds: dict[str, Path]) -> dict[str, dict[str, float]]:
    """``relative_change`` of ``new_hf`` against each of ``olds`` (key -> folder), in one pass over the new
    weights; a folder named twice (a child of generation 0: its parent is generation 0) is compared once."""
    from safetensors import safe_open

    with ExitStack() as stack:
        def tensors(folder: Path) -> dict:  # tensor name -> the open file holding it
            found = {}
            for path in sorted(Path(folder).glob("*.safetensors")):
                f = stack.enter_context(safe_open(str(path), framework="pt"))
                found.update(dict.fromkeys(f.keys(), f))
            return found

        new = tensors(new_hf)
        distinct = {Path(p).resolve(): tensors(p) for p in olds.values()}
        diff = {p: {} for p in distinct}
        base = {p: {} for p in distinct}
        for name, f in new.items():
            tensor, row = f.get_tensor(name).double(), layer_of(name)
            for p, old_tensors in distinct.items():
                if name not in old_tensors:
                    continue
                old = old_tensors[name].get_tensor(name).double()
                if old.shape != tensor.shape:
                    continue
                diff[p][row] = diff[p].get(row, 0.0) + float(((tensor - old) ** 2).sum())
                base[p][row] = base[p].get(row, 0.0) + float((old ** 2).sum())
    return {key: _ratios(diff[Path(p).resolve()], base[Path(p).resolve()]) for key, p in olds.items()}


def _ratios(diff: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    out = {row: math.sqrt(diff[row]) / math.sqrt(base[row]) if base[row] else 0.0 for row in diff}
    total = sum(base.values())
    out[ALL] = math.sqrt(sum(diff.values()) / total) if total else 0.0
    return out


def dominant(norms: dict[str, float]) -> dict | None:
    """The row holding more than ``DOMINANT_SHARE`` and four times an even share of the update (0.9 where four
    times is more), else None."""
    total = sum(v * v for v in norms.values())
    if not total:
        return None
    row, top = max(norms.items(), key=lambda kv: kv[1])
    share = top * top / total
    if share > max(DOMINANT_SHARE, min(0.9, 4 / len(norms))):
        return {"layer": row, "share": round(share, 3)}
    return None


def measure(adapter_dir: Path | None, merged_hf: Path, parent_hf: Path, gen0_hf: Path | None) -> dict:
    """The rows (layers in order), each with ``adapter_norm``, ``vs_parent`` and ``vs_gen0``; ``total`` (the whole
    model's ``vs_parent`` and ``vs_gen0``) and ``dominant``."""
    norms = adapter_norms(adapter_dir) if adapter_dir is not None and (adapter_dir / "adapter_config.json").is_file() \
        else {}
    have_gen0 = gen0_hf is not None and any(gen0_hf.glob("*.safetensors"))
    changes = relative_changes(merged_hf, {"parent": parent_hf} | ({"gen0": gen0_hf} if have_gen0 else {}))
    parent, gen0 = changes["parent"], changes.get("gen0")
    total = {"vs_parent": _round(parent.pop(ALL)), "vs_gen0": _round(gen0.pop(ALL)) if gen0 is not None else None}
    rows = _order(set(norms) | set(parent) | set(gen0 or {}))
    flagged = dominant(norms or parent)
    if flagged:
        log.warning("layer %s holds %.0f%% of this generation's weight update (an even share is %.0f%%)",
                    flagged["layer"], 100 * flagged["share"], 100 / max(len(norms or parent), 1))
    return {"layers": [{"layer": r, "adapter_norm": _round(norms.get(r)), "vs_parent": _round(parent.get(r)),
                        "vs_gen0": _round((gen0 or {}).get(r)) if gen0 is not None else None} for r in rows],
            "total": total, "dominant": flagged, "vs_gen0_note": None if gen0 is not None else
            "generation 0's merged weights are not on disk (pruned): no change against it"}


def _round(v: float | None) -> float | None:
    return None if v is None else float(f"{v:.4g}")


def table(rec: dict) -> list[str]:
    """``evolve ledger show N --weights``: one line per row, and the flag."""
    lines = [f"{'layer':>10}  {'adapter update':>14}  {'vs parent':>10}  {'vs gen 0':>10}"]
    for r in rec.get("layers", []):
        cells = [f"{r['adapter_norm']:.4g}" if r["adapter_norm"] is not None else "-",
                 f"{r['vs_parent']:.3e}" if r["vs_parent"] is not None else "-",
                 f"{r['vs_gen0']:.3e}" if r["vs_gen0"] is not None else "-"]
        lines.append(f"{r['layer']:>10}  {cells[0]:>14}  {cells[1]:>10}  {cells[2]:>10}")
    t = rec.get("total") or {}
    if t.get("vs_parent") is not None:
        lines.append(f"{'all':>10}  {'':>14}  {t['vs_parent']:>10.3e}  "
                     + (f"{t['vs_gen0']:>10.3e}" if t.get("vs_gen0") is not None else f"{'-':>10}"))
    if rec.get("dominant"):
        d = rec["dominant"]
        lines.append(f"flagged: layer {d['layer']} holds {d['share']:.0%} of the update")
    if rec.get("vs_gen0_note"):
        lines.append(f"note: {rec['vs_gen0_note']}")
    return lines
