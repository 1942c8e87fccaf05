"""The age-up config: nested ``[train.<stage>]`` sections, the flat keys of older configs, validation."""

from __future__ import annotations

import logging

import pytest

from evolution import config
from evolution.config import QUICK, AgeUpConfig
from evolution.train.cpt import CptConfig
from evolution.train.sft import SftConfig
from evolution.errors import ConfigError

NESTED = """
[train]
stages = ["sft"]
lora_r = 8

[train.cpt]
block_size = 128
max_steps = 3

[train.sft]
epochs = 2.5
lr = 0.0005
max_steps = "off"
"""

FLAT = """
[train]
cpt_block_size = 128
cpt_max_steps = 3
sft_epochs = 2.5
sft_lr = 0.0005
sft_max_len = 200
lora_r = 8
"""


def _resolve(tmp_path, text: str, **kw) -> AgeUpConfig:
    f = tmp_path / "evolution.toml"
    f.write_text(text, encoding="utf-8")
    return config.resolve(config_file=f, **kw)


def test_nested_stage_sections_set_their_stage(tmp_path, tiny_curriculum):
    cfg = _resolve(tmp_path, NESTED, overrides={"curriculum": {"path": str(tiny_curriculum)}})
    t = cfg.train
    assert t.stages == ["sft"] and t.lora_r == 8
    assert t.cpt == CptConfig(block_size=128, max_steps=3)
    assert t.sft == SftConfig(epochs=2.5, lr=0.0005, max_steps=None)
    stored = cfg.to_dict()["train"]  # the resolved config kept per generation has the nested shape
    assert stored["cpt"] == {"block_size": 128, "epochs": 1.0, "max_steps": 3, "lr": 2e-4}
    assert not any(k.startswith(("cpt_", "sft_")) for k in stored)
    assert AgeUpConfig.from_dict(cfg.to_dict()) == cfg


def test_flat_keys_of_an_older_config_still_work_with_a_warning_naming_the_new_key(tmp_path, tiny_curriculum,
                                                                                    caplog):
    with caplog.at_level(logging.WARNING, logger="evolution.config"):
        cfg = _resolve(tmp_path, FLAT, overrides={"curriculum": {"path": str(tiny_curriculum)}})
    t = cfg.train
    assert (t.cpt.block_size, t.cpt.max_steps, t.sft.epochs, t.sft.lr, t.sft.max_len) == (128, 3, 2.5, 0.0005, 200)
    assert t.lora_r == 8 and t.stages == ["cpt", "sft", "preference"]  # no stage list: today's default
    messages = [r.getMessage() for r in caplog.records]
    assert any("train.sft_epochs is deprecated; use [train.sft] epochs" in m for m in messages)
    assert any("train.cpt_block_size is deprecated; use [train.cpt] block_size" in m for m in messages)
    assert len([m for m in messages if "deprecated" in m]) == 5
    nested = ("[train]\nlora_r = 8\n[train.cpt]\nblock_size = 128\nmax_steps = 3\n"
              "[train.sft]\nepochs = 2.5\nlr = 0.0005\nmax_len = 200\n")
    assert cfg == _resolve(tmp_path, nested, overrides={"curriculum": {"path": str(tiny_curriculum)}})


def test_a_config_stored_by_an_older_version_loads(caplog):
    """``config.json`` / ``state.json`` of generations built before the stage sections: flat keys."""
    old = AgeUpConfig().to_dict()
    train = old["train"]
    cpt, sft = train.pop("cpt"), train.pop("sft")
    train.pop("stages")
    train |= {f"cpt_{k}": v for k, v in cpt.items()} | {f"sft_{k}": v for k, v in sft.items()}
    train["sft_max_steps"] = 60
    with caplog.at_level(logging.WARNING, logger="evolution.config"):
        cfg = AgeUpConfig.from_dict(old)
    assert cfg.train.sft.max_steps == 60 and cfg.train.stages == ["cpt", "sft", "preference"]
    assert cfg.train.cpt == CptConfig()
    assert "deprecated" in caplog.text


def test_quick_preset_uses_the_stage_sections(tiny_curriculum):
    cfg = config.resolve(quick=True, overrides={"curriculum": {"path": str(tiny_curriculum)}})
    assert cfg.quick and cfg.train.cpt.max_steps == 6
    assert (cfg.train.sft.max_steps, cfg.train.sft.epochs, cfg.train.save_steps) == (100, 1.0, 20)
    assert QUICK["train"]["sft"] == {"max_steps": 100, "epochs": 1.0}
    assert cfg.train.preference.max_steps == 20 and cfg.train.stages == ["cpt", "sft", "preference"]


def test_flags_override_a_stage_field(tmp_path, tiny_curriculum):
    cfg = _resolve(tmp_path, NESTED, overrides={"curriculum": {"path": str(tiny_curriculum)},
                                                "train": {"sft": {"epochs": 4.0}, "stages": ["cpt", "sft"]}})
    assert cfg.train.sft.epochs == 4.0 and cfg.train.sft.lr == 0.0005 and cfg.train.stages == ["cpt", "sft"]


def test_validation_reports_every_bad_field_at_once(tiny_curriculum):
    cfg = AgeUpConfig()
    cfg.curriculum.path = str(tiny_curriculum)
    cfg.train.stages = ["sft", "dpo"]
    cfg.train.cpt.block_size = 0
    cfg.train.sft.lr = -1.0
    cfg.train.sft.max_steps = 0
    cfg.train.batch_size = 0
    with pytest.raises(ConfigError) as exc:
        config.validate(cfg)
    assert exc.value.problems == [
        "train.stages: unknown stage 'dpo' (known: cpt, sft, preference)",
        "train.cpt.block_size must be a positive integer, got 0",
        "train.sft.max_steps must be a positive integer, got 0",
        "train.sft.lr must be a positive number, got -1.0",
        "train.batch_size must be a positive integer, got 0",
    ]


@pytest.mark.parametrize("stages", [[], ["sft", "sft"], "sft"])
def test_stage_list_must_name_distinct_stages(tiny_curriculum, stages):
    cfg = AgeUpConfig()
    cfg.curriculum.path = str(tiny_curriculum)
    cfg.train.stages = stages
    with pytest.raises(ConfigError, match="train.stages must be a non-empty list of distinct stage names"):
        config.validate(cfg)


def test_unknown_keys_in_a_stage_section_are_reported_with_the_others(tmp_path):
    text = "[train]\nbogus = 1\n\n[train.sft]\nmax_length = 3\n\n[train.cpt]\nlr = 1e-4\n"
    with pytest.raises(ConfigError) as exc:
        _resolve(tmp_path, text)
    assert len(exc.value.problems) == 2
    assert "[train] has no field 'bogus'" in exc.value.problems[0]
    assert "[train.sft] has no field 'max_length'" in exc.value.problems[1]


def test_a_stage_section_given_as_a_value_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"\[train\] sft is a section: write it as \[train.sft\]"):
        _resolve(tmp_path, "[train]\nsft = 3\n")


def test_every_stage_unit_has_its_config_section():
    from evolution import train

    sections = config.TrainConfig().stage_sections()
    assert list(sections) == [s.name for s in train.STAGES]
    assert config.TrainConfig().stages == list(sections)


def test_age_up_stages_flag_is_validated_with_the_rest(tiny_curriculum):
    from click.testing import CliRunner

    from evolution.cli import main

    r = CliRunner().invoke(main, ["age-up", "--curriculum", str(tiny_curriculum), "--stages", "sft,dpo"])
    assert r.exit_code != 0
    assert "train.stages: unknown stage 'dpo' (known: cpt, sft, preference)" in r.output


def test_preference_section_is_read_nested_and_validated_with_the_rest(tmp_path, tiny_curriculum):
    text = ("[train]\nstages = [\"sft\", \"preference\"]\n\n[train.preference]\nmethod = \"kto\"\nbeta = 0.2\n"
            "max_steps = 3\ndesirable_weight = \"off\"\n")
    cfg = _resolve(tmp_path, text, overrides={"curriculum": {"path": str(tiny_curriculum)}})
    p = cfg.train.preference
    assert (p.method, p.beta, p.max_steps, p.desirable_weight, p.lr) == ("kto", 0.2, 3, None, 5e-5)
    assert cfg.train.stages == ["sft", "preference"]
    assert AgeUpConfig.from_dict(cfg.to_dict()) == cfg  # stored with the generation, read back

    cfg.train.preference.method = "ppo"
    cfg.train.preference.batch_size = 1
    cfg.train.sft.lr = 0
    with pytest.raises(ConfigError) as exc:
        config.validate(cfg)
    assert exc.value.problems == [
        "train.sft.lr must be a positive number, got 0",
        "train.preference.method must be one of auto, kto, dpo, off, got 'ppo'",
        "train.preference.batch_size must be an integer of at least 2 (KTO's KL estimate pairs examples within a "
        "batch), got 1",
    ]


def test_preference_fields_are_not_flat_keys_of_train(tmp_path):
    with pytest.raises(ConfigError) as exc:
        _resolve(tmp_path, "[train]\npreference = \"kto\"\npreference_method = \"kto\"\n")
    assert len(exc.value.problems) == 2
    assert "[train] preference is a section: write it as [train.preference]" in exc.value.problems[0]
    assert "[train] has no field 'preference_method'" in exc.value.problems[1]
    with pytest.raises(ConfigError, match=r"\[train.preference\] has no field 'methods'"):
        _resolve(tmp_path, "[train.preference]\nmethods = \"kto\"\n")


def test_gate_config_holds_every_metric_units_settings_flat_with_the_units_defaults():
    import dataclasses

    from evolution.metrics import TABLE, GateSettings
    from evolution.train import TrainSettings

    names = [f.name for f in dataclasses.fields(config.GateConfig)]
    units = [u.config for u in TABLE if u.config is not None]
    assert names == [f.name for part in (GateSettings, *units) for f in dataclasses.fields(part)]
    gate = config.GateConfig()
    for part in units:  # each unit's defaults are the section's, and a unit's settings read back from it equal
        assert part(**{f.name: getattr(gate, f.name) for f in dataclasses.fields(part)}) == part()
    assert isinstance(gate, GateSettings) and isinstance(config.TrainConfig(), TrainSettings)
