"""Writing twin samples as Hugging Face-style parquet (the image column decodes to PIL on load; a video twin's
rows name .mp4 files written beside the parquet, as lmms-eval's video tasks name theirs)."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import pyarrow.parquet as pq


def png_bytes(image) -> bytes:
    """The image encoded as PNG (deterministic for equal pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def cell_rows(cells: list[list[str]]) -> list[str]:
    """A lattice as one string per row, " " for a blank cell."""
    return ["".join(char or " " for char in cells_row) for cells_row in cells]


def to_row(sample: dict) -> dict:
    """A parquet row of a sample: PNG image dict, cells as GRID strings with " " for blank."""
    row = dict(sample)
    row["image"] = {"bytes": png_bytes(sample["image"]), "path": None}
    row["cells"] = cell_rows(sample["cells"])
    return row


def write_parquet(samples: list[dict], path: Path) -> Path:
    """Write ``samples`` to ``path`` with an ``Image`` feature, so ``load_dataset("parquet")``
    and lmms-eval give PIL images back."""
    dataset = datasets.Dataset.from_list([to_row(s) for s in samples])
    dataset = dataset.cast_column("image", datasets.Image())
    path.parent.mkdir(parents=True, exist_ok=True)
    # The arrow table's schema metadata carries the HF features (Image); no progress bar.
    pq.write_table(dataset.data.table, path)
    return path


def write_video_parquet(samples: list[dict], path: Path, videos: str = "videos") -> Path:
    """Write each video sample's frames to ``path.parent/videos/<id>.mp4`` (lossless, at its fps), then ``path``,
    whose rows hold ``video`` (that file's path relative to ``path.parent``), the sample's other fields, and
    ``block_cells`` as GRID strings per block. The parquet comes last: where it exists, its videos do."""
    from analysis.twins.mp4 import write_mp4

    rows = []
    for sample in samples:
        video = f"{videos}/{sample['id']}.mp4"
        write_mp4(sample["frames"], path.parent / video, sample["fps"])
        row = {"id": sample["id"], "video": video, **{key: value for key, value in sample.items() if key != "frames"}}
        rows.append({**row, "block_cells": [cell_rows(cells) for cells in sample["block_cells"]]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(datasets.Dataset.from_list(rows).data.table, path)
    return path
