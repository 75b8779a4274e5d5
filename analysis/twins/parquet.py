"""Writing twin samples as Hugging Face-style parquet (the image column decodes to PIL on load)."""

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


def to_row(sample: dict) -> dict:
    """A parquet row of a sample: PNG image dict, cells as GRID strings with " " for blank."""
    row = dict(sample)
    row["image"] = {"bytes": png_bytes(sample["image"]), "path": None}
    row["cells"] = ["".join(char or " " for char in cells_row) for cells_row in sample["cells"]]
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
