"""Writing a twin's clip as a lossless H.264 .mp4 (what lmms-eval's video tasks hand a model: a file path).

Lossless, so that what a reader decodes is exactly what was drawn and the recorded cells stay the truth:
``libx264rgb`` codes the RGB planes themselves (no YUV conversion, no 4:2:0 chroma subsampling) and ``crf 0`` is
x264's lossless mode; PyAV decodes it back bit-exact (tests/test_twin_video.py). Same frames, same bytes.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image

CODEC = "libx264rgb"


def write_mp4(frames: list[Image.Image], path: str | Path, fps: int) -> Path:
    """Write ``frames`` (PIL RGB, all one size) to ``path`` as a lossless H.264 RGB .mp4 at ``fps``; returns
    the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = frames[0].size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODEC, rate=fps, options={"crf": "0"})
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        for frame in frames:
            pixels = np.asarray(frame.convert("RGB"))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path
