"""A video as a Qwen-VL processor takes it: frames decoded from a file, sampled like Qwen's own evaluation.

lmms-eval's video tasks hand the model a video *file path* (``doc_to_visual`` -> ``[".../clip.mp4"]``). The
plugin decodes it here with PyAV and passes the frames to the processor with ``do_sample_frames=False`` and the
:class:`~transformers.video_utils.VideoMetadata` of the sampled frames (source fps, total frames, sampled indices),
so that the processor's own time bookkeeping -- Qwen2.5-VL's ``second_per_grid_ts`` (temporal M-RoPE step),
Qwen3-VL's ``<t seconds>`` text before each temporal block -- describes the frames actually used.

Sampling (:func:`frame_count`, :func:`sample_indices`) follows ``qwen_vl_utils.smart_nframes``, the rule the
Qwen-VL models of lmms-eval use: ``fps`` frames per second of video, at least 4, at most ``max_num_frames`` (and
never more than the video has), rounded down to a multiple of the temporal patch (2 frames), at evenly spaced
indices ``round(linspace(0, total - 1, n))``. lmms-eval's Qwen2.5-VL class then subsamples to its
``max_num_frames`` (32) with the last frame forced in; here the cap is part of the one rule (an even count, no
forced frame), so every temporal block holds two real frames.

Only the sampled frames are kept while decoding: an hour of video is read without holding it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FRAME_FACTOR = 2  # frames per temporal patch of every Qwen-VL tower
MIN_FRAMES = 4  # qwen_vl_utils' FPS_MIN_FRAMES
DEFAULT_FPS = 2.0  # qwen_vl_utils' FPS and lmms-eval's default
DEFAULT_MAX_FRAMES = 32  # lmms-eval's Qwen2.5-VL max_num_frames


@dataclass(frozen=True)
class Video:
    """Sampled frames ``(T, H, W, 3)`` uint8 RGB and what the processor needs to know of them."""

    frames: np.ndarray
    source_fps: float
    total_frames: int
    indices: tuple[int, ...]
    path: str = ""

    def metadata(self):
        """The frames' :class:`~transformers.video_utils.VideoMetadata` (``sampled_fps`` and ``timestamps``
        follow from it)."""
        from transformers.video_utils import VideoMetadata

        height, width = self.frames.shape[1:3]
        return VideoMetadata(total_num_frames=self.total_frames, fps=self.source_fps, width=width, height=height,
                             duration=self.total_frames / self.source_fps, video_backend="pyav",
                             frames_indices=list(self.indices))

    def blanked(self) -> Video:
        """The same clip with every frame replaced by :func:`~analysis.twins.blind.blank_image` of it (the blind
        control): the same number of frames, sizes and timestamps, nothing to read."""
        from PIL import Image

        from .twins.blind import blank_image

        frames = np.stack([np.asarray(blank_image(Image.fromarray(frame))) for frame in self.frames])
        return Video(frames, self.source_fps, self.total_frames, self.indices, self.path)


def check_sampling(fps: float, max_num_frames: int) -> None:
    """One line for sampling settings that cannot work: ``fps`` > 0, ``max_num_frames`` >= one temporal patch."""
    if not fps > 0 or max_num_frames < FRAME_FACTOR:
        raise ValueError(f"video sampling needs fps > 0 and max_num_frames >= {FRAME_FACTOR}; got fps={fps}, "
                         f"max_num_frames={max_num_frames}")


def frame_count(total: int, source_fps: float, fps: float = DEFAULT_FPS,
                max_num_frames: int = DEFAULT_MAX_FRAMES) -> int:
    """How many frames to sample from a video of ``total`` frames at ``source_fps`` (see the module docstring)."""
    check_sampling(fps, max_num_frames)
    if total < FRAME_FACTOR:
        raise ValueError(f"a video needs at least {FRAME_FACTOR} frames (one temporal patch); this one has {total}")
    wanted = total / source_fps * fps
    floor = -(-MIN_FRAMES // FRAME_FACTOR) * FRAME_FACTOR
    ceiling = min(max_num_frames, total) // FRAME_FACTOR * FRAME_FACTOR
    n = min(max(wanted, floor), ceiling)
    return max(int(n // FRAME_FACTOR) * FRAME_FACTOR, FRAME_FACTOR)


def sample_indices(total: int, n: int) -> tuple[int, ...]:
    """``n`` evenly spaced frame indices over ``0 .. total-1`` (rounded, as ``qwen_vl_utils``)."""
    return tuple(int(i) for i in np.round(np.linspace(0, total - 1, n)))


def _open(path: Path):
    import av

    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as error:
        raise ValueError(f"cannot decode video {path}: {error}") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path} has no video stream")
    return container


def _count_frames(path: Path, stream) -> int:
    """Frames in the first video stream (``stream``, of an open container of ``path``): the container's count, else
    one demux pass (no decoding) in a container of its own, so that ``stream`` is left unread."""
    if stream.frames:
        return int(stream.frames)
    with _open(path) as container:
        counted = container.streams.video[0]
        return sum(1 for packet in container.demux(counted) if packet.size)


def read_video(path, fps: float = DEFAULT_FPS, max_num_frames: int = DEFAULT_MAX_FRAMES) -> Video:
    """Decode the frames of ``path`` that :func:`frame_count` / :func:`sample_indices` choose, as RGB."""
    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        total = _count_frames(path, stream)
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise ValueError(f"{path}: the video stream states no frame rate")
        source_fps = float(rate)
        indices = sample_indices(total, frame_count(total, source_fps, fps, max_num_frames))
        wanted = set(indices)  # distinct: n <= total frames
        stream.thread_type = "AUTO"
        frames = []
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
            if i >= indices[-1]:
                break
    if len(frames) != len(indices):
        raise ValueError(f"{path}: decoded {len(frames)} of the {len(indices)} frames sampled from {total} "
                         "(the container's frame count disagrees with its stream)")
    return Video(np.stack(frames), source_fps, total, indices, str(path))
