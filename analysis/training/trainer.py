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

from collections.abc import Mapping

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
