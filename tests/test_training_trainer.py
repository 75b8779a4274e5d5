"""Trainer with the recipe's groups: a few steps on LLaVA-format data lower the loss on a fixed batch, train
exactly the chosen groups, each at its own learning rate."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import TrainingArguments

from analysis import tiny
from analysis.proxyv import apply_proxyv
from analysis.training.llava_data import LlavaConversations, collate, export_twins, load_records
from analysis.training.trainer import GroupedTrainer

ROOT = Path(__file__).resolve().parents[1]


def test_trainer_steps_lower_the_loss_and_train_exactly_the_groups(tmp_path):
    out = export_twins(tmp_path / "data", n=2, split="train", seed=0)
    processor = tiny.build_processor("llava")
    processor.chat_template = (ROOT / "checkpoints/tiny-llava/chat_template.jinja").read_text()
    data = LlavaConversations(load_records(out), out.parent, processor)  # export_twins returns the JSON path
    assert len(data) == 8 and not data.skipped
    model = apply_proxyv(tiny.build_model("llava", "llama", num_layers=4, seed=0), start_layer=2, init="learned",
                         seed=0)
    pad = processor.tokenizer.pad_token_id
    batch = collate([data[i] for i in range(4)], pad_token_id=pad)
    with torch.no_grad():
        before_loss = model(**batch).loss.item()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0, report_to="none",
                             save_strategy="no", logging_steps=1, use_cpu=True, seed=0, dataloader_num_workers=0,
                             remove_unused_columns=False)
    trainer = GroupedTrainer(model=model, args=args, train_dataset=data, lrs={"proxyv": 1e-2, "projector": 1e-2,
                                                                              "llm": 3e-3},
                             data_collator=functools.partial(collate, pad_token_id=pad))
    trainer.train()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-2, 1e-2, 3e-3]  # not args.learning_rate
    with torch.no_grad():
        after_loss = model(**batch).loss.item()
    assert after_loss < before_loss
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and not any(".vision_tower." in n for n in moved)
    assert any(".proxyv." in n for n in moved) and any(n.startswith("lm_head.") for n in moved)


def test_loss_under_a_reduction_is_the_loss_on_the_rows_it_predicts(tmp_path):
    """ContextTrainer under PyramidDrop: keep 1.0 gives exactly the plain loss; keep 0.5 gives the loss computed
    by hand on the rows the pruned forward outputs (labels mapped by the reduction's own state)."""
    from analysis.ablation import ablate
    from analysis.training.run import ContextTrainer

    out = export_twins(tmp_path / "data", n=1, split="train", seed=0)
    processor = tiny.build_processor("llava")
    processor.chat_template = (ROOT / "checkpoints/tiny-llava/chat_template.jinja").read_text()
    data = LlavaConversations(load_records(out), out.parent, processor)
    model = tiny.build_model("llava", "llama", num_layers=4, seed=0).eval()
    batch = collate([data[i] for i in range(3)], pad_token_id=processor.tokenizer.pad_token_id)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True,
                             remove_unused_columns=False)
    with torch.no_grad():
        plain = model(**batch).loss
        for keep in (1.0, 0.5):
            context = lambda keep=keep: ablate(model, "pdrop", layers=[2], keep=keep)  # noqa: E731
            trainer = ContextTrainer(model=model, args=args, lrs={"proxyv": None, "projector": 1e-3, "llm": 1e-3},
                                     context=context)
            loss = trainer.compute_loss(model, dict(batch))
            with context() as state:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                logits = model(**inputs).logits
                labels = state.output_labels(batch["labels"])
            shifted = labels[:, 1:].reshape(-1)
            by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                        shifted, ignore_index=-100)
            torch.testing.assert_close(loss, by_hand)
            if keep == 1.0:
                torch.testing.assert_close(loss, plain)
            else:
                assert logits.shape[1] < batch["input_ids"].shape[1]  # rows were pruned: a different loss
