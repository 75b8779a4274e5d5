"""Every fine-tuned tiny checkpoint shipped in checkpoints/ (trained by experiments/train.py) loads with its
modules, is what its training.json says it is, and reaches its recorded scores under the op or reduction it was
fine-tuned with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from analysis import twins
from analysis.training import evaluate as ev
from analysis.training.run import twin_names

ROOT = Path(__file__).resolve().parents[1]
SUBSET = 24  # eval samples per twin; the record holds the scores of exactly this subset
TOLERANCE = 1.0 / SUBSET + 1e-9  # another CPU may round a near-tie answer the other way: one sample per twin
FINETUNES = sorted(p.parent.name for p in (ROOT / "checkpoints").glob("*/training.json")
                   if json.loads(p.read_text()).get("entry") == "experiments/train.py")


def test_the_fine_tunes_are_shipped():
    assert {"tiny-llava-control", "tiny-llava-proxyv-L12", "tiny-llava-proxyv-L16", "tiny-llava-proxyv-L24",
            "tiny-llava-proxyv-L16-learned", "tiny-llava-skip_attn-L12"} <= set(FINETUNES)


@pytest.mark.parametrize("name", FINETUNES)
def test_fine_tune_is_what_it_says_and_reaches_its_scores(name):
    path = ROOT / "checkpoints" / name
    record = json.loads((path / "training.json").read_text())
    config = record["config"]
    assert sum(f.stat().st_size for f in path.iterdir()) <= 25 * 2**20  # shipped small (float16 weights)
    model, processor = ev.load_checkpoint(path)
    proxyv = getattr(model.config, "proxyv", None)
    if config["variant"] == "proxyv":
        assert proxyv["start_layer"] == config["start_layer"] and proxyv["init"] == config["proxyv"]["init"]
    else:
        assert proxyv is None
    assert next(model.parameters()).dtype == torch.float32
    names = twin_names(config)  # the twins it was trained and scored on (the NeXT models: the 128 px ones)
    scores = ev.score_twins(model, processor, n=SUBSET, context=ev.trained_context(model, record), names=names)
    recorded = record[f"eval_n{SUBSET}"]
    for twin in names or twins.TWINS:
        assert abs(scores[twin] - recorded[twin]) <= TOLERANCE, (twin, scores[twin], recorded[twin])
