"""Per-token log-probabilities for TRL's preference trainers: padding-free, and the LM head on reply tokens only.

TRL 1.16's ``KTOTrainer`` and ``DPOTrainer`` score every batch (policy, reference, KTO's KL rows)
with ``model(input_ids, attention_mask, labels, fused_lm_head=True).log_probs``, the forward
``trl.trainer.utils.add_fused_lm_head`` installs. On a CPU that forward runs the backbone over the
padded batch and projects *every* position onto the 49k-token vocabulary (only CUDA and XPU take
its compact path), though only the reply tokens have labels: for a short reply after a system
prompt, most of the LM head's work (a fifth of the model's FLOPs per position) is thrown away.

``install(model, autocast)`` replaces that forward with ``packed``: the batch's rows (right-padded,
as TRL's collators pad them) are packed into a few lanes as ``LaneCollator`` packs SFT rows
(first-fit decreasing, position ids restarting at each row so no row attends to another, no
attention mask), the backbone runs the lanes, and only the labelled positions go through the LM
head, in fp32 as TRL's kernel computes it. The result has the fields TRL reads
(``FusedCausalLMOutput``: log_probs, entropy, mean_logits, is_top1, label_mask), in the batch's
padded shape, so TRL's losses and metrics are unchanged.
"""

from __future__ import annotations

import types


def _lanes(lengths: list[int], multiple: int = 32, min_width: int = 128) -> tuple[int, list[tuple[int, int]]]:
    """Lane width and each row's (lane, offset): first-fit decreasing into lanes of the longest row's width."""
    width = -(-max(max(lengths), min_width) // multiple) * multiple
    room: list[int] = []
    place: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for r in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        lane = next((i for i, free in enumerate(room) if free >= lengths[r]), None)
        if lane is None:
            room.append(width)
            lane = len(room) - 1
        place[r] = (lane, width - room[lane])
        room[lane] -= lengths[r]
    return width, place


def packed(model, input_ids, attention_mask, labels, autocast, outputs: tuple[str, ...] = ("log_probs",)):
    """``FusedCausalLMOutput`` of ``model`` (a causal LM, maybe with LoRA layers) on a right-padded batch."""
    import torch
    import torch.nn.functional as F
    from trl.trainer.utils import FusedCausalLMOutput

    n_rows, seq = input_ids.shape
    lengths = attention_mask.sum(1)
    if not torch.equal(attention_mask.bool(), torch.arange(seq, device=lengths.device)[None] < lengths[:, None]):
        raise ValueError("packed log-probs need right-padded rows (attention mask: ones, then zeros)")
    width, place = _lanes(lengths.tolist())
    n_lanes = 1 + max(lane for lane, _ in place)
    # where[r, t]: the position of row r's token t in the flattened lanes
    start = torch.tensor([lane * width + off for lane, off in place], device=input_ids.device)
    where = start[:, None] + torch.arange(seq, device=input_ids.device)[None]
    real = attention_mask.bool()
    # A lane's unused tail keeps the positions of its place in the lane: a jump, so a segment of its own (or, right
    # after a row, the row's continuation, which the row never attends to); its outputs are never read.
    ids = input_ids.new_zeros(n_lanes * width)
    pos = torch.arange(n_lanes * width, device=input_ids.device) % width
    ids[where[real]] = input_ids[real]
    pos[where[real]] = torch.arange(seq, device=input_ids.device).expand(n_rows, seq)[real]

    target = labels[:, 1:]
    mask = target != -100
    with autocast():
        hidden = model.get_decoder()(input_ids=ids.view(n_lanes, width), position_ids=pos.view(n_lanes, width),
                                    use_cache=False).last_hidden_state
    hidden = hidden.reshape(n_lanes * width, -1)[where[:, :-1][mask]]
    head = model.get_output_embeddings()
    # fp32 as TRL's kernel on a CPU: the log-ratios of policy and reference are differences of sums of these
    with torch.autocast(hidden.device.type, enabled=False):
        logits = F.linear(hidden.float(), head.weight.float(), None if head.bias is None else head.bias.float())
    logp = logits.log_softmax(-1)
    tgt = target[mask]
    per: dict = {"log_probs": logp.gather(1, tgt[:, None]).squeeze(1)}
    with torch.no_grad():
        if "entropy" in outputs:
            per["entropy"] = -(logp.exp() * logp).sum(-1)
        if "mean_logits" in outputs:
            per["mean_logits"] = logits.mean(-1)
        if "is_top1" in outputs:
            per["is_top1"] = logits.argmax(-1) == tgt
    unknown = set(outputs) - {"log_probs", "entropy", "mean_logits", "is_top1"}
    if unknown:
        raise ValueError(f"packed log-probs cannot compute {sorted(unknown)}")
    full = {k: torch.zeros(mask.shape, dtype=v.dtype, device=v.device).masked_scatter(mask, v) for k, v in per.items()}
    log_probs = full["log_probs"]
    return FusedCausalLMOutput(loss=-log_probs.sum() / mask.sum().clamp(min=1), log_probs=log_probs,
                               entropy=full.get("entropy"), mean_logits=full.get("mean_logits"),
                               is_top1=full.get("is_top1"), label_mask=mask)


def install(model, autocast, outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """Make ``model(..., labels=..., fused_lm_head=True)`` (TRL's call) compute ``packed``; other calls unchanged."""
    original = type(model).forward

    def forward(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, use_cache=None, **kw):
        if not fused_lm_head:
            return original(self, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                            use_cache=use_cache, **kw)
        given = sorted(k for k, v in kw.items() if v is not None)  # PEFT passes inputs_embeds=None and the like
        if given:
            raise TypeError(f"packed log-probs do not take {given}")
        return packed(self, input_ids, attention_mask, labels, autocast, outputs)

    model.forward = types.MethodType(forward, model)
