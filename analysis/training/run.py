"""One training run from a composed ``conf/train.yaml`` (``experiments/train.py``): model, variant, data,
:class:`~analysis.training.trainer.GroupedTrainer`, save.

Variants: ``proxyv`` (``apply_proxyv`` from ``start_layer``; or continue a ProxyV checkpoint given as the model,
stage 2), ``none`` (the control), or an operator of :mod:`analysis.ops` applied during training from
``start_layer`` (saved as a plain checkpoint, loaded with ``from_pretrained``). ``reduction`` trains under a
token reduction (FastV / PyramidDrop; the loss on the rows the pruned forward still predicts).

Scale: the same code runs under ``accelerate launch`` / ``torchrun`` (DDP, FSDP via an accelerate config) and
DeepSpeed (``train.deepspeed``: a JSON such as ``conf/deepspeed/zero3.json``). ``TrainingArguments`` are built
before the model is loaded, so ZeRO-3 loads it partitioned. A run resumes from the last checkpoint in
``train.output_dir``.
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

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REDUCTIONS = ("fastv", "pdrop")  # training under VisionZip would need the merged rows' labels: not supported


def load_model(path: str, attn_implementation: str | None = None):
    """(model, processor) of a saved LLaVA / LLaVA-NeXT checkpoint (a ProxyV one through ``load_proxyv``), fp32."""
    from transformers import AutoConfig, AutoProcessor

    from ..models import generation_class

    config = AutoConfig.from_pretrained(path)
    kwargs = {"dtype": torch.float32, **({"attn_implementation": attn_implementation} if attn_implementation else {})}
    if getattr(config, "proxyv", None) is not None:
        from ..proxyv import load_proxyv

        model = load_proxyv(path, **kwargs)
    else:
        model = generation_class(config.model_type, path).from_pretrained(path, **kwargs)
    return model, AutoProcessor.from_pretrained(path)


def twin_names(cfg) -> list[str] | None:
    """The twins a run trains and evaluates on (``data.twins``; None: the four 64 px ones), checked."""
    names = cfg["data"].get("twins")
    if names is None:
        return None
    from .. import twins

    names = [names] if isinstance(names, str) else list(names)
    expanded = [m for n in names for m in {twins.GROUP: list(twins.TWINS), twins.GROUP_HR: list(twins.HR_TWINS)}
                .get(n, [n])]
    for name in expanded:
        twins.get(name)  # an unknown name is one line listing the known ones
        if name in twins.VIDEO_TWINS:
            raise ValueError(f"data.twins: {name} is a video twin; training reads pictures: use the twins of "
                             f"twins.TWINS or twins.HR_TWINS ({twins.GROUP}, {twins.GROUP_HR})")
    if len({twins.get(n).image_size for n in expanded}) != 1:
        raise ValueError(f"data.twins mixes image sizes ({expanded}); train the 64 px and the 128 px twins apart")
    return expanded


def dataset(cfg, processor, output_dir: Path) -> LlavaConversations:
    data = cfg["data"]
    if data.get("json"):
        json_path = Path(data["json"])
        folder = Path(data.get("image_folder") or json_path.parent)
    else:
        from .. import twins

        names = twin_names(cfg)
        size = {} if names is None else {"names": names, "image_size": twins.get(names[0]).image_size}
        json_path = export_twins(output_dir / "data", n=int(data["twins_per_task"]), split="train",
                                 seed=int(cfg["train"]["seed"]), **size)
        folder = json_path.parent
    return LlavaConversations(load_records(json_path), folder, processor, max_length=data.get("max_length"),
                              on_bad=data.get("on_bad", "skip"), workers=int(data.get("workers") or 1))


def learning_rates(cfg) -> dict:
    """The groups' learning rates for the variant (no ``proxyv`` group unless the variant is ProxyV)."""
    lrs = dict(cfg["train"]["lr"])
    if cfg["variant"] != "proxyv":
        lrs["proxyv"] = None
    if all(v is None for v in lrs.values()):
        raise ValueError(f"train.lr freezes every group the variant {cfg['variant']!r} trains ({lrs}); give at least "
                         "one of proxyv / projector / llm a learning rate")
    return lrs


def check_config(cfg) -> None:
    """Problems visible in the config alone: one line each, before anything is loaded."""
    variant, reduction = cfg["variant"], cfg.get("reduction")
    if variant not in ("proxyv", "none"):
        from ..ops import get_operator

        get_operator(variant)  # an unknown op is one line
        if reduction:
            raise ValueError(f"variant {variant!r} (an ablation op) and reduction {reduction['method']!r} do not "
                             "combine in one training run; use variant=none or variant=proxyv with a reduction")
    if reduction:
        if not isinstance(reduction, dict) or reduction.get("method") not in REDUCTIONS:
            raise ValueError(f"reduction must be null or {{method: {'|'.join(REDUCTIONS)}, ...its parameters}}, "
                             f"got {reduction!r}")
    dtype = cfg["train"].get("save_dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"train.save_dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    learning_rates(cfg)


def apply_variant(model, cfg):
    """Make ``model`` the variant (ProxyV applied or checked); returns the context every training forward runs in
    (an ablation op or a token reduction), or None."""
    variant, start = cfg["variant"], int(cfg["start_layer"])
    from ..models import llava_core

    present = getattr(llava_core(model), "proxyv", None)
    if variant == "proxyv":
        options = cfg["proxyv"]
        wanted = {"start_layer": start, "reduce_factor": int(options["reduce_factor"]), "init": options["init"]}
        if present is None:
            from ..proxyv import apply_proxyv

            apply_proxyv(model, **wanted, seed=int(cfg["train"]["seed"]))
        else:
            have = {k: getattr(present.settings, k) for k in wanted}
            if have != wanted:
                raise ValueError(f"the model is a ProxyV checkpoint with {have}, the config asks for {wanted}; "
                                 "set start_layer / proxyv.* to the checkpoint's to continue training it")
    elif present is not None:
        raise ValueError(f"the model is a ProxyV checkpoint; variant={variant!r} trains a plain model "
                         "(use variant=proxyv to continue training it, or a plain checkpoint)")
    reduction = cfg.get("reduction")
    if variant not in ("proxyv", "none"):
        from ..ablation import ablate

        return lambda: ablate(model, variant, start_layer=start)
    if reduction:
        from ..ablation import ablate

        params = {k: v for k, v in reduction.items() if k != "method"}
        return lambda: ablate(model, reduction["method"], **params)
    return None


class ContextTrainer(GroupedTrainer):
    """``GroupedTrainer`` whose forwards run inside ``context()`` (an ablation op or a token reduction).

    A token reduction's forward predicts fewer rows than the input has: its state maps the labels onto them
    (``output_labels``), and the loss is the model's own loss function on those."""

    def __init__(self, *args, context=None, **kwargs):
        self.context = context
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.context is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self.context() as state:
            if not hasattr(state, "output_labels"):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            labels = state.output_labels(labels)
        unwrapped = self.accelerator.unwrap_model(model)
        loss = unwrapped.loss_function(logits=outputs.logits, labels=labels, vocab_size=outputs.logits.shape[-1],
                                       num_items_in_batch=num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # as Trainer.compute_loss does: num_items_in_batch counts every process's labels
            loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1
                           else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss


def training_arguments(cfg, lrs: dict):
    from transformers import TrainingArguments

    t = cfg["train"]
    scheduler_kwargs = {"min_lr_rate": float(t["min_lr_rate"])} if t.get("min_lr_rate") is not None else {}
    extra = dict(t.get("args") or {})
    return TrainingArguments(
        output_dir=str(Path(t["output_dir"]) / "checkpoints"), max_steps=int(t["max_steps"]),
        num_train_epochs=float(t.get("epochs") or 1), per_device_train_batch_size=int(t["per_device_train_batch_size"]),
        gradient_accumulation_steps=int(t["gradient_accumulation_steps"]),
        learning_rate=max(v for v in lrs.values() if v is not None), warmup_steps=float(t["warmup"]),
        lr_scheduler_type=t["lr_scheduler_type"], lr_scheduler_kwargs=scheduler_kwargs,
        weight_decay=float(t["weight_decay"]), adam_beta2=float(t.get("adam_beta2", 0.999)),
        max_grad_norm=float(t.get("max_grad_norm", 1.0)), bf16=bool(t["bf16"]), tf32=t.get("tf32"),
        gradient_checkpointing=bool(t["gradient_checkpointing"]), deepspeed=t.get("deepspeed"),
        logging_steps=int(t["logging_steps"]), save_steps=int(t["save_steps"]), seed=int(t["seed"]),
        report_to="none", remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
        **{"dataloader_num_workers": 0, **extra})


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest ``checkpoint-N`` in ``folder`` that was completely written (the Trainer writes
    ``trainer_state.json`` last), or None; a checkpoint cut short by a kill is passed over."""
    found = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else ():
        try:
            step = int(path.name.split("-", 1)[1])
            json.loads((path / "trainer_state.json").read_text())
        except (ValueError, OSError):
            continue
        found.append((step, str(path)))
    return max(found)[1] if found else None


def evaluate_twins(model, processor, n: int, context, blind: bool = False, names=None) -> dict:
    """Greedy scores on the twins' eval splits (the tiny models' check), under the training context; ``blind``:
    every image blank; ``names``: the twins (default the four 64 px ones)."""
    from .evaluate import score_twins

    model.eval()
    return score_twins(model, processor, n=n, context=context or contextlib.nullcontext, blind=blind, names=names)


def train(cfg: dict, model_path: str, overrides: list[str] | None = None) -> Path:
    """Train as ``cfg`` says (a resolved ``conf/train.yaml``; ``overrides``: the command line's, recorded);
    returns the saved checkpoint's directory."""
    check_config(cfg)
    twin_names(cfg)  # a bad data.twins is one line before anything loads
    t = cfg["train"]
    torch.set_num_threads(int(t.get("threads") or 1))
    out = Path(t["output_dir"])
    lrs = learning_rates(cfg)
    args = training_arguments(cfg, lrs)  # first: under ZeRO-3 the model then loads partitioned
    model, processor = load_model(model_path, t.get("attn_implementation"))
    context = apply_variant(model, cfg)
    parameter_groups(model, lrs)  # a recipe that trains nothing is one line, before the data is prepared
    with args.main_process_first(local=False, desc="data"):  # one process exports the twins, the others read
        data = dataset(cfg, processor, out)
    trainer = ContextTrainer(model=model, args=args, train_dataset=data, lrs=lrs, context=context,
                             data_collator=functools.partial(collate, pad_token_id=processor.tokenizer.pad_token_id))
    last = last_complete_checkpoint(Path(args.output_dir))
    trainer.train(resume_from_checkpoint=last)
    record = {"entry": "experiments/train.py", "overrides": overrides, "model": model_path,
              "torch": torch.__version__, "config": cfg, "skipped": dict(data.skipped), "records": len(data), "resumed_from": last,
              "world_size": args.world_size, "global_batch": args.per_device_train_batch_size
              * args.gradient_accumulation_steps * args.world_size, "log": trainer.state.log_history}
    if int(cfg.get("eval_twins") or 0) and trainer.is_world_process_zero() and not t.get("deepspeed"):
        names = twin_names(cfg)
        record["scores"] = evaluate_twins(model, processor, int(cfg["eval_twins"]), context, names=names)
        if cfg.get("eval_blind"):
            record["blind"] = evaluate_twins(model, processor, int(cfg["eval_twins"]), context, blind=True,
                                             names=names)
    final = out / "model"
    dtype = DTYPES[t.get("save_dtype", "float32")]
    if dtype != torch.float32 and not t.get("deepspeed"):
        model.to(dtype)  # a smaller shipped checkpoint; loaders give the dtype they want
    trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        processor.save_pretrained(final)
        (final / "training_args.bin").unlink(missing_ok=True)  # a pickle of the arguments; training.json has them
        (final / "training.json").write_text(json.dumps(record, indent=2, default=str))
    return final
