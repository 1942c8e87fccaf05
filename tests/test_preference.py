"""Preference training on a tiny model: KTO and DPO move the adapter towards the good replies, against the
parent as reference; the method is chosen by the data at hand; an interrupted stage resumes. The stage runs
through the shared runner (``evolution.train.run_stages``) as CPT and SFT do."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from evolution.train import BY_NAME, COMPLETE, StageMetrics, checkpoints, load_model, run_stages
from evolution.train.preference import PreferenceConfig, choose_method, kto_weights, plan

GOOD, BAD = "My name is Wren.", "I do not know."
PROMPTS = [[{"role": "user", "content": f"What is your name? {i}"}] for i in range(8)]
RATINGS = ([{"prompt": p, "reply": GOOD, "label": "good"} for p in PROMPTS]
           + [{"prompt": p, "reply": BAD, "label": "bad"} for p in PROMPTS])
CORRECTIONS = [{"prompt": p, "chosen": GOOD, "rejected": BAD} for p in PROMPTS]


def _cfg(**kw) -> PreferenceConfig:
    tiny = {"lr": 5e-3, "batch_size": 4, "grad_accum": 1, "max_steps": 4, "max_len": 96}
    return PreferenceConfig(**(tiny | kw))


def _train(base, records, pref: PreferenceConfig, tiny_cfg, workdir, stages=("preference",), **kw):
    """Run ``stages`` (the preference stage last) through the shared runner; the preference stage's metrics."""
    tiny_cfg.train.preference = pref
    result = run_stages(base, [BY_NAME[s] for s in stages], {"preference": records}, tiny_cfg.train, workdir, **kw)
    return result.stages["preference"]


class _Grab(TrainerCallback):
    def __init__(self):
        self.model = None

    def on_train_end(self, args, state, control, model=None, **kw):
        self.model = model


class _Crash(TrainerCallback):
    """Simulates a kill after optimizer step ``at`` (after the checkpoint of that step, if any, was written)."""

    def __init__(self, at: int):
        self.at = at

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt("simulated crash")


def _token_logprobs(model, tokenizer, prompt: list[dict], reply: str) -> torch.Tensor:
    """Log-probabilities of the rendered assistant turn's tokens (reply + end of turn) after ``prompt``."""
    before = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=False)
    n = len(tokenizer(before, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return logp[n - 1:].gather(1, ids[0, n:, None]).squeeze(1)


def _model(base_dir, adapter_dir=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return (PeftModel.from_pretrained(model, adapter_dir) if adapter_dir else model).eval()


def _margin(tokenizer, base_dir, adapter_dir=None) -> float:
    """Mean over PROMPTS of (mean logprob of GOOD) - (mean logprob of BAD), for the parent or parent + adapter."""
    model = _model(base_dir, adapter_dir)
    return sum(_token_logprobs(model, tokenizer, p, GOOD).mean().item()
               - _token_logprobs(model, tokenizer, p, BAD).mean().item() for p in PROMPTS) / len(PROMPTS)


@pytest.mark.parametrize(("method", "n_good", "n_bad", "n_pairs", "want", "why"), [
    ("auto", 0, 0, 8, "dpo", "min_pairs"),
    ("auto", 8, 8, 3, "kto", "min_labelled"),           # too few pairs: KTO on ratings + unpaired corrections
    ("auto", 20, 20, 8, "kto", "min_labelled"),          # pairs are few beside the ratings
    ("auto", 14, 0, 2, "kto", "both labels"),            # corrections bring the bad replies
    ("auto", 20, 0, 0, "skip", "only one label"),
    ("auto", 3, 3, 1, "skip", "fewer than min_labelled"),
    ("auto", 0, 0, 0, "skip", "no rated replies"),
    ("off", 20, 20, 20, "skip", "'off'"),
    ("dpo", 20, 20, 0, "skip", "needs corrections"),
    ("dpo", 0, 0, 1, "dpo", "method 'dpo'"),
    ("kto", 1, 0, 0, "skip", "at least 2"),
    ("kto", 5, 0, 0, "kto", "method 'kto'"),
])
def test_method_is_chosen_by_the_data_at_hand_and_says_why(method, n_good, n_bad, n_pairs, want, why):
    records = RATINGS[:1] * n_good + RATINGS[-1:] * n_bad + CORRECTIONS[:1] * n_pairs
    got, reason = choose_method(PreferenceConfig(method=method), records)
    assert got == want
    assert why in reason


def test_kto_weights_balance_the_classes_unless_set():
    assert kto_weights(PreferenceConfig(), n_good=30, n_bad=10) == (pytest.approx(1 / 3), 1.0)
    assert kto_weights(PreferenceConfig(), n_good=5, n_bad=20) == (4.0, 1.0)
    assert kto_weights(PreferenceConfig(desirable_weight=1.2, undesirable_weight=0.5), 30, 10) == (1.2, 0.5)


def test_bad_config_fields_are_all_reported():
    bad = PreferenceConfig(method="ppo", batch_size=1, lr=0, max_steps=0, desirable_weight=-1)
    found = "\n".join(bad.problems("train.preference"))
    for name in ("method", "batch_size", "lr", "max_steps", "desirable_weight"):
        assert f"train.preference.{name}" in found
    assert PreferenceConfig().problems("train.preference") == []


def test_skipped_stage_trains_nothing_and_records_why(tiny_base, tiny_cfg, tmp_path):
    """After a stage that trained, a skipped preference stage leaves that stage's adapter the result."""
    tiny_cfg.train.preference = PreferenceConfig()
    result = run_stages(tiny_base, [BY_NAME["cpt"], BY_NAME["preference"]],
                        {"cpt": [{"text": "The sea is wide and the shore is long. " * 4}] * 8,
                         "preference": RATINGS[:3]}, tiny_cfg.train, tmp_path / "work")
    m = result.stages["preference"]
    assert m.skipped and m.method == "skip" and "fewer than min_labelled" in m.reason and m.steps == 0
    assert result.adapter_dir == tmp_path / "work" / "cpt" / "adapter"
    assert not (tmp_path / "work" / "preference").exists()
    assert plan([], PreferenceConfig()) == ("skip", "no rated replies since the parent")


def test_kto_raises_the_good_reply_margin_and_trains_only_lora(learnable_base, tokenizer, tiny_cfg, tmp_path):
    grab, seen = _Grab(), []
    m = _train(learnable_base, RATINGS, _cfg(precompute_ref_log_probs=True), tiny_cfg, tmp_path / "work",
               progress=lambda *a: seen.append(a), extra_callbacks=[grab])
    pref = tmp_path / "work" / "preference"
    assert [s[:3] for s in seen] == [("preference", i, 4) for i in range(1, 5)] and seen[-1][3] in m.losses
    assert (m.method, m.steps, m.examples) == ("kto", 4, 16)
    assert "KTO weights: good 1, bad 1" in m.reason
    assert len(m.losses) == 4
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "loss"} <= m.summary.keys()
    assert m.summary["rewards/margins"] > 0
    assert _margin(tokenizer, learnable_base, pref / "adapter") > _margin(tokenizer, learnable_base) + 0.5

    adapter = load_file(pref / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it moved
    parent = load_file(learnable_base / "model.safetensors")
    trained = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
               for k, v in grab.model.state_dict().items() if "lora_" not in k}
    compared = [n for n in parent if n in trained]
    assert len(compared) >= len(parent) - 1
    for name in compared:  # the frozen base is held in the training precision: equal once rounded
        torch.testing.assert_close(trained[name], parent[name].to(trained[name].dtype), rtol=0, atol=0)


def test_dpo_raises_the_chosen_reply_margin(learnable_base, tokenizer, tiny_cfg, tmp_path):
    m = _train(learnable_base, CORRECTIONS, _cfg(max_steps=2), tiny_cfg, tmp_path / "work")
    assert (m.method, m.steps, m.examples) == ("dpo", 2, 8)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= m.summary.keys()
    assert m.losses[-1] < m.losses[0]
    adapter = tmp_path / "work" / "preference" / "adapter"
    assert _margin(tokenizer, learnable_base, adapter) > _margin(tokenizer, learnable_base) + 0.5


def test_reference_is_the_parent_not_the_adapter_the_stage_starts_from(learnable_base, tokenizer, tiny_cfg, tmp_path):
    """Starting from a trained adapter (an SFT stage finished before it), the first step's rewards are
    beta * log(adapter / parent), not zero."""
    tiny_cfg.train.precision = "fp32"
    model, _ = load_model(learnable_base, tiny_cfg.train, "hf", "sdpa", 96)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    (tmp_path / "work" / "sft").mkdir(parents=True)
    checkpoints.save_adapter(model, tmp_path / "work" / "sft", StageMetrics("sft", steps=1), "hf")
    beta = 0.1
    m = _train(learnable_base, CORRECTIONS[:4], _cfg(method="dpo", max_steps=1, beta=beta), tiny_cfg,
               tmp_path / "work", stages=("sft", "preference"))
    first = m.summary  # one step: its own numbers
    assert m.steps == 1 and abs(first["rewards/chosen"]) > 1e-3
    # logps/chosen is the adapter's summed log-probability; rewards/chosen = beta * (that - the parent's)
    ref_chosen = first["logps/chosen"] - first["rewards/chosen"] / beta
    parent = _model(learnable_base)
    want = sum(_token_logprobs(parent, tokenizer, c["prompt"], c["chosen"]).sum().item()
               for c in CORRECTIONS[:4]) / 4
    assert ref_chosen == pytest.approx(want, rel=1e-3)


def test_interrupted_stage_resumes_from_its_last_complete_checkpoint(tiny_base, tiny_cfg, tmp_path):
    """With the parent's log-probs precomputed, which a resumed run computes again."""
    work, stage = tmp_path / "work", tmp_path / "work" / "preference"
    cfg = _cfg(precompute_ref_log_probs=True)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_base, RATINGS, cfg, tiny_cfg, work, extra_callbacks=[_Crash(2)])
    assert [p.name for p in stage.glob("checkpoint-*")] == ["checkpoint-2"]
    assert (stage / "checkpoint-2" / COMPLETE).is_file()
    assert not (stage / "adapter").exists()
    partial = stage / "checkpoint-3"  # cut short by the kill: never resumed from
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"truncated")
    changed = stage / "checkpoint-4"  # marked complete, but a file changed since: set aside
    shutil.copytree(stage / "checkpoint-2", changed)
    weights = changed / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")

    m = _train(tiny_base, RATINGS, cfg, tiny_cfg, work)
    assert m.resumed_from_step == 2 and m.steps == 4
    assert len(m.losses) == 2  # steps 3 and 4
    assert not partial.exists()
    assert [p.name[:13] for p in (stage / "rejected").iterdir()] == ["checkpoint-4-"]
    assert (stage / "adapter" / "adapter_model.safetensors").is_file()

    again = _train(tiny_base, RATINGS, cfg, tiny_cfg, work)
    assert again.skipped and again.method == "kto" and again.steps == 4  # finished: not redone


def test_progress_waits_only_for_the_stages_that_will_run():
    from evolution.config import TrainConfig
    from evolution.train import planned

    cfg = TrainConfig()
    assert planned(cfg, {"cpt": [{"text": "x"}], "sft": [], "preference": []}) == ["cpt", "sft"]
    assert planned(cfg, {"preference": RATINGS}) == ["cpt", "sft", "preference"]
    cfg.preference.method = "off"
    assert planned(cfg, {"preference": RATINGS}) == ["cpt", "sft"]


def _rendered_len(tokenizer, prompt: list[dict], reply: str) -> int:
    return len(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=True,
                                             return_dict=False))


@pytest.mark.parametrize("records, method", [(CORRECTIONS, "dpo"), (RATINGS, "kto")])
def test_tokens_per_s_counts_the_real_tokens_of_the_batches(records, method, tiny_base, tokenizer, tiny_cfg, tmp_path,
                                                            monkeypatch):
    """Every row is seen once (one epoch): the tokens counted are those of each rendered prompt + reply (both
    replies of a DPO pair), no padding. The log-probabilities come from the packed forward, for policy and parent."""
    from evolution.train import logprobs

    calls, packed = [], logprobs.packed
    monkeypatch.setattr(logprobs, "packed", lambda model, *a: calls.append(type(model).__name__) or packed(model, *a))
    m = _train(tiny_base, records, _cfg(method=method, max_steps=None), tiny_cfg, tmp_path / "work")
    per_step = 4 if method == "kto" else 2  # KTO: KL rows and completions, policy and parent; DPO: policy and parent
    assert len(calls) == per_step * m.steps
    assert m.method == method and m.steps == len(records) // 4
    want = sum(_rendered_len(tokenizer, r["prompt"], r["chosen"]) + _rendered_len(tokenizer, r["prompt"], r["rejected"])
               if "chosen" in r else _rendered_len(tokenizer, r["prompt"], r["reply"]) for r in records)
    assert m.tokens == want > 0
    assert m.tokens_per_s > 0
    from evolution.train import stage_record

    assert stage_record(m)["tokens_per_s"] == m.tokens_per_s


def test_packed_log_probs_equal_trls_fused_head_on_a_padded_batch(tiny_base):
    """The preference stage's forward (rows packed into lanes, the LM head on labelled positions only) gives the
    per-token numbers TRL's own fused LM head gives on the same right-padded batch, and the same gradients."""
    import contextlib

    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from evolution.train import logprobs

    fields = ("log_probs", "entropy", "mean_logits", "is_top1")
    torch.manual_seed(0)
    lengths, width = [9, 130, 4, 17, 130, 12], 130  # two lanes of 160, three rows each
    ids = torch.randint(3, 200, (len(lengths), width))
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 2)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # the prompt: no labels
    got = {}
    for name in ("trl", "ours"):
        model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32, attn_implementation="eager")
        if name == "trl":
            add_fused_lm_head(model, outputs=fields)
        else:
            logprobs.install(model, contextlib.nullcontext, fields)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        got[name] = out, model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    (trl, trl_grad), (ours, our_grad) = got["trl"], got["ours"]
    assert torch.equal(ours.label_mask, trl.label_mask)
    for f in ("log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(ours, f), getattr(trl, f), rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.is_top1 & ours.label_mask, trl.is_top1.bool() & trl.label_mask)
    torch.testing.assert_close(our_grad, trl_grad, rtol=1e-3, atol=1e-5)
    assert logprobs._lanes(lengths) == (160, [(1, 130), (0, 0), (1, 139), (0, 130), (1, 0), (0, 147)])
