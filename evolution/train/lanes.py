"""Causal-LM training on token rows packed into lanes: the trainer CPT and SFT share.

``LaneCollator`` packs rows of different lengths into a few equal-width lanes with no attention
across rows; ``lane_loss`` scores only the labelled positions; ``trainer`` builds TRL's
``SFTTrainer`` fed and scored by them (on the ``hf`` backend; Unsloth brings its own
padding-free batches and fused loss).
"""

from __future__ import annotations


class LaneCollator:
    """Pack a batch of rows into a few equal-width lanes, with no attention across rows.

    Rows are placed longest first into the first lane with room (first-fit decreasing); the lane
    width is the longest row rounded up to ``multiple`` (at least ``min_width``). Position ids
    restart at every row, so transformers' attention masks keep each row to itself (no attention
    mask is passed, which is what makes it look for packed rows); the rest of a lane is padding,
    a segment of its own with no labels. Against padding every row to the longest of the batch
    this trains on a third fewer tokens for the same data, and the few lane widths it produces
    let oneDNN reuse its compiled kernels instead of generating new ones for every batch shape.
    Labels: the row's tokens where ``assistant_masks`` is 1 (all of them when a row has none),
    never a row's first token (it has nothing before it in its own row).
    """

    def __init__(self, pad_id: int, multiple: int = 32, min_width: int = 128):
        self.pad_id, self.multiple, self.min_width = pad_id, multiple, min_width

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        longest = max(len(r["input_ids"]) for r in rows)
        width = -(-max(longest, self.min_width) // self.multiple) * self.multiple
        lanes: list[list[dict]] = []
        room: list[int] = []
        for r in sorted(rows, key=lambda r: -len(r["input_ids"])):
            n = len(r["input_ids"])
            i = next((i for i, free in enumerate(room) if free >= n), None)
            if i is None:
                lanes.append([])
                room.append(width)
                i = len(lanes) - 1
            lanes[i].append(r)
            room[i] -= n
        ids = torch.full((len(lanes), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(lanes), width), -100, dtype=torch.long)
        pos = torch.zeros((len(lanes), width), dtype=torch.long)
        for i, lane in enumerate(lanes):
            at = 0
            for r in lane:
                x = torch.tensor(r["input_ids"], dtype=torch.long)
                n = len(x)
                mask = r.get("assistant_masks")
                lab = x.clone() if mask is None else x.masked_fill(~torch.tensor(mask, dtype=torch.bool), -100)
                lab[0] = -100
                ids[i, at:at + n], labels[i, at:at + n] = x, lab
                pos[i, at:at + n] = torch.arange(n)
                at += n
            pos[i, at:] = torch.arange(width - at)
        return {"input_ids": ids, "position_ids": pos, "labels": labels,
                "real_tokens": sum(len(r["input_ids"]) for r in rows)}


def lane_loss(model, inputs: dict, autocast, num_items_in_batch=None):
    """Mean next-token loss over the labelled positions, with the LM head applied to those only.

    SFT trains on assistant tokens, a quarter of the tokens here: projecting every position onto
    the 49k-token vocabulary (what a stock causal-LM loss does) spends most of the LM head's
    work, and a good part of the step, on logits that are thrown away.

    Under data-parallel training ``model`` is the DDP wrapper, which only syncs the gradients of a
    step whose forward went through it: the loss is then computed as its module's forward.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        inner = model.module
        inner.forward = lambda **kw: _lane_loss(inner, kw, autocast, num_items_in_batch)
        try:
            return model(**inputs)
        finally:
            del inner.forward  # the class's own forward again
    return _lane_loss(model, inputs, autocast, num_items_in_batch)


def _lane_loss(model, inputs: dict, autocast, num_items_in_batch=None):
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    target = inputs["labels"][:, 1:]
    keep = target != -100
    with autocast():
        hidden = base.get_decoder()(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                                    use_cache=False).last_hidden_state
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    loss = F.cross_entropy(logits.float(), target[keep], reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1))


def _lane_trainer_class():
    from trl import SFTTrainer

    class LaneTrainer(SFTTrainer):
        """TRL's SFTTrainer fed by ``LaneCollator`` and scored by ``lane_loss``; counts real tokens."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            real = torch.tensor(inputs.pop("real_tokens"), device=inputs["input_ids"].device)
            self.state.num_input_tokens_seen += int(self.accelerator.gather(real).sum())  # every process's rows
            loss = lane_loss(model, inputs, self.accelerator.autocast, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # num_items_in_batch counts the labels of every process and DDP averages the gradients: scale back
                # to the sum (the Trainer does the same for losses it computes itself)
                loss = loss * self.accelerator.num_processes
            return (loss, None) if return_outputs else loss

    return LaneTrainer


def trainer(model, tokenizer, rows: list[dict], args: dict, callbacks: list, backend: str, parent=None):
    """TRL's SFTTrainer over ``rows`` (already tokenized, packed or truncated by ``evolution.tokens``):
    the lane collator and loss on the ``hf`` backend, TRL's own on Unsloth. (No reference model: ``parent``
    is not used.)"""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    lanes = backend == "hf"
    config = SFTConfig(
        **args,
        max_length=None,  # rows are already packed / truncated by evolution.tokens
        packing=False,
        include_num_input_tokens_seen="no" if lanes else "non_padding",
        # Our rows arrive tokenized with their masks; the lane collator makes labels of them.
        dataset_kwargs={"skip_prepare_dataset": True} if lanes else None,
        remove_unused_columns=not lanes,
    )
    return (_lane_trainer_class() if lanes else SFTTrainer)(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=callbacks,
        **({"data_collator": LaneCollator(tokenizer.pad_token_id or tokenizer.eos_token_id)} if lanes else {}),
    )
