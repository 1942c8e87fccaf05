"""How a generation's weights moved, per layer: the adapter's update, the change against parent and generation 0."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from evolution import weights


def _model(folder, scale: dict[int, float], seed: int = 0):
    """A two-layer 'model': per layer two tensors; layer i's weights times ``scale[i]``."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(10, 4, generator=g)}
    for i in (0, 1):
        for name in ("self_attn.q_proj", "mlp.up_proj"):
            tensors[f"model.layers.{i}.{name}.weight"] = torch.randn(4, 4, generator=g) * scale.get(i, 1.0)
    tensors["model.norm.weight"] = torch.ones(4)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return tensors


def _adapter(folder, b_scale: dict[int, float], r=2, alpha=4):
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in (0, 1):
        p = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{p}.lora_A.weight"] = torch.randn(r, 4, generator=g)
        tensors[f"{p}.lora_B.weight"] = torch.randn(4, r, generator=g) * b_scale[i]
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": alpha}))
    return tensors


def test_the_adapter_update_per_layer_is_the_norm_of_scaling_b_a(tmp_path):
    t = _adapter(tmp_path / "adapter", {0: 1.0, 1: 0.5})
    norms = weights.adapter_norms(tmp_path / "adapter")
    for i in (0, 1):
        p = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        want = torch.linalg.matrix_norm(2.0 * t[f"{p}.lora_B.weight"] @ t[f"{p}.lora_A.weight"]).item()
        assert norms[str(i)] == pytest.approx(want, rel=1e-5)
    assert weights.dominant(norms) is None  # two layers: even shares are a half each


def test_the_relative_change_is_per_layer_and_for_the_whole_model(tmp_path):
    old = _model(tmp_path / "old", {})
    new = {k: v.clone() for k, v in old.items()}
    new["model.layers.1.mlp.up_proj.weight"] += 0.1
    (tmp_path / "new").mkdir()
    save_file(new, str(tmp_path / "new" / "model.safetensors"))
    change = weights.relative_change(tmp_path / "new", tmp_path / "old")
    assert change["0"] == 0.0 and change["embeddings"] == 0.0 and change["norm"] == 0.0
    layer1 = sum(float((old[f"model.layers.1.{n}.weight"] ** 2).sum()) for n in ("self_attn.q_proj", "mlp.up_proj"))
    assert change["1"] == pytest.approx(math.sqrt(16 * 0.01) / math.sqrt(layer1), rel=1e-6)
    everything = sum(float((v.double() ** 2).sum()) for v in old.values())
    assert change[weights.ALL] == pytest.approx(math.sqrt(16 * 0.01 / everything), rel=1e-6)


def test_a_generation_where_one_layer_dominates_is_flagged(tmp_path):
    parent = _model(tmp_path / "parent", {})
    _model(tmp_path / "gen0", {}, seed=5)
    _model(tmp_path / "child", {0: 1.5})
    _adapter(tmp_path / "adapter", {0: 1.0, 1: 0.01})
    rec = weights.measure(tmp_path / "adapter", tmp_path / "child", tmp_path / "parent", tmp_path / "gen0")
    assert [r["layer"] for r in rec["layers"]] == ["0", "1", "embeddings", "norm"]
    assert rec["dominant"]["layer"] == "0" and rec["dominant"]["share"] > 0.99
    assert rec["layers"][0]["vs_parent"] == pytest.approx(0.5, rel=1e-3) and rec["layers"][1]["vs_parent"] == 0.0
    assert rec["layers"][1]["vs_gen0"] > 0 and rec["total"]["vs_gen0"] > rec["total"]["vs_parent"] > 0
    lines = weights.table(rec)
    assert lines[0].split() == ["layer", "adapter", "update", "vs", "parent", "vs", "gen", "0"]
    assert lines[-1] == f"flagged: layer 0 holds {rec['dominant']['share']:.0%} of the update"
    assert len(parent) == 6
    # generation 0's merged weights pruned: no change against it, said so
    rec = weights.measure(tmp_path / "adapter", tmp_path / "child", tmp_path / "parent", None)
    assert all(r["vs_gen0"] is None for r in rec["layers"]) and "pruned" in rec["vs_gen0_note"]
