"""Token layout of Qwen2-VL / Qwen2.5-VL / Qwen3-VL batches: positions and (t, h, w) grids agree with what
the HF model does -- where it scatters each image's / video's features, and the M-RoPE position it gives each
vision token (``model.model.get_rope_index``)."""

from __future__ import annotations

import re

import pytest
import torch

from analysis import compute_layout
from analysis.layout_qwen import QwenBatchLayout, compute_qwen_layout, layout_of_batch
from qwen_helpers import KINDS, PAIR, SAMPLE_SETS, make_batch, model_for, processor_for, rope_index


def language_model_embeds(model, batch) -> torch.Tensor:
    """The ``inputs_embeds`` the decoder receives (vision features already scattered in)."""
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return captured["embeds"]


def vision_features(model, batch) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per image / per video merged features ``(n_tokens, D)``, computed here from the tower."""
    out = {}
    with torch.no_grad():
        if "pixel_values" in batch:
            out["image"] = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        if "pixel_values_videos" in batch:
            out["video"] = model.model.get_video_features(batch["pixel_values_videos"],
                                                          batch["video_grid_thw"]).pooler_output
    return out


def independent_positions(input_ids, token_id: int, grid_thw, merge: int):
    """Written here: (sample, positions) of each image / video -- the token_id positions of the whole batch in
    row-major order (masked_scatter's order), cut by t*h*w/merge^2."""
    rows, cols = (input_ids == token_id).nonzero(as_tuple=True)
    out, cursor = [], 0
    for t, h, w in ([] if grid_thw is None else grid_thw.tolist()):
        n = t * h * w // merge ** 2
        out.append((int(rows[cursor]), cols[cursor:cursor + n].tolist()))
        cursor += n
    assert cursor == len(rows)
    return out


def assert_rope_matches(layout: QwenBatchLayout, batch, model) -> None:
    """The layout's (t, h, w) coordinates are the model's M-RoPE coordinates of each vision token."""
    rope = rope_index(model, batch)
    config = model.config
    for b, sample in enumerate(layout.samples):
        text = rope[:, b, sample.text]
        assert torch.equal(text[0], text[1]) and torch.equal(text[1], text[2])  # text: 1-D positions
        for grid in sample.grids:
            t, h, w = grid.shape
            P = rope[:, b, grid.positions]  # (3, t, h, w)
            origin = P[:, :, :1, :1]
            assert torch.equal(P[1] - origin[1], torch.arange(h).view(1, h, 1).expand(t, h, w))
            assert torch.equal(P[2] - origin[2], torch.arange(w).view(1, 1, w).expand(t, h, w))
            assert torch.equal(P[0], origin[0].expand(t, h, w))  # one temporal position per block
            # Every block's h / w origin, and the first block's t, continue the text before the grid.
            for k, (start, _) in enumerate(grid.block_spans if layout.model_type == "qwen3_vl" else
                                           grid.block_spans[:1]):
                before = int(rope[0, b, start - 1])
                assert int(P[1, k, 0, 0]) == int(P[2, k, 0, 0]) == before + 1 == int(P[0, k, 0, 0])
            temporal = P[0, :, 0, 0] - P[0, 0, 0, 0]
            if layout.model_type == "qwen2_vl":
                assert torch.equal(temporal, torch.arange(t))
            elif layout.model_type == "qwen2_5_vl":
                step = 1.0 if grid.kind == "image" else \
                    config.vision_config.tokens_per_second * float(batch["second_per_grid_ts"][grid.index])
                assert torch.equal(temporal, (torch.arange(t) * step).long())
                if grid.kind == "video":
                    assert step == 2.0  # 2 tokens per second, 2 frames per block at 2 fps
            else:  # Qwen3-VL: a block's temporal position is its first text-continuing position
                assert (temporal[1:] > temporal[:-1]).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("samples", list(SAMPLE_SETS), ids=list(SAMPLE_SETS))
def test_layout_is_where_the_model_puts_features_and_rope(kind, samples, padding_side):
    model = model_for(kind)
    batch = make_batch(kind, SAMPLE_SETS[samples], padding_side)
    layout = compute_layout(batch["input_ids"], model.config, batch["attention_mask"],
                            image_grid_thw=batch.get("image_grid_thw"), video_grid_thw=batch.get("video_grid_thw"),
                            mm_token_type_ids=batch["mm_token_type_ids"])
    assert isinstance(layout, QwenBatchLayout) and layout.model_type == kind
    merge = model.config.vision_config.spatial_merge_size

    # Positions: as reconstructed here from input_ids and the grids.
    for kind_, token_id in (("image", model.config.image_token_id), ("video", model.config.video_token_id)):
        grid_thw = batch.get(f"{kind_}_grid_thw")
        want = independent_positions(batch["input_ids"], token_id, grid_thw, merge)
        got = sorted(((b, g.index, g.positions.flatten().tolist()) for b, s in enumerate(layout.samples)
                      for g in s.grids if g.kind == kind_), key=lambda x: x[1])
        assert [(b, p) for b, _, p in got] == want
        for b, index, _ in got:
            grid = next(g for g in layout.samples[b].grids if g.kind == kind_ and g.index == index)
            t, h, w = grid_thw[index].tolist()
            assert grid.shape == (t, h // merge, w // merge) and grid.grid_thw == (t, h, w)

    # Features: each grid's positions hold its own merged features, in raster (t, h, w) order.
    embeds = language_model_embeds(model, batch)
    features = vision_features(model, batch)
    n_grids = 0
    for b, sample in enumerate(layout.samples):
        for grid in sample.grids:
            assert torch.equal(embeds[b, grid.positions.flatten()], features[grid.kind][grid.index])
            n_grids += 1
        # Every attended position is exactly one of vision / text; padding is neither.
        assert len(sample.vision) + len(sample.text) == int(batch["attention_mask"][b].sum())
        assert sorted(p for g in sample.grids for p in g.positions.flatten().tolist()) == sample.vision.tolist()
        assert not set(sample.padding.tolist()) & set(sample.vision.tolist() + sample.text.tolist())
        assert [g.start for g in sample.grids] == sorted(g.start for g in sample.grids)
    assert n_grids == sum(len(features[k]) for k in features)
    assert torch.equal(layout.vision_mask(), (batch["mm_token_type_ids"] > 0) & layout.valid_mask)

    # M-RoPE: the layout's (t, h, w) are the model's.
    assert_rope_matches(layout, batch, model)


@pytest.mark.parametrize("kind", KINDS)
def test_video_blocks_and_timestamps(kind):
    """Qwen2(.5)-VL: a video is one contiguous span of blocks. Qwen3-VL: each block is preceded by its timestamp
    text and wrapped in <|vision_start|> ... <|vision_end|>; the layout holds those real positions."""
    model = model_for(kind)
    batch = make_batch(kind, SAMPLE_SETS["videos"], "left")
    layout = layout_of_batch(batch, model.config)
    tokenizer = processor_for(kind).tokenizer
    videos = [g for s in layout.samples for g in s.videos]
    assert [g.shape for g in videos] == [(4, 2, 3), (3, 4, 4)]
    for b, sample in enumerate(layout.samples):
        for grid in sample.videos:
            spans = grid.block_spans
            h, w = grid.shape[1:]
            assert all(end - start == h * w for start, end in spans)
            assert [c.kind for c in grid.crops] == ["frame"] * grid.shape[0]
            between = [tokenizer.decode(batch["input_ids"][b, e:s]) for (_, e), (s, _) in zip(spans, spans[1:])]
            if kind == "qwen3_vl":
                assert not grid.contiguous
                assert all(re.fullmatch(r"<\|vision_end\|><\d+\.\d seconds><\|vision_start\|>", t) for t in between)
                first = tokenizer.decode(batch["input_ids"][b, spans[0][0] - 16:spans[0][0]])
                assert first.endswith("<|vision_start|><0.2 seconds><|vision_start|>")  # the outer start kept
            else:
                assert grid.contiguous and between == [""] * (len(spans) - 1)


@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_equals_each_sample_alone(kind):
    model = model_for(kind)
    for padding_side in ("left", "right"):
        batch = make_batch(kind, SAMPLE_SETS["multi"], padding_side)
        layout = layout_of_batch(batch, model.config)
        for b, parts in enumerate(SAMPLE_SETS["multi"]):
            alone = layout_of_batch(make_batch(kind, (parts,), padding_side), model.config).samples[0]
            shift = int((~layout.valid_mask[b]).sum()) if padding_side == "left" else 0
            assert [g.shape for g in layout.samples[b].grids] == [g.shape for g in alone.grids]
            for g, a in zip(layout.samples[b].grids, alone.grids):
                assert torch.equal(g.positions, a.positions + shift)
            assert torch.equal(layout.samples[b].text, alone.text + shift)
    text_only = layout.samples[1]
    assert text_only.grids == () and len(text_only.vision) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_rope_check_can_fail(kind):
    """A layout with h and w swapped (same token count) is caught by the M-RoPE comparison."""
    model = model_for(kind)
    batch = make_batch(kind, SAMPLE_SETS["videos"], "left")
    for key in ("image_grid_thw", "video_grid_thw"):
        swapped = batch[key][:, [0, 2, 1]]
        assert not torch.equal(swapped, batch[key])
        wrong = compute_qwen_layout(batch["input_ids"], model.config, batch["attention_mask"],
                                    **{"image_grid_thw": batch["image_grid_thw"],
                                       "video_grid_thw": batch["video_grid_thw"], key: swapped})
        with pytest.raises(AssertionError):
            assert_rope_matches(wrong, batch, model)


def test_errors_name_the_problem():
    model = model_for("qwen2_vl")
    config = model.config
    batch = make_batch("qwen2_vl", PAIR, "left")
    ids, mask, grids = batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"]
    first = int((ids[0] == config.image_token_id).nonzero()[0, 0])

    fewer = ids.clone()
    fewer[0, first] = ids[0, first - 1]  # one image token less
    with pytest.raises(ValueError, match=r"disagree: input_ids hold 44 image tokens.*implies \[24, 21\] = 45"):
        compute_qwen_layout(fewer, config, mask, image_grid_thw=grids)
    with pytest.raises(ValueError, match="image_grid_thw is None"):
        compute_qwen_layout(ids, config, mask)
    with pytest.raises(ValueError, match="image 0 at 7..27 touches another image token at 28"):
        compute_qwen_layout(ids, config, mask, image_grid_thw=grids.flip(0))  # 21 then 24 tokens
    with pytest.raises(ValueError, match="runs from sample 0 into sample 1"):
        compute_qwen_layout(ids, config, mask, image_grid_thw=torch.tensor([[1, 6, 30]]))  # one grid of 45
    hole = ids.clone()
    hole[0, first + 3], hole[0, first + 24] = int(ids[0, first + 24]), int(ids[0, first + 3])  # text inside
    with pytest.raises(ValueError, match="is not one run of 24 tokens"):
        compute_qwen_layout(hole, config, mask, image_grid_thw=grids)
    types = batch["mm_token_type_ids"].clone()
    types[0, first] = 0
    with pytest.raises(ValueError, match="mm_token_type_ids == 1 differs"):
        compute_qwen_layout(ids, config, mask, image_grid_thw=grids, mm_token_type_ids=types)
    with pytest.raises(ValueError, match="sides not divisible by spatial_merge_size=2"):
        compute_qwen_layout(ids, config, mask, image_grid_thw=torch.tensor([[1, 8, 12], [1, 7, 6]]))
    with pytest.raises(ValueError, match="not image_sizes"):
        compute_layout(ids, config, mask, batch["image_grid_thw"])
    masked = mask.clone()
    masked[0, first] = 0
    with pytest.raises(ValueError, match="attention mask excludes"):
        compute_qwen_layout(ids, config, masked, image_grid_thw=grids)
    # Two images with no text between them: the model's M-RoPE would read one run.
    text_id = int(ids[0, -1])
    touching = torch.tensor([[text_id] + [config.image_token_id] * 8 + [text_id]])
    with pytest.raises(ValueError, match="touches another image token at 5"):
        compute_qwen_layout(touching, config, image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]))
    with pytest.raises(TypeError, match="supports model types"):
        compute_qwen_layout(ids, config.text_config)


def test_layout_names_and_llava_concepts():
    model = model_for("qwen3_vl")
    layout = layout_of_batch(make_batch("qwen3_vl", SAMPLE_SETS["multi"], "right"), model.config)
    sample = layout.samples[0]
    assert [g.kind for g in sample.grids] == ["image", "image", "video"]
    assert [g.index for g in sample.images] == [0, 1] and [g.index for g in sample.videos] == [0]
    assert [g.shape for g in sample.grids] == [(1, 5, 5), (1, 3, 9), (2, 3, 5)]
    assert [c.kind for g in sample.grids for c in g.crops] == ["image", "image", "frame", "frame"]
    assert [c.shape for c in sample.grids[1].crops] == [(3, 9)]
    assert not layout.newline_mask.any() and len(sample.newline) == 0 and len(sample.grids[0].newline) == 0
    assert layout.has_images and layout.has_videos and layout.has_vision
    assert torch.equal(layout.vision_mask("text"), layout.image_mask | layout.video_mask)
    with pytest.raises(ValueError, match="newline_tokens"):
        layout.vision_mask("neither")


@pytest.mark.parametrize("kind", KINDS)
def test_text_after_a_video_continues_from_its_spatial_extent(kind):
    """Pins what transformers 5.23's get_rope_index does (later items of issue 12 compute M-RoPE themselves):
    text after a grid continues at the grid's origin + max(h, w) -- the temporal extent is not counted, so
    after a Qwen2(.5)-VL video whose temporal positions reach further, text positions repeat temporal ones
    (the original Qwen code continues at the max over all three axes + 1). Qwen3-VL's one-block grids agree."""
    model = model_for(kind)
    batch = make_batch(kind, SAMPLE_SETS["videos"], "right")
    layout = layout_of_batch(batch, model.config)
    rope = rope_index(model, batch)
    grid = layout.samples[0].videos[0]  # t=4 blocks of 2x3 (Qwen2.5-VL: 2 temporal positions per block)
    t, h, w = grid.shape
    origin = int(rope[0, 0, grid.start])
    last_start = grid.block_spans[-1][0]
    after = int(rope[0, 0, grid.end])  # the <|vision_end|> right after the video
    if kind == "qwen3_vl":
        assert after == int(rope[0, 0, last_start]) + max(h, w)
        assert after > int(rope[:, 0, grid.positions].max())
    else:
        assert after == origin + max(h, w)
        reach = (t - 1) * (1 if kind == "qwen2_vl" else 2)
        assert int(rope[0, 0, grid.positions].max()) == origin + reach >= after
