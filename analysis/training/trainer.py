"""transformers' ``Trainer`` with the official recipe's parameter groups (issue 11 groundwork).

    from analysis.training.trainer import GroupedTrainer
    trainer = GroupedTrainer(model=model, args=TrainingArguments(...), train_dataset=data,
                             data_collator=partial(collate, pad_token_id=...),
                             lrs={"proxyv": 3e-4, "projector": 1e-3, "llm": None})
    trainer.train()

The only change to ``Trainer``: :meth:`create_optimizer` builds the optimizer ``args`` names (AdamW by default,
its betas / eps / weight decay) over :func:`analysis.training.groups.parameter_groups`, so each group trains at
its own learning rate and the frozen ones get no gradient. ``Trainer`` calls this method on every path
(plain, accelerate, DeepSpeed without an optimizer in its config, FSDP), so the loop, mixed precision,
gradient accumulation, checkpointing and resume stay the library's. The scheduler scales every group alike.
Not yet built on it (issue 11 continues): the Hydra entry point ``experiments/train.py``, the shipped
DeepSpeed / FSDP configs, multi-process equivalence and resume tests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import Trainer

from .groups import parameter_groups


class GroupedTrainer(Trainer):
    """A ``Trainer`` whose optimizer holds the ``lrs`` groups (``{"proxyv", "projector", "llm"}`` -> lr or None)."""

    def __init__(self, *args, lrs: Mapping[str, float | None], **kwargs):
        self.lrs = dict(lrs)
        model = kwargs.get("model", args[0] if args else None)
        parameter_groups(model, self.lrs)  # freeze before Trainer looks at what trains (and fail early)
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = parameter_groups(model or self.model, self.lrs)
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model or self.model)
            kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
            decay = self.args.weight_decay
            self.optimizer = cls([{**g, "weight_decay": decay} for g in groups], **kwargs)
        return self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume the weights of a Trainer checkpoint under the model's own parameter names, strictly.

        ``Trainer`` loads ``model.safetensors`` with ``strict=False``, but transformers 5 saves LLaVA under its
        original (converted-back) key names (``language_model.model.*`` for ``model.language_model.*``): a resumed
        run would keep its start weights for all but a few tensors, with a warning only. DeepSpeed and FSDP
        checkpoints have their own loaders and go to ``Trainer``'s."""
        folder = Path(resume_from_checkpoint)
        files = _weight_files(folder)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not files:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(model or self.model)
        names = saved_names(model)
        state = {}
        for file in files:
            state.update(load_file(file))
        unknown = sorted(set(state) - set(names))
        if unknown:
            raise ValueError(f"resuming from {folder}: its weights {unknown[:3]}... are not this model's; "
                               "was the checkpoint written by another variant?")
        model.load_state_dict({names[k]: v for k, v in state.items()}, strict=True)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / "model.safetensors"] if (folder / "model.safetensors").exists() else []


def saved_names(model) -> dict[str, str]:
    """{name in a ``save_pretrained`` file: the model's own ``state_dict`` name}, from transformers' own reverse
    conversion (a probe tensor per parameter carries its index through the renaming)."""
    from transformers.core_model_loading import revert_weight_conversion

    own = list(model.state_dict())
    reverted = revert_weight_conversion(model, {name: torch.tensor([i]) for i, name in enumerate(own)})
    return {saved: own[int(probe.reshape(-1)[0])] for saved, probe in reverted.items()}
