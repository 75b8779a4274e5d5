"""Model configs to count without weights: a config.json path, or a name shipped in ``analysis/configs``."""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def shipped_configs() -> list[str]:
    """Names of the checkpoint configs shipped in ``analysis/configs`` (usable as ``--config NAME``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(path_or_name: str | Path):
    """A HF config object from a config.json path or a shipped name (e.g. ``"llava-1.5-7b"``)."""
    from transformers import AutoConfig

    path = Path(path_or_name)
    if not path.is_file():
        shipped = CONFIG_DIR / f"{path_or_name}.json"
        if not shipped.is_file():
            raise ValueError(f"--config {path_or_name!r} is neither a file nor a shipped config; "
                             f"shipped: {', '.join(shipped_configs())}")
        path = shipped
    data = json.loads(path.read_text())
    if "model_type" not in data:
        raise ValueError(f"{path} has no model_type; is it a HF config.json?")
    return AutoConfig.for_model(**data)
