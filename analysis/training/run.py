"""One training run from a composed ``conf/train.yaml`` (``experiments/train.py``): model, variant, data,
:class:`~analysis.training.trainer.GroupedTrainer`, save. Issue 11 groundwork: one process; the shipped
DeepSpeed / FSDP configs, multi-process equivalence and the retrained checkpoints are not here yet.

Variants: ``proxyv`` (``apply_proxyv`` from ``start_layer``), ``none`` (the control), or an operator of
:mod:`analysis.ops` applied during training from ``start_layer`` (the model is saved as a plain checkpoint,
loaded with ``from_pretrained``). A run resumes from the last checkpoint in ``train.output_dir``.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import torch

from .groups import parameter_groups
from .llava_data import LlavaConversations, collate, export_twins, load_records
from .trainer import GroupedTrainer


def load_model(path: str):
    """(model, processor) of a saved LLaVA / LLaVA-NeXT checkpoint, fp32, for training."""
    from transformers import AutoConfig, AutoProcessor

    from ..models import generation_class

    config = AutoConfig.from_pretrained(path)
    model = generation_class(config.model_type, path).from_pretrained(path, dtype=torch.float32)
    return model, AutoProcessor.from_pretrained(path)


def dataset(cfg, processor, output_dir: Path) -> LlavaConversations:
    data = cfg["data"]
    if data.get("json"):
        json_path = Path(data["json"])
        folder = Path(data.get("image_folder") or json_path.parent)
    else:
        json_path = export_twins(output_dir / "data", n=int(data["twins_per_task"]), split="train",
                                 seed=int(cfg["train"]["seed"]))
        folder = json_path.parent
    return LlavaConversations(load_records(json_path), folder, processor, max_length=data.get("max_length"),
                              on_bad=data.get("on_bad", "skip"))


def variant_context(model, cfg):
    """(lrs adjusted to the variant, the context every training forward runs in)."""
    lrs = dict(cfg["train"]["lr"])
    variant, start = cfg["variant"], int(cfg["start_layer"])
    if variant == "proxyv":
        from ..proxyv import apply_proxyv

        options = cfg["proxyv"]
        apply_proxyv(model, start_layer=start, reduce_factor=int(options["reduce_factor"]), init=options["init"],
                     seed=int(cfg["train"]["seed"]))
        return lrs, None
    lrs["proxyv"] = None
    if variant == "none":
        return lrs, None
    from ..ablation import ablate
    from ..ops import get_operator

    get_operator(variant)  # an unknown op is one line, before any training
    return lrs, lambda: ablate(model, variant, start_layer=start)


class ContextTrainer(GroupedTrainer):
    """``GroupedTrainer`` whose forwards run inside ``context()`` (an ablation op fine-tuned under)."""

    def __init__(self, *args, context=None, **kwargs):
        self.context = context or contextlib.nullcontext
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, *args, **kwargs):
        with self.context():
            return super().compute_loss(model, inputs, *args, **kwargs)


def train(cfg: dict, model_path: str) -> Path:
    """Train as ``cfg`` says (a resolved ``conf/train.yaml``); returns the saved checkpoint's directory."""
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    t = cfg["train"]
    torch.set_num_threads(int(t.get("threads") or 1))
    out = Path(t["output_dir"])
    model, processor = load_model(model_path)
    lrs, context = variant_context(model, cfg)
    parameter_groups(model, lrs)  # a recipe that trains nothing is one line, before the data is prepared
    data = dataset(cfg, processor, out)
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), max_steps=int(t["max_steps"]),
        per_device_train_batch_size=int(t["per_device_train_batch_size"]),
        gradient_accumulation_steps=int(t["gradient_accumulation_steps"]), learning_rate=max(
            v for v in lrs.values() if v is not None), warmup_steps=float(t["warmup"]),
        lr_scheduler_type=t["lr_scheduler_type"], weight_decay=float(t["weight_decay"]), bf16=bool(t["bf16"]),
        gradient_checkpointing=bool(t["gradient_checkpointing"]), logging_steps=int(t["logging_steps"]),
        save_steps=int(t["save_steps"]), seed=int(t["seed"]), report_to="none", remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    trainer = ContextTrainer(model=model, args=args, train_dataset=data, lrs=lrs, context=context,
                             data_collator=functools.partial(collate, pad_token_id=processor.tokenizer.pad_token_id))
    last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
    trainer.train(resume_from_checkpoint=last)
    final = out / "model"
    model.save_pretrained(final)
    processor.save_pretrained(final)
    (final / "training.json").write_text(json.dumps({"config": cfg, "skipped": dict(data.skipped),
                                                     "records": len(data), "resumed_from": last,
                                                     "log": trainer.state.log_history}, indent=2, default=str))
    return final
