"""Token layout: positions, newline tokens and crop grids agree with what the HF model does."""

from __future__ import annotations

import pytest
import torch

from analysis import compute_layout
from conftest import MULTI, PAIR, image, make_batch, model_for
from reference import language_model_inputs


def crop_features(model, pixel_values):
    """Projected patch features of every crop, (n_crops, side*side, D), computed here from the tower."""
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]
        return model.model.multi_modal_projector(hidden)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("samples", [PAIR, MULTI], ids=["pair", "multi"])
def test_llava_next_crops_point_at_their_features(samples, padding_side):
    model = model_for("next-llama")
    batch = make_batch("llava_next", samples, padding_side)
    layout = compute_layout(batch["input_ids"], model.config, batch["attention_mask"], batch["image_sizes"])
    embeds, _ = language_model_inputs(model, batch)
    newline = (embeds == model.model.image_newline).all(-1)
    assert torch.equal(layout.newline_mask, newline)
    image_index = 0
    for b, sample in enumerate(layout.samples):
        for img in sample.images:
            features = crop_features(model, batch["pixel_values"][image_index])
            # pixel_values are padded to the batch's largest crop count: base + high-res crops come first.
            assert len(img.crops) <= features.shape[0]
            for crop, feats in zip(img.crops, features):
                side = crop.positions.shape[0]
                kept = crop.positions >= 0
                assert kept.any()
                got = embeds[b, crop.positions[kept]]
                want = feats.view(side, side, -1)[kept]
                assert torch.equal(got, want)
            assert img.unpadded.positions.numel() + len(img.newline) + img.crops[0].positions.numel() == \
                img.end - img.start
            image_index += 1
    assert image_index == len(batch["image_sizes"])


def test_llava_grid_and_groups():
    model = model_for("llava-llama")
    batch = make_batch("llava", MULTI)
    layout = compute_layout(batch["input_ids"], model.config, batch["attention_mask"])
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    first, text_only = layout.samples
    assert [img.crops[0].shape for img in first.images] == [(side, side), (side, side)]
    assert len(text_only.images) == 0 and len(text_only.vision) == 0
    embeds, _ = language_model_inputs(model, batch)
    features = crop_features(model, batch["pixel_values"])
    for img, feats in zip(first.images, features):
        assert torch.equal(embeds[0, img.crops[0].positions.flatten()], feats)
    # Every attended position is exactly one of vision / text; padding is neither.
    for b, sample in enumerate(layout.samples):
        assert len(sample.vision) + len(sample.text) == int(batch["attention_mask"][b].sum())
        assert not set(sample.padding.tolist()) & set(sample.text.tolist())
    assert not layout.newline_mask.any()


def test_layout_errors_name_the_problem():
    model = model_for("next-llama")
    batch = make_batch("llava_next")
    with pytest.raises(ValueError, match="needs image_sizes"):
        compute_layout(batch["input_ids"], model.config, batch["attention_mask"])
    ids = batch["input_ids"].clone()
    first_image = (ids[0] == model.config.image_token_id).nonzero()[0, 0]
    ids[0, first_image + 3] = 50  # a hole in the image block
    with pytest.raises(ValueError, match="do not form one block"):
        compute_layout(ids, model.config, batch["attention_mask"], batch["image_sizes"])
    with pytest.raises(TypeError, match="supports model types"):
        compute_layout(batch["input_ids"], model.config.text_config)


def test_image_helper_is_deterministic():
    assert image(3).tobytes() == image(3).tobytes()
