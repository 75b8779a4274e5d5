"""tiny-llava-next (analysis/tiny_next.py): a LlavaNext model carrying tiny-llava's weights, 320 patch tokens + 16
newlines per 128 px image, the base-crop-only evaluation, and the NeXT items of the training data path."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from analysis import tiny_next, twins
from analysis.training.evaluate import prompt_text


@pytest.fixture(scope="module")
def built():
    torch.set_num_threads(1)
    return tiny_next.build()


def batch_of(processor, samples):
    return processor(images=[s["image"] for s in samples], text=[prompt_text(processor, s["question"]) for s in samples],
                     return_tensors="pt", padding=True)


def test_builder_carries_tiny_llavas_weights_and_adds_only_the_newline(built):
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
    )

    model, _ = built
    old = LlavaForConditionalGeneration.from_pretrained(tiny_next.BASE, dtype=torch.float32).state_dict()
    new = model.state_dict()
    assert isinstance(model, LlavaNextForConditionalGeneration)
    assert set(new) - set(old) == {"model.image_newline"} and set(old) <= set(new)
    assert all(torch.equal(old[k], new[k]) for k in old)
    config = model.config
    assert config.image_grid_pinpoints == [[128, 128]] and config.vision_config.image_size == 64
    assert config.vision_config.patch_size == 8 and config.text_config.num_hidden_layers == 32
    assert config.vision_feature_select_strategy == "default" and config.vision_feature_layer == -1


def test_a_128_px_twin_gives_320_patch_tokens_and_16_newlines(built):
    model, processor = built
    samples = twins.generate("synth_docvqa_hr", "eval", 2, seed=0)
    batch = batch_of(processor, samples)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert batch["pixel_values"].shape == (2, 5, 3, 64, 64) and batch["image_sizes"].tolist() == [[128, 128]] * 2
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [tiny_next.IMAGE_TOKENS] * 2 == [64 + 256 + 16] * 2
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch["pixel_values"],
                                                  image_sizes=batch["image_sizes"]).pooler_output
        logits = model(**batch).logits
    assert [f.shape[0] for f in features] == [336, 336]
    # the newline closes each of the 16 rows of 16 crop features, after the 64 base features
    rows = features[0][64:].view(16, 17, -1)
    assert torch.equal(rows[:, 16], model.model.image_newline.expand(16, -1))
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    composition = tiny_next.prompt_composition(processor, tiny_next.twin_questions(twins.HR_TWINS))
    assert composition["longest"]["image_tokens"] == 336 and composition["longest"]["image_share"] >= 0.85


def test_base_only_removes_exactly_the_high_res_tokens(built):
    """The base-only forward's input embeddings are the full forward's with the 272 high-res positions (4 crops x
    64 patches + 16 newlines) cut out: same text, same base-crop features, nothing else."""
    model, processor = built
    samples = twins.generate("synth_textvqa_hr", "eval", 3, seed=0)
    batch = batch_of(processor, samples)
    prepare, context = tiny_next.base_only(model, processor)
    base = prepare(batch, samples)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert base["input_ids"].shape[1] == batch["input_ids"].shape[1] - 272
    assert (base["input_ids"] == image_id).sum(1).tolist() == [64] * 3
    is_image = batch["input_ids"] == image_id
    keep = ~is_image | (torch.cumsum(is_image.long(), 1) <= 64)
    assert torch.equal(base["input_ids"], batch["input_ids"][keep].view(3, -1))
    assert torch.equal(base["pixel_values"], batch["pixel_values"])

    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
            with context():
                model(**base)
            model(**batch)  # the context restores the full packing
    finally:
        hook.remove()
    full, cut, again = seen
    assert torch.equal(cut, full[keep].view(3, -1, full.shape[-1]))
    assert torch.equal(again, full)
    assert "pack_image_features" not in vars(model.model)


def test_blank_crops_keep_positions_and_the_base_crop(built):
    _, processor = built
    samples = twins.generate("synth_ocrbench_hr", "eval", 2, seed=0)
    batch = batch_of(processor, samples)
    out = tiny_next.blank_crops(processor)(batch, samples)
    assert torch.equal(out["input_ids"], batch["input_ids"])
    assert torch.equal(out["pixel_values"][:, 0], batch["pixel_values"][:, 0])
    crops = out["pixel_values"][:, 1:]
    assert not torch.equal(crops, batch["pixel_values"][:, 1:])
    assert torch.all(crops.flatten(3).std(-1) < 1e-6)  # one colour per crop and channel: a blank page


def test_training_items_for_next_have_image_sizes_and_crops(tmp_path, built):
    from analysis.training.llava_data import (
        LlavaConversations,
        collate,
        export_twins,
        load_records,
    )

    _, processor = built
    path = export_twins(tmp_path, 3, names=list(twins.HR_TWINS), image_size=128)
    records = load_records(path)
    data = LlavaConversations(records, path.parent, processor)
    assert len(data) == 12 and not data.skipped
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    for i, record in enumerate(records):
        item = data[i]
        assert item["pixel_values"].shape == (1, 5, 3, 64, 64) and item["image_sizes"].tolist() == [[128, 128]]
        assert int((item["input_ids"] == image_id).sum()) == 336
        answer = processor.tokenizer.decode(item["labels"][item["labels"] >= 0])
        assert answer == " " + record["conversations"][1]["value"] + "</s>"  # the template's "ASSISTANT: X</s>"
    batch = collate([data[i] for i in range(4)], pad_token_id=processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (4, 5, 3, 64, 64) and batch["image_sizes"].tolist() == [[128, 128]] * 4
    forked = LlavaConversations(records, path.parent, processor, workers=2)
    assert forked.ids == data.ids and forked.lengths == data.lengths and forked._spans == data._spans


def test_run_config_picks_the_hr_twins():
    from analysis.training.run import twin_names

    assert twin_names({"data": {"twins": None}}) is None
    assert twin_names({"data": {"twins": "synth_finegrained_hr"}}) == list(twins.HR_TWINS)
    with pytest.raises(ValueError, match="mixes image sizes"):
        twin_names({"data": {"twins": ["synth_docvqa", "synth_docvqa_hr"]}})
    with pytest.raises(KeyError, match="known"):
        twin_names({"data": {"twins": ["synth_nope"]}})


def test_train_py_runs_the_next_recipe_and_saves_a_checkpoint_that_loads_and_evaluates(tmp_path, built):
    """experiments/train.py +recipe=tiny_next, shrunk to one step of two 128 px twins: a float16 LlavaNext
    checkpoint with its processor and training.json (scores on the _hr twins and blind), loadable and scorable."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from analysis.training.evaluate import load_checkpoint

    root = Path(__file__).resolve().parents[1]
    init = tiny_next.save(*built, tmp_path / "init")
    out = tmp_path / "run"
    args = [sys.executable, str(root / "experiments" / "train.py"), "+recipe=tiny_next", "model=tiny-next",
            f"model.pretrained={init}", f"train.output_dir={out}", "train.max_steps=1", "train.warmup=0",
            "train.per_device_train_batch_size=2", "data.twins_per_task=1", "eval_twins=1", "train.logging_steps=1"]
    done = subprocess.run(args, cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "model" / "training.json").read_text())
    assert set(record["scores"]) == set(twins.HR_TWINS) | {"mean"} and set(record["blind"]) == set(record["scores"])
    assert record["records"] == 4 and record["config"]["data"]["twins"] == "synth_finegrained_hr"
    model, processor = load_checkpoint(out / "model")
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    assert model.config.image_grid_pinpoints == [[128, 128]] and type(processor).__name__ == "LlavaNextProcessor"
    scores = tiny_next.score_modes(model, processor, 1, names=["synth_ocrbench_hr"], modes=("full", "base_only"))
    assert set(scores) == {"full", "base_only"}
