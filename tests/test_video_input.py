"""Videos through the lmms-eval plugin (issue 12, item 4): a video file is decoded and sampled as Qwen's evaluation
samples it (``analysis/video_input.py``), and the plugin's batch equals the one the HF processor builds from the same
frames with metadata written here (Qwen2.5-VL's ``second_per_grid_ts``, Qwen3-VL's timestamps computed in the test);
visuals keep their order; generation under an operator equals ``model.generate`` of that reference batch; the blind
control blanks every frame; a LLaVA checkpoint refuses videos in one line (and ends lmms-eval's CLI in one line)."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from PIL import Image

from analysis import tiny, tiny_qwen
from analysis.ablation import ablate
from analysis.lmms_model import LlavaAblate
from analysis.video_input import Video, frame_count, read_video, sample_indices

pytestmark = pytest.mark.usefixtures("one_thread")


def write_video(path, frames: np.ndarray, rate: int) -> str:
    """``frames`` (T, H, W, 3) uint8 as lossless H.264 RGB at ``rate`` frames per second."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt, stream.options = "rgb24", {"crf": "0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


class Request:  # what lmms-eval hands a simple model: an object with .args
    def __init__(self, *args):
        self.args = args


def clip(seed: int, frames: int, height: int = 40, width: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- sampling and decoding

@pytest.mark.parametrize("total, source_fps, fps, cap, expected", [
    (300, 30, 2.0, 32, 20),     # 10 s at 2 fps
    (3000, 30, 2.0, 32, 32),    # 100 s: capped
    (3000, 30, 2.0, 768, 200),  # qwen_vl_utils' own cap
    (9, 2, 2.0, 32, 8),         # every frame but one: an even count
    (10, 30, 2.0, 32, 4),       # a third of a second: at least 4 frames
    (3, 30, 2.0, 32, 2),        # never more frames than the video has
    (61, 30, 1.0, 32, 4),       # 2 s at 1 fps = 2, raised to the minimum 4
    (240, 24, 0.5, 7, 4),       # 10 s at 0.5 fps = 5 -> 4 (even)
])
def test_frame_count(total, source_fps, fps, cap, expected):
    assert frame_count(total, source_fps, fps, cap) == expected


def test_sample_indices_and_bad_settings():
    assert sample_indices(9, 8) == (0, 1, 2, 3, 5, 6, 7, 8)
    assert sample_indices(300, 4) == (0, 100, 199, 299)
    for bad in ((1, 30, 2.0, 32), (100, 30, 0.0, 32), (100, 30, 2.0, 1)):
        with pytest.raises(ValueError):
            frame_count(*bad)


def test_read_video_decodes_the_sampled_frames_exactly(tmp_path):
    frames = clip(0, 61)
    path = write_video(tmp_path / "a.mp4", frames, rate=30)
    video = read_video(path, fps=2.0, max_num_frames=32)
    indices = [int(i) for i in np.round(np.linspace(0, 60, 4))]  # 61 frames at 30 fps, 2 fps -> 4 frames
    assert video.indices == tuple(indices) and video.total_frames == 61 and video.source_fps == 30
    assert np.array_equal(video.frames, frames[indices])
    metadata = video.metadata()
    assert metadata.sampled_fps == pytest.approx(4 / 61 * 30) and metadata.timestamps == [i / 30 for i in indices]
    every = read_video(path, fps=30.0, max_num_frames=64)  # 61 wanted -> 60 (even), spread over all 61
    assert np.array_equal(every.frames, frames[np.round(np.linspace(0, 60, 60)).astype(int)])
    blank = video.blanked().frames
    assert blank.shape == video.frames.shape and all((f == f[0, 0]).all() for f in blank)


def test_read_video_counts_frames_a_container_does_not_state(tmp_path):
    """Matroska states no frame count: one demux pass counts them, and the decode still starts at frame 0."""
    frames = clip(1, 23)
    path = write_video(tmp_path / "a.mkv", frames, rate=30)
    with av.open(path) as container:
        assert container.streams.video[0].frames == 0
    video = read_video(path, fps=30.0, max_num_frames=32)  # 23 wanted -> 22 (even), spread over all 23
    indices = [int(i) for i in np.round(np.linspace(0, 22, 22))]
    assert video.total_frames == 23 and video.indices == tuple(indices)
    assert np.array_equal(video.frames, frames[indices])
    with pytest.raises(FileNotFoundError, match="video file not found: .*missing.mp4"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(ValueError, match="cannot decode video .*text.mp4"):
        read_video(tmp_path / "text.mp4")


# ----------------------------------------------------------------------------- the plugin

@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("videos")
    return {name: (write_video(folder / f"{name}.mp4", clip(seed, n), rate), clip(seed, n))
            for name, seed, n, rate in (("short", 1, 9, 2), ("long", 2, 45, 10))}


def reference_batch(processor, kind: str, text: str, parts: list):
    """The processor's batch for one prompt whose ``parts`` are ("image", PIL) / ("video", frames, indices, fps)."""
    from transformers.video_utils import VideoMetadata

    content = [{"type": part[0]} for part in parts] + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = [part[1] for part in parts if part[0] == "image"]
    clips = [part for part in parts if part[0] == "video"]
    kwargs = {}
    if clips:
        kwargs = {"videos": [frames[list(idx)] for _, frames, idx, _ in clips], "do_sample_frames": False,
                  "video_metadata": [VideoMetadata(total_num_frames=len(frames), fps=fps, frames_indices=list(idx))
                                     for _, frames, idx, fps in clips]}
    return processor(text=[prompt], images=images or None, return_tensors="pt", padding=True, **kwargs)


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_plugin_batch_equals_the_processors_on_the_same_frames(kind, videos, tmp_path):
    path = tiny_qwen.save_checkpoint(tmp_path / kind, kind, seed=0)
    lm = LlavaAblate(str(path), op="skip_attn_ffn", start_layer=1, batch_size=2, progress=False, max_new_tokens=4,
                     fps=2.0, max_num_frames=16)
    picture = Image.fromarray(clip(3, 1, 48, 40)[0])
    short, long = videos["short"], videos["long"]
    doc = [picture, long[0], short[0]]  # an image, a 4.5 s clip at 10 fps, a 4.5 s clip at 2 fps
    visuals = lm._visuals(lambda d: d, doc)
    assert [type(v) for v in visuals] == [Image.Image, Video, Video]
    long_idx = sample_indices(45, 8)  # 4.5 s at 2 fps = 9 -> 8 frames
    short_idx = sample_indices(9, 8)
    assert visuals[1].indices == long_idx and visuals[2].indices == short_idx
    batch = lm.encode([lm._prompt("Which characters?", visuals)], [visuals])
    expected = reference_batch(lm.processor, kind, "Which characters?",
                               [("image", picture), ("video", long[1], long_idx, 10.0), ("video", short[1], short_idx, 2.0)])
    assert set(batch) == set(expected)
    for key in expected:
        assert torch.equal(batch[key].cpu(), torch.as_tensor(expected[key])), key
    ids = batch["input_ids"][0].tolist()
    config = lm.model.config
    first_video = ids.index(config.video_token_id)
    assert ids.index(config.image_token_id) < first_video  # the image's pads first, as in the doc
    if kind == "qwen2_5_vl":  # the temporal M-RoPE step of each video: 2 frames / its sampled fps
        assert batch["second_per_grid_ts"].tolist() == pytest.approx([2 / (8 / 45 * 10), 2 / (8 / 9 * 2)])
    else:  # Qwen3-VL dates each temporal block: the mean time of its two frames
        text = lm.processor.tokenizer.decode(batch["input_ids"][0])
        for idx, fps in ((long_idx, 10.0), (short_idx, 2.0)):
            stamps = [f"<{(idx[i] + idx[i + 1]) / 2 / fps:.1f} seconds>" for i in range(0, len(idx), 2)]
            position = 0
            for stamp in stamps:  # in order
                position = text.index(stamp, position) + 1
    # the video first, then the image: the pads follow the doc's order
    swapped = lm._visuals(lambda d: d, [short[0], picture])
    ids = lm.encode([lm._prompt("Q", swapped)], [swapped])["input_ids"][0].tolist()
    assert ids.index(config.video_token_id) < ids.index(config.image_token_id)

    # generation under the operator == model.generate of the reference batch under the same operator
    lm.task_dict = {"t": {"eval": [doc, [short[0]]]}}
    gen = {"max_new_tokens": 4, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    requests = [Request(f"Question {i}", dict(gen), lambda d: d, i, "t", "eval") for i in range(2)]
    answers = lm.generate_until(requests)
    reference = reference_batch(lm.processor, kind, "Question 0",
                                [("image", picture), ("video", long[1], long_idx, 10.0),
                                 ("video", short[1], short_idx, 2.0)])
    with ablate(lm.model, "skip_attn_ffn", start_layer=1):
        out = lm.model.generate(**reference, max_new_tokens=4, do_sample=False,
                                pad_token_id=lm.processor.tokenizer.pad_token_id)
    assert answers[0] == lm.processor.batch_decode(out[:, reference["input_ids"].shape[1]:],
                                                   skip_special_tokens=True)[0]
    shapes = lm.prompt_shapes[-2:]  # FLOPs bookkeeping: every video grid recorded, its tokens counted as vision
    merge = config.vision_config.spatial_merge_size
    for shape in shapes:
        assert shape["vision"] == sum(t * h * w // merge**2 for t, h, w in shape["vision_grids"])
    assert sorted(len(s["vision_grids"]) for s in shapes) == [1, 3]
    assert all(t == 4 for s in shapes for (t, _, _) in s["vision_grids"][-1:])  # 8 frames = 4 temporal blocks


def test_blind_blanks_every_frame(videos, tmp_path):
    path = tiny_qwen.save_checkpoint(tmp_path / "q", "qwen2_5_vl", seed=0)
    lm = LlavaAblate(str(path), blind=True, progress=False)
    (video,) = lm._visuals(lambda d: d, [videos["short"][0]])
    assert video.frames.shape == (8, 40, 56, 3) and all((f == f[0, 0]).all() for f in video.frames)


def test_a_task_that_exits_on_a_missing_video_is_one_recordable_error(tmp_path):
    """lmms-eval's video tasks sys.exit() from doc_to_visual when a video is missing (Video-MME: "video path:...
    does not exist, please check"): the plugin turns it into an error the runner records (the sweep goes on),
    and under lmms-eval's CLI into its one line and a non-zero exit."""
    import sys

    path = tiny_qwen.save_checkpoint(tmp_path / "q", "qwen2_5_vl", seed=0)
    lm = LlavaAblate(str(path), progress=False)

    def missing(doc):
        sys.exit(f"video path:{doc} does not exist, please check")

    with pytest.raises(FileNotFoundError, match="^the task's doc_to_visual stopped: video path:/no/such.mp4 does not"):
        lm._visuals(missing, "/no/such.mp4")
    lm.task_dict = {"t": {"eval": ["/no/such.mp4"]}}
    lm.cli = True
    with pytest.raises(SystemExit, match="^llava_ablate: the task's doc_to_visual stopped: video path:/no/such.mp4"):
        lm.generate_until([Request("Q", {"max_new_tokens": 2}, missing, 0, "t", "eval")])


def test_llava_refuses_videos_in_one_line(videos):
    model = tiny.build_model("llava", "llama", image_size=64, patch_size=8, num_layers=2, hidden_size=32,
                             num_heads=2, intermediate_size=64)
    lm = LlavaAblate(model=model, processor=tiny.build_processor("llava", image_size=64, patch_size=8),
                     progress=False)
    lm.task_dict = {"t": {"eval": [[videos["short"][0]]]}}
    request = Request("Q", {"max_new_tokens": 2}, lambda d: d, 0, "t", "eval")
    with pytest.raises(ValueError, match="^this task gives videos .*; llava checkpoints take images only"):
        lm.generate_until([request])
    lm.cli = True  # as lmms-eval's CLI builds it: one line and a non-zero exit instead of its traceback and exit 0
    with pytest.raises(SystemExit, match="^llava_ablate: this task gives videos"):
        lm.generate_until([request])
    with pytest.raises(ValueError, match="video sampling needs fps > 0"):
        LlavaAblate(model=model, processor=tiny.build_processor("llava", image_size=64, patch_size=8), fps=0)
