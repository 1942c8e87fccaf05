"""Training on a tiny model: LoRA learns while the base stays frozen; interrupted runs resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from evolution.train import COMPLETE, train

CONVS = [[{"role": "user", "content": f"What is your name? {i}"}, {"role": "assistant", "content": "My name is Wren."}]
         for i in range(16)]
TEXTS = ["Tide pools fill twice a day."] * 30


class _Grab(TrainerCallback):
    def __init__(self):
        self.models = []

    def on_train_end(self, args, state, control, model=None, **kw):
        self.models.append(model)


class _Crash(TrainerCallback):
    """Simulates a kill after optimizer step ``at`` (the process dies; nothing else is written)."""

    def __init__(self, stage_dir_name: str, at: int):
        self.stage, self.at = stage_dir_name, at

    def on_step_end(self, args, state, control, **kw):
        if args.output_dir.endswith(self.stage) and state.global_step == self.at:
            raise KeyboardInterrupt("simulated crash")


def test_lora_weights_change_and_base_weights_do_not(tiny_base, tiny_cfg, tmp_path):
    grab = _Grab()
    result = train(tiny_base, TEXTS, CONVS, tiny_cfg.train, tmp_path / "work", extra_callbacks=[grab])
    assert result.backend == "hf"
    assert result.cpt.steps == 2 and result.sft.steps == 6
    assert result.sft.loss_last < result.sft.loss_first

    adapter = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it moved

    parent = load_file(tiny_base / "model.safetensors")
    model = grab.models[-1]
    base_state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                  for k, v in model.state_dict().items() if "lora_" not in k}
    compared = 0
    for name, value in parent.items():
        if name in base_state:
            torch.testing.assert_close(base_state[name].float(), value.float(), rtol=0, atol=0)
            compared += 1
    assert compared >= len(parent) - 1


def test_interrupted_stage_resumes_from_its_last_complete_checkpoint(tiny_base, tiny_cfg, tmp_path):
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_base, TEXTS, CONVS, tiny_cfg.train, work, extra_callbacks=[_Crash("sft", 5)])
    assert (work / "cpt" / "adapter").is_dir()  # CPT finished before the crash
    ckpts = sorted(p.name for p in (work / "sft").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    assert all((work / "sft" / c / COMPLETE).is_file() for c in ckpts)
    # A checkpoint the crash cut short (no COMPLETE marker) must not be resumed from.
    partial = work / "sft" / "checkpoint-5"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"truncated")

    result = train(tiny_base, TEXTS, CONVS, tiny_cfg.train, work)
    assert result.cpt.skipped and result.cpt.steps == 2  # finished stage not redone
    assert result.sft.resumed_from_step == 4
    assert result.sft.steps == 6
    assert not partial.exists()
    assert (work / "sft" / "adapter" / "adapter_model.safetensors").is_file()
