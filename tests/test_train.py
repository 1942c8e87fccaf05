"""Training on a tiny model: LoRA learns while the base stays frozen; interrupted runs resume."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from evolution.errors import EvolutionError
from evolution.train import COMPLETE, train

CONVS = [[{"role": "user", "content": f"What is your name? {i}"}, {"role": "assistant", "content": "My name is Wren."}]
         for i in range(16)]
TEXTS = ["Tide pools fill twice a day."] * 30
DATA = {"cpt": [{"text": t} for t in TEXTS], "sft": [{"messages": c} for c in CONVS]}


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
    result = train(tiny_base, DATA, tiny_cfg.train, tmp_path / "work", extra_callbacks=[grab])
    assert result.backend == "hf"
    assert result.stages["cpt"].steps == 2 and result.stages["sft"].steps == 6
    assert result.stages["sft"].loss_last < result.stages["sft"].loss_first

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
            # the frozen base is held in the training precision (bf16 on AMX CPUs): equal once rounded
            trained = base_state[name]
            torch.testing.assert_close(trained, value.to(trained.dtype), rtol=0, atol=0)
            compared += 1
    assert compared >= len(parent) - 1


def test_interrupted_stage_resumes_from_its_last_complete_checkpoint(tiny_base, tiny_cfg, tmp_path):
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_base, DATA, tiny_cfg.train, work, extra_callbacks=[_Crash("sft", 5)])
    assert (work / "cpt" / "adapter").is_dir()  # CPT finished before the crash
    ckpts = sorted(p.name for p in (work / "sft").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    assert all((work / "sft" / c / COMPLETE).is_file() for c in ckpts)
    # A checkpoint the crash cut short (no COMPLETE marker) must not be resumed from.
    partial = work / "sft" / "checkpoint-5"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"truncated")

    result = train(tiny_base, DATA, tiny_cfg.train, work)
    assert result.stages["cpt"].skipped and result.stages["cpt"].steps == 2  # finished stage not redone
    assert result.stages["sft"].resumed_from_step == 4
    assert result.stages["sft"].steps == 6
    assert not partial.exists()
    assert (work / "sft" / "adapter" / "adapter_model.safetensors").is_file()


def _rows(lengths: list[int], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(5, 200, (n,), generator=g).tolist()
        mask = [0] * (n // 2) + [1] * (n - n // 2)  # a prompt, then the reply that trains
        rows.append({"input_ids": ids, "assistant_masks": mask})
    return rows


def test_lane_collator_places_every_row_once_in_fewer_slots_than_padding():
    from evolution.train import LaneCollator

    rows = _rows([120, 31, 77, 64, 90, 45, 33, 101])
    batch = LaneCollator(pad_id=0)(rows)
    lanes, width = batch["input_ids"].shape
    assert width % 32 == 0 and width >= 120
    assert lanes * width < len(rows) * 120  # padding every row to the longest costs more
    assert batch["real_tokens"] == sum(len(r["input_ids"]) for r in rows)
    # Cut each lane at its position-id restarts: the pieces are exactly the rows (plus padding).
    found = []
    for ids, pos, lab in zip(batch["input_ids"], batch["position_ids"], batch["labels"]):
        starts = [i for i in range(width) if pos[i] == 0] + [width]
        for a, b in itertools.pairwise(starts):
            found.append((ids[a:b].tolist(), lab[a:b].tolist()))
    for r in rows:
        ids = r["input_ids"]
        want = [-100] + [t if m else -100 for t, m in zip(ids[1:], r["assistant_masks"][1:])]
        assert (ids, want) in found
    pieces = [ids for ids, _ in found]
    assert sum(map(len, pieces)) == lanes * width and len(pieces) >= len(rows)


@pytest.mark.parametrize("stage", ["cpt", "sft"])
def test_lane_loss_equals_the_loss_of_each_row_on_its_own(tiny_base, tiny_cfg, stage):
    """No attention leaks between rows sharing a lane, and labels line up with their tokens."""
    from contextlib import nullcontext

    from evolution.train import BY_NAME, LaneCollator, lane_loss, load_model

    tiny_cfg.train.precision = "fp32"
    model, _ = load_model(tiny_base, tiny_cfg.train, "hf", BY_NAME[stage].cpu_attention, 128)
    model.eval()
    rows = _rows([40, 9, 23, 17, 33])
    with torch.no_grad():
        lane = lane_loss(model, LaneCollator(pad_id=0, min_width=32, multiple=8)(rows), nullcontext)
        total, count = 0.0, 0
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            labels = torch.tensor([[t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"])]])
            n = int((labels[0, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    assert lane.item() == pytest.approx(total / count, rel=1e-4)


def test_the_stage_list_decides_what_trains_and_in_which_order(tiny_base, tiny_cfg, tmp_path):
    t = tiny_cfg.train
    t.stages = ["sft"]  # a config that runs SFT only: CPT's records are there, and not trained on
    only = train(tiny_base, DATA, t, tmp_path / "only")
    assert list(only.stages) == ["sft"] and only.stages["sft"].steps == 6
    assert not (tmp_path / "only" / "cpt").exists()
    assert only.adapter_dir == tmp_path / "only" / "sft" / "adapter"
    assert list(only.to_dict()) == ["backend", "adapter_dir", "sft"]

    t.stages = ["sft", "cpt"]  # reversed: CPT continues the adapter SFT left
    seen = []
    result = train(tiny_base, DATA, t, tmp_path / "reversed", progress=lambda stage, *_: seen.append(stage))
    assert list(result.stages) == ["sft", "cpt"]
    assert list(dict.fromkeys(seen)) == ["sft", "cpt"]
    assert result.adapter_dir == tmp_path / "reversed" / "cpt" / "adapter"
    assert (result.stages["sft"].steps, result.stages["cpt"].steps) == (6, 2)
    assert result.steps == 8


def test_a_stage_without_records_is_skipped_and_the_adapter_is_the_last_trained(tiny_base, tiny_cfg, tmp_path):
    result = train(tiny_base, {"cpt": DATA["cpt"]}, tiny_cfg.train, tmp_path / "work")
    assert result.stages["sft"].skipped and result.stages["sft"].steps == 0
    assert result.adapter_dir == tmp_path / "work" / "cpt" / "adapter"
    with pytest.raises(EvolutionError, match="nothing to train on"):
        train(tiny_base, {}, tiny_cfg.train, tmp_path / "empty")
