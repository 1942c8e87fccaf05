"""A whole age-up on a tiny model: generation 0 and 1 exported, hashed, read-only, resumable."""

from __future__ import annotations

import json
import os
import stat

import pytest
from transformers import TrainerCallback

from evolution.generation import GenerationSummary
from evolution.fsutil import sha256_file
from evolution.paths import DataRoot
from tests.lineage_util import grow


class _CrashInSFT(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if args.output_dir.endswith("sft") and state.global_step == 3:
            raise KeyboardInterrupt("simulated crash")


def _files(root):
    return [p for p in root.rglob("*") if p.is_file()]


def test_age_up_builds_hashed_read_only_generations(tiny_base, tiny_cfg, ledger):
    from llama_cpp import Llama

    root = DataRoot.from_env()
    summary = grow(root, tiny_cfg, ledger, base=tiny_base)
    assert summary.gen == 1 and summary.parent == 0
    assert root.generations() == [0, 1]
    assert not root.staging_dir(1).exists() and not root.staging_dir(0).exists()

    gen1 = root.gen_dir(1)
    gguf = gen1 / "model.gguf"
    recorded = (gen1 / "model.gguf.sha256").read_text().split()
    assert recorded == [sha256_file(gguf), "model.gguf"]
    assert summary.gguf.sha256 == recorded[0]
    for art in summary.artifacts:
        assert sha256_file(gen1 / art.path) == art.sha256
        assert (gen1 / art.path).stat().st_size == art.size
    assert GenerationSummary.load(gen1) == summary

    for p in _files(gen1) + _files(root.gen_dir(0)):
        assert not p.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), p
    assert not os.stat(gen1).st_mode & stat.S_IWUSR

    for name in ("config.json", "metrics.json", "data/manifest.json", "adapter/adapter_model.safetensors"):
        assert (gen1 / name).is_file(), name
    manifest = json.loads((gen1 / "data" / "manifest.json").read_text())
    assert "curriculum/phase1_identity/sft.jsonl" in manifest["files"]
    assert summary.smoke["finish_reason"] in ("stop", "length")

    llm = Llama(model_path=str(gguf), n_ctx=128, verbose=False)
    assert llm.n_vocab() > 1000

    kinds = [(e.kind, e.gen) for e in ledger.entries()]
    assert kinds == [("generation_created", 0), ("exported", 0), ("promoted", 0), ("generation_created", 1),
                     ("training_started", 1), ("training_finished", 1), ("exported", 1), ("gate_result", 1),
                     ("rejected", 1)]  # a 6-step child of a random 2-layer model does not pass the gate
    exported = ledger.entries(kind="exported")[-1].payload
    assert {a["kind"] for a in exported["artifacts"]} == {"gguf", "safetensors", "adapter"}
    for art in exported["artifacts"]:
        assert sha256_file(root.root / art["path"]) == art["sha256"]
    gguf = next(a for a in exported["artifacts"] if a["kind"] == "gguf")
    assert gguf["sha256"] == recorded[0]
    assert ledger.served_generation() == 0
    for name in ("eval.json", "eval.md"):
        assert (gen1 / name).is_file()
    assert ledger.verify().ok
    # no ratings: the preference stage is skipped and says why; the adapter is SFT's, as before
    assert summary.train["preference"] | {"summary": None} == summary.train["preference"] | {
        "method": "skip", "reason": "no rated replies since the parent", "steps": 0, "skipped": True, "summary": None}
    assert summary.train["sft"]["steps"] == 6 and summary.train["adapter_dir"].endswith("sft/adapter")
    assert ledger.entries(kind="training_finished")[-1].payload["stages"]["preference"]["method"] == "skip"
    # how the weights moved, per layer: kept beside the generation and in its ledger entry, printed by the CLI
    moved = json.loads((gen1 / "weights.json").read_text())
    assert [r["layer"] for r in moved["layers"]][:2] == ["0", "1"] and moved["total"]["vs_parent"] > 0
    assert all(r["adapter_norm"] > 0 for r in moved["layers"][:2])
    assert moved["total"]["vs_gen0"] == moved["total"]["vs_parent"]  # its parent is generation 0
    assert exported["weights"] == moved and summary.weights == moved
    from click.testing import CliRunner

    from evolution.cli import main

    out = CliRunner().invoke(main, ["ledger", "show", "1", "--weights"])
    assert out.exit_code == 0 and "generation 1: how its weights moved, per layer" in out.output, out.output
    assert out.output.splitlines()[2].split()[0] == "0"  # a row per layer
    out = CliRunner().invoke(main, ["ledger", "show", "0", "--weights", "--json"])
    assert json.loads(out.output) == {"gen": 0, "weights": None}


def test_second_age_up_replays_earlier_data_and_trains_from_the_served(tiny_base, tiny_cfg, tiny_curriculum, ledger):
    from evolution.ledger import events as ev

    root = DataRoot.from_env()
    grow(root, tiny_cfg, ledger, base=tiny_base)
    ledger.record(ev.gate_result(0, 1, {"recall": 1.0}, {"recall": 0.5}, "pass"))
    ledger.record(ev.promoted(1))
    # The curriculum moves on: the old facts are no longer in it, replay must bring some back.
    (tiny_curriculum / "phase1_identity" / "sft.jsonl").write_text(json.dumps(
        {"messages": [{"role": "user", "content": "Where do you live?"},
                      {"role": "assistant", "content": "On Alder Street."}]}) + "\n")
    tiny_cfg.curriculum.replay_ratio = 3.0
    s2 = grow(root, tiny_cfg, ledger)
    assert (s2.gen, s2.parent) == (2, 1)
    manifest = json.loads((root.gen_dir(2) / "data" / "manifest.json").read_text())
    assert manifest["replayed"]["sft"] == 3
    assert "checkpoints/gen_0001/data/sft.jsonl" in manifest["files"]


def test_interrupted_age_up_resumes_without_redoing_finished_stages(tiny_base, tiny_cfg, ledger):
    root = DataRoot.from_env()
    with pytest.raises(KeyboardInterrupt):
        grow(root, tiny_cfg, ledger, base=tiny_base, train_callbacks=[_CrashInSFT()])
    staging = root.staging_dir(1)
    state = json.loads((staging / "state.json").read_text())
    assert state["completed"] == ["data"]
    assert root.generations() == [0]

    stages = []
    summary = grow(root, tiny_cfg, ledger, stage_cb=lambda s, w: stages.append((s, w)))
    assert ("data", "skip") in stages and ("data", "start") not in stages
    assert summary.resumed and summary.train["sft"]["resumed_from_step"] == 2
    assert root.generations() == [0, 1] and not staging.exists()
    assert [e.kind for e in ledger.entries(gen=1)].count("generation_created") == 1
    assert ledger.verify().ok


def test_generation_finished_before_a_crash_is_recorded_on_the_next_run(tiny_base, tiny_cfg, ledger):
    from evolution.ledger import Ledger

    root = DataRoot.from_env()
    grow(root, tiny_cfg, ledger, base=tiny_base)
    # A fresh ledger in another data root stands in for one that missed the last appends.
    other = root.root.parent / "other"
    (other / "checkpoints").mkdir(parents=True)
    for n in (0, 1):
        os.symlink(root.gen_dir(n), other / "checkpoints" / f"gen_000{n}")
    with Ledger.open(DataRoot(other)) as fresh:
        from evolution.promotion import reconcile

        reconcile(DataRoot(other), fresh, tiny_cfg.gate.stop_after)
        assert [(e.kind, e.gen) for e in fresh.entries()] == [
            ("exported", 0), ("promoted", 0), ("exported", 1), ("gate_result", 1), ("rejected", 1)]


def test_a_child_built_but_not_recorded_is_the_next_age_ups_result_not_a_reason_for_another(
        tiny_base, tiny_cfg, ledger, monkeypatch):
    from evolution import promotion

    root = DataRoot.from_env()
    grow(root, tiny_cfg, ledger, base=tiny_base)  # generation 0, and 1
    real = promotion.record_built

    def crash(root_, ledger_, s, *a, **kw):
        if s.gen == 2:
            raise KeyboardInterrupt("killed after the child was finished, before it was recorded")
        return real(root_, ledger_, s, *a, **kw)

    monkeypatch.setattr(promotion, "record_built", crash)
    with pytest.raises(KeyboardInterrupt):
        grow(root, tiny_cfg, ledger)
    assert root.generations() == [0, 1, 2] and not ledger.entries(gen=2, kind="gate_result")
    monkeypatch.setattr(promotion, "record_built", real)

    summary = grow(root, tiny_cfg, ledger)  # the user runs `evolve age-up` again
    assert summary.gen == 2
    assert root.generations() == [0, 1, 2] and not root.partial_generations()  # no generation 3 was started
    assert [e.kind for e in ledger.entries(gen=2)][-2:] == ["gate_result", "rejected"]
    assert ledger.verify().ok


def test_a_passing_child_left_for_the_daemon_is_the_next_age_ups_result(taught_base, daemon_cfg, ledger):
    """An age-up ends with its child gated and recorded, not decided: the daemon's worker leaves a
    passing child for the daemon to promote. Run again before that happened (the daemon died in
    between), it must not grow a second child beside it."""
    from evolution.ageup import age_up

    root = DataRoot.from_env()
    first = age_up(root, daemon_cfg, ledger, base=taught_base)
    assert first.gen == 1 and first.gate["verdict"] == "pass"
    assert not ledger.entries(gen=1, kind="promoted") and ledger.served_generation() == 0
    again = age_up(root, daemon_cfg, ledger)
    assert again.gen == 1 and root.generations() == [0, 1] and not root.partial_generations()
    assert not ledger.entries(gen=1, kind="promoted")  # still the daemon's to promote
    assert [e.kind for e in ledger.entries(gen=1)].count("gate_result") == 1


def test_tampered_parent_weights_stop_the_age_up(tiny_base, tiny_cfg, ledger):
    from evolution.errors import IntegrityError
    from evolution.fsutil import make_tree_writable

    root = DataRoot.from_env()
    grow(root, tiny_cfg, ledger, base=tiny_base)
    weights = root.gen_dir(0) / "hf" / "model.safetensors"
    make_tree_writable(root.gen_dir(0))
    with weights.open("r+b") as f:
        f.seek(-8, os.SEEK_END)
        tail = f.read(8)
        f.seek(-8, os.SEEK_END)
        f.write(bytes(b ^ 0xFF for b in tail))
    with pytest.raises(IntegrityError, match="gen_0000/hf/model.safetensors"):
        grow(root, tiny_cfg, ledger)
    assert root.partial_generations() == []


def test_unusable_data_root_and_bad_base_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from evolution.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("EVOLUTION_HOME", str(blocker / "home"))
    result = CliRunner().invoke(main, ["age-up"])
    assert result.exit_code == 1 and "is not usable" in result.output and "EVOLUTION_HOME" in result.output

    monkeypatch.setenv("EVOLUTION_HOME", str(tmp_path / "home2"))
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["age-up", "--base", str(empty)])
    assert result.exit_code == 1 and "not a Hugging Face checkpoint directory" in result.output
    assert not any((tmp_path / "home2" / "checkpoints").iterdir())


@pytest.mark.parametrize("args", [["ledger"], ["ledger", "verify"], ["ledger", "show", "0"], ["rollback", "--to", "0"],
                                  ["status"], ["karma"], ["karma", "add", "5"], ["experiences"],
                                  ["feedback", "1", "good"], ["resume"], ["report"]])
def test_a_data_root_that_does_not_exist_is_named_not_created(args, tmp_path, monkeypatch):
    """A typo in EVOLUTION_HOME: reading (or granting karma to) a lineage there is refused, naming the
    variable, and nothing is created; `ledger verify` must not call a missing root OK."""
    from click.testing import CliRunner

    from evolution.cli import main

    missing = tmp_path / "no-such-root"
    monkeypatch.setenv("EVOLUTION_HOME", str(missing))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert f"data root {missing} does not exist" in result.output and "EVOLUTION_HOME" in result.output
    assert not missing.exists()


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_generation_zero_from_other_model_families(arch, tokenizer, tiny_cfg, ledger, tmp_path):
    """--base takes a local HF causal LM of another family; it converts, quantizes and loads.

    Qwen and Phi checkpoints convert with their own tokenizers, which cannot be fetched here;
    llama.cpp's converter refuses the SmolLM2 tokenizer on those architectures, so they are not
    faked with it.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from evolution import curriculum
    from evolution.ageup import bootstrap

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        arch, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    base = tmp_path / f"tiny-{arch}"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tokenizer.save_pretrained(base)

    root = DataRoot.from_env()
    summary = bootstrap(root, tiny_cfg, ledger, curriculum.load(tiny_cfg.curriculum.path), base=base)
    assert summary.gen == 0 and summary.base == base.name
    assert sha256_file(root.gen_dir(0) / "model.gguf") == summary.gguf.sha256
    assert summary.smoke["finish_reason"] in ("stop", "length")
    assert ledger.served_generation() == 0


def test_restart_discards_the_interrupted_attempt_and_never_reuses_its_number(tiny_base, tiny_cfg, ledger):
    root = DataRoot.from_env()
    with pytest.raises(KeyboardInterrupt):
        grow(root, tiny_cfg, ledger, base=tiny_base, train_callbacks=[_CrashInSFT()])
    summary = grow(root, tiny_cfg, ledger, restart=True)
    assert summary.gen == 2 and root.partial_generations() == [] and root.generations() == [0, 2]
    assert [e.kind for e in ledger.entries(gen=1)] == ["generation_created", "training_started"]
    assert ledger.verify().ok


WEATHER = [f"What is the weather like in town {i}?" for i in range(8)]
GOOD_REPLY, BAD_REPLY = "It is sunny and warm today.", "I refuse to answer that."


def _reply_margin(hf_dir, tokenizer) -> float:
    """Mean over WEATHER of (mean log-prob of GOOD_REPLY) - (mean log-prob of BAD_REPLY) under ``hf_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def logp(prompt, reply):
        msgs = [{"role": "user", "content": prompt}]
        n = len(tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)["input_ids"])
        full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": reply}], tokenize=False)
        ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        return lp[n - 1:].gather(1, ids[0, n:, None]).mean().item()

    return sum(logp(q, GOOD_REPLY) - logp(q, BAD_REPLY) for q in WEATHER) / len(WEATHER)


def test_age_up_trains_on_the_ratings_since_the_parent(learnable_base, tokenizer, tiny_cfg, ledger):
    """Rated replies: the preference stage runs (KTO: good and bad ratings), the child prefers the good reply
    more than its parent did, a bad reply is never an SFT example, and the next child takes only newer ratings."""
    from click.testing import CliRunner

    from evolution.cli import main
    from evolution.intake.experiences import ExperienceStore

    root = DataRoot.from_env()
    store = ExperienceStore(ledger)
    for i, q in enumerate(WEATHER):
        for label, reply in (("good", GOOD_REPLY), ("bad", BAD_REPLY)):
            eid = store.capture([{"role": "user", "content": q}], reply, f"chatcmpl-{label}-{i}", "evolution-gen-0",
                                None, 0, "stop", False)
            store.rate(eid, label)
    p = tiny_cfg.train.preference
    p.lr, p.batch_size, p.grad_accum, p.max_steps, p.max_len = 5e-3, 4, 1, 4, 96
    tiny_cfg.curriculum.experience_heldout = 0.0  # all 16 train here (the held-out share: tests/test_replay.py)
    summary = grow(root, tiny_cfg, ledger, base=learnable_base)

    gen1 = root.gen_dir(1)
    pref = summary.train["preference"]
    assert (pref["method"], pref["steps"], pref["examples"], pref["skipped"]) == ("kto", 4, 16, False)
    assert "rewards/margins" in pref["summary"] and "16 ratings (8 good and 8 bad replies" in pref["reason"]
    assert _reply_margin(gen1 / "hf", tokenizer) > _reply_margin(root.gen_dir(0) / "hf", tokenizer) + 0.5

    records = [json.loads(line) for line in (gen1 / "data" / "preference.jsonl").read_text().splitlines()]
    assert len(records) == 16 and {r["label"] for r in records} == {"good", "bad"}
    sft = (gen1 / "data" / "sft.jsonl").read_text()
    assert BAD_REPLY not in sft  # a reply rated bad is never an SFT example
    taught = {(r["messages"][-2]["content"], r["messages"][-1]["content"])
              for r in map(json.loads, sft.splitlines()) if r["messages"][-1]["content"] == GOOD_REPLY}
    assert {(q, GOOD_REPLY) for q in WEATHER} <= taught  # each good reply, as asked (its variants beside it)
    manifest = json.loads((gen1 / "data" / "manifest.json").read_text())
    assert manifest["experiences"] == {"taken": 16, "through": 16}
    assert manifest["data"]["preference.jsonl"] == sha256_file(gen1 / "data" / "preference.jsonl")
    assert json.loads((gen1 / "metrics.json").read_text())["preference"]["method"] == "kto"
    assert json.loads((gen1 / "metrics.json").read_text())["preference"]["tokens_per_s"] > 0
    # The gate asked child and parent the 8 prompts whose good reply the child trained on (ROUGE-L), and
    # said there was nothing held out to measure a preference margin on.
    gate_report = json.loads((gen1 / "eval.json").read_text())
    assert 0.0 <= gate_report["metrics"]["experience_similarity"] <= 1.0
    assert gate_report["metrics"]["preference_margin"] is None
    assert len(gate_report["child"]["details"]["experience_similarity"]["items"]) == 8
    finished = ledger.entries(kind="training_finished")[-1].payload
    assert finished["stages"]["preference"]["method"] == "kto" and finished["stage_steps"]["preference"] == 4
    shown = CliRunner().invoke(main, ["ledger", "show", "1"], catch_exceptions=False).output
    assert "preference: kto, 4 steps" in shown and "rewards/margins" in shown
    # ... and its lessons: the 8 prompts, parent's and child's reply and ROUGE-L, read from gen_0001/eval.json.
    assert "lessons: experience" in shown and f" | {WEATHER[0]} | {GOOD_REPLY} | " in (gen1 / "eval.md").read_text()
    assert finished["stages"]["preference"]["tokens_per_s"] > 0 and " tokens/s" in shown.split("preference:")[1]

    # nothing rated since: the next child's preference stage is skipped, and says why
    from evolution.ledger import events as ev

    ledger.record(ev.gate_result(0, 1, {"recall": 1.0}, {"recall": 0.5}, "pass"))
    ledger.record(ev.promoted(1))
    s2 = grow(root, tiny_cfg, ledger)
    assert s2.train["preference"]["method"] == "skip" and s2.train["preference"]["steps"] == 0
    assert s2.train["preference"]["reason"] == "no rated replies since the parent"
    assert (root.gen_dir(2) / "data" / "preference.jsonl").read_text() == ""


def test_a_gate_asks_the_probes_its_lineage_is_due_to_ask_and_the_ledger_keeps_which(tiny_base, tiny_cfg, ledger):
    from evolution.intake import Intake
    from evolution.ledger import events as ev

    root = DataRoot.from_env()
    grow(root, tiny_cfg, ledger, base=tiny_base)
    probes = Intake(ledger).probes
    ids = [f"probe-{probes.add(f'What is fact {i}?', [f'F{i}']).id}" for i in range(12)]
    # generation 1 passed a gate that asked the first six probes; the next six were posted since
    ledger.record(ev.gate_result(0, 1, {"recall": 1.0}, {"recall": 0.5}, "pass",
                                 probes={"asked": ids[:6], "right": ids[:3]}))
    ledger.record(ev.promoted(1))
    tiny_cfg.gate.probe_sample, tiny_cfg.gate.probe_every = 5, 2
    s2 = grow(root, tiny_cfg, ledger)
    assert (s2.gen, s2.parent) == (2, 1)
    asked = ledger.entries(kind="gate_result")[-1].payload["probes"]
    # the budget is max(5, 12 / 2) = 6: the six never asked; none of the first six is due after one gate
    assert asked["asked"] == ids[6:] and (asked["posted"], asked["new"], asked["due"], asked["drawn"]) == (12, 6, 0, 0)
    report = json.loads((root.gen_dir(2) / "eval.json").read_text())
    assert [r["id"] for r in report["child"]["details"]["probe_recall"]["items"]] == ids[6:]
    assert "Probes: 6 of 12 posted were asked: 6 no gate of the lineage had asked" in \
        (root.gen_dir(2) / "eval.md").read_text()


def test_the_gate_also_reports_its_probes_asked_with_retrieval_for_information(tiny_base, tiny_cfg, ledger):
    """Issue 29: the verdict is on the weights alone; the report adds the probes asked as chat would serve the child,
    with the lessons retrieval would still hold: only a probe that finds notes is asked again."""
    from evolution.config import RetrievalConfig
    from evolution.intake import Intake

    root = DataRoot.from_env()
    grow(root, tiny_cfg, ledger, base=tiny_base)
    intake = Intake(ledger)
    intake.conversations.add([{"role": "user", "content": "What is my dog called?"},
                              {"role": "assistant", "content": "Your dog is called Bramble."}])
    dog = f"probe-{intake.probes.add('Can you remind me what my dog is called?', ['Bramble']).id}"
    other = f"probe-{intake.probes.add('How many legs does a spider have?', ['eight']).id}"
    tiny_cfg.gate.min_probe_items, tiny_cfg.gate.stop_after = 1, 100  # the tiny model never gains recall
    s2 = grow(root, tiny_cfg, ledger, retrieval=RetrievalConfig())

    fig = ledger.entries(gen=s2.gen, kind="gate_result")[-1].payload["retrieval"]
    assert (fig["probes"], fig["with_notes"], fig["lessons"], fig["backend"]) == (2, 1, 1, "fts5")
    assert "items" not in fig  # the replies stay in eval.json
    report = json.loads((root.gen_dir(s2.gen) / "eval.json").read_text())
    gate_replies = {r["id"]: r["reply"] for r in report["child"]["details"]["probe_recall"]["items"]}
    rows = {r["id"]: r for r in report["retrieval"]["items"]}
    assert rows[dog]["notes"] == ["conversation:1#0"] and rows[other]["notes"] == []
    assert rows[other]["reply"] == gate_replies[other]  # no notes: chat's prompt is the gate's
    assert "## With retrieval (for information" in (root.gen_dir(s2.gen) / "eval.md").read_text()
    from click.testing import CliRunner

    from evolution.cli import main

    shown = CliRunner().invoke(main, ["ledger", "show", str(s2.gen)], catch_exceptions=False).output
    assert "with retrieval (for information): probe recall" in shown and "1 of 2 probes found notes" in shown

    s3 = grow(root, tiny_cfg, ledger)  # without the lineage's settings (retrieval off): the gate's figure alone
    assert "retrieval" not in ledger.entries(gen=s3.gen, kind="gate_result")[-1].payload
