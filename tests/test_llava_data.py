"""LLaVA conversation data (analysis/training/llava_data.py): labels exactly on the assistant turns, multi-turn,
AnyRes, collate + a real forward, bad records, and the twins export round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from analysis import tiny, twins
from analysis.training.llava_data import IGNORE, LlavaConversations, collate, export_twins, load_records

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "tiny-llava"


def processor(name: str):
    if name == "checkpoint":
        return AutoProcessor.from_pretrained(CHECKPOINT)
    p = tiny.build_processor(name)
    if p.chat_template is None:
        p.chat_template = tiny.CHAT_TEMPLATE
    return p


def save_image(folder: Path, name: str, height: int, width: int, seed: int) -> str:
    pixels = np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / name)
    return name


def turns(*pairs):
    out = []
    for human, gpt in pairs:
        out += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return out


def good_records(folder: Path, sizes=((32, 32), (40, 56), (24, 70))) -> list[dict]:
    """Single- and multi-turn records, an image tag after the text, two images, and a text-only record."""
    a, b, c = (save_image(folder, f"im{k}.png", h, w, k) for k, (h, w) in enumerate(sizes))
    return [
        {"id": "one", "image": a, "conversations": turns(("<image>\nWhat is written?", "AB12"))},
        {"id": "two", "image": b, "conversations": turns(("<image>\nColour?", "red"), ("And the shape?", "a square"))},
        {"id": "three", "image": [c], "conversations": turns(("Look.\n<image>", "ok"), ("Count them.", "7"),
                                                              ("Sure?", "yes, 7"))},
        {"id": "pair", "image": [a, c], "conversations": turns(("<image>\nFirst?", "x"), ("<image>\nSecond?", "y z"))},
        {"id": "text", "conversations": turns(("No picture here.", "fine"))},
    ]


def answers(record):
    return [t["value"] for t in record["conversations"] if t["from"] == "gpt"]


def labelled_runs(labels: torch.Tensor) -> list[list[int]]:
    runs, current = [], []
    for token in labels.tolist() + [IGNORE]:
        if token != IGNORE:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs


def image_tokens_per_image(p, kind: str, height: int, width: int) -> int:
    """Independent count: CLIP patches (CLS dropped); NeXT adds the AnyRes crops' grid with a newline per row
    (the test sizes match a pinpoint exactly, so nothing is unpadded)."""
    side = p.image_processor.crop_size["height"] // p.patch_size
    if kind == "llava":
        return side * side
    crop = p.image_processor.crop_size
    rows, cols = height // crop["height"] * side, width // crop["width"] * side
    return side * side + rows * cols + rows


@pytest.mark.parametrize("name", ["llava", "checkpoint", "llava_next"])
def test_labels_exactly_on_every_assistant_turn(tmp_path, name):
    p = processor(name)
    records = good_records(tmp_path)
    data = LlavaConversations(records, tmp_path, p)
    assert len(data) == len(records) and not data.skipped
    image_id = p.tokenizer.convert_tokens_to_ids("<image>")
    for k, record in enumerate(records):
        item = data[k]
        ids, labels = item["input_ids"], item["labels"]
        assert ids.dim() == labels.dim() == 1 and item["attention_mask"].tolist() == [1] * len(ids)
        labelled = labels != IGNORE
        assert torch.equal(labels[labelled], ids[labelled])
        # the tiny template: "ASSISTANT: {answer}</s>" after the generation prompt "ASSISTANT:"
        assert [p.decode(run) for run in labelled_runs(labels)] == [f" {a}</s>" for a in answers(record)]
        assert (labels[ids == image_id] == IGNORE).all()
        assert (labels[:3] == IGNORE).all()  # BOS and "USER" never labelled
        n_images = len(record.get("image", [])) if isinstance(record.get("image"), list) else int("image" in record)
        assert ("pixel_values" in item) == (n_images > 0)
        if n_images:  # the images, in the record's order, as the image processor alone gives them
            paths = record["image"] if isinstance(record["image"], list) else [record["image"]]
            alone = p.image_processor([Image.open(tmp_path / f).convert("RGB") for f in paths], return_tensors="pt")
            assert torch.equal(item["pixel_values"], alone["pixel_values"])
            if name == "llava_next":
                assert torch.equal(item["image_sizes"], alone["image_sizes"])
        if name != "llava_next":
            expected = n_images * image_tokens_per_image(p, "llava", 0, 0)
            assert int((ids == image_id).sum()) == expected
        text = p.decode(ids[ids != image_id])
        assert "<image>" not in text and all(t["value"].replace("<image>", "").strip()[:4] in text
                                             for t in record["conversations"])


def test_next_anyres_two_sizes(tmp_path):
    p = processor("llava_next")
    crop = p.image_processor.crop_size["height"]
    sizes = [(crop, 2 * crop), (2 * crop, 2 * crop)]  # two pinpoints: 1x2 and 2x2 crops
    records = [{"id": f"s{k}", "image": save_image(tmp_path, f"s{k}.png", h, w, k),
                "conversations": turns(("<image>\nWhat?", "it"))} for k, (h, w) in enumerate(sizes)]
    data = LlavaConversations(records, tmp_path, p)
    image_id = p.tokenizer.convert_tokens_to_ids("<image>")
    counts = []
    for k, (h, w) in enumerate(sizes):
        item = data[k]
        assert item["pixel_values"].dim() == 5 and item["image_sizes"].tolist() == [[h, w]]
        counts.append(int((item["input_ids"] == image_id).sum()))
        assert counts[-1] == image_tokens_per_image(p, "llava_next", h, w)
    assert counts[0] != counts[1]
    batch = collate([data[0], data[1]], p.tokenizer.pad_token_id)
    assert batch["image_sizes"].tolist() == [list(s) for s in sizes] and batch["pixel_values"].shape[0] == 2


def token_nll(model, item) -> tuple[float, int]:
    """Sum and count of the next-token NLL on the labelled tokens, from an unpadded single-sample forward."""
    single = {k: v.unsqueeze(0) if k in ("input_ids", "attention_mask", "labels") else v for k, v in item.items()}
    with torch.no_grad():
        out = model(**single)
    logits, labels = out.logits[0, :-1].double(), item["labels"][1:]
    keep = labels != IGNORE
    nll = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
    assert torch.allclose(out.loss.double(), nll / keep.sum(), atol=1e-5)  # HF's loss on the single sample
    return float(nll), int(keep.sum())


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_collate_and_a_real_forward(tmp_path, kind):
    torch.manual_seed(0)
    p = processor(kind)
    crop = p.image_processor.crop_size["height"]
    sizes = ((crop, crop), (crop, 2 * crop), (2 * crop, crop)) if kind == "llava_next" else ((32, 32), (40, 56),
                                                                                             (24, 70))
    data = LlavaConversations(good_records(tmp_path, sizes), tmp_path, p)
    items = [data[k] for k in range(len(data))]
    model = tiny.build_model(kind, seed=0)
    pad = p.tokenizer.pad_token_id
    batch = collate(items, pad)
    width = max(len(i["input_ids"]) for i in items)
    assert batch["input_ids"].shape == batch["labels"].shape == (len(items), width)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert (batch["input_ids"][row, n:] == pad).all()
        assert (batch["labels"][row, n:] == IGNORE).all() and (batch["attention_mask"][row, n:] == 0).all()
    left = collate(items, pad, padding_side="left")
    assert all(torch.equal(left["labels"][r, width - len(i["labels"]):], i["labels"]) for r, i in enumerate(items))
    assert sum(i["pixel_values"].shape[0] for i in items if "pixel_values" in i) == batch["pixel_values"].shape[0]
    with torch.no_grad():
        loss = model(**batch).loss
    sums, counts = zip(*(token_nll(model, item) for item in items))
    assert torch.isfinite(loss)
    # HF averages over every labelled token of the batch: the token-weighted mean of the per-sample losses
    assert abs(float(loss) - sum(sums) / sum(counts)) < 1e-4


def bad_records(folder: Path) -> tuple[list[dict], dict[str, str]]:
    good = good_records(folder)
    (folder / "broken.png").write_bytes(b"not a png at all")
    long_question = "<image>\n" + "very long question " * 40
    bad = {
        "missing": ("missing_image", {"image": "nowhere.png", "conversations": turns(("<image>\nQ?", "a"))}),
        "broken": ("unreadable_image", {"image": "broken.png", "conversations": turns(("<image>\nQ?", "a"))}),
        "notag": ("no_image_tag", {"image": "im0.png", "conversations": turns(("Q?", "a"))}),
        "twotags": ("image_tag_count", {"image": "im0.png", "conversations": turns(("<image>\n<image>\nQ?", "a"))}),
        "tag_no_image": ("image_tag_count", {"conversations": turns(("<image>\nQ?", "a"))}),
        "tag_answer": ("image_tag_in_answer", {"image": "im0.png",
                                               "conversations": turns(("<image>\nQ?", "see <image>"))}),
        "empty": ("empty_answer", {"image": "im0.png", "conversations": turns(("<image>\nQ?", "a"), ("More?", "  "))}),
        "long": ("too_long", {"image": "im0.png", "conversations": turns((long_question, "a"))}),
    }
    records = list(good)
    for k, (rid, (_, record)) in enumerate(bad.items()):
        records.insert(2 * k % len(records), {"id": rid, **record})
    return records, {rid: reason for rid, (reason, _) in bad.items()}


def test_bad_records_are_skipped_and_counted(tmp_path):
    p = processor("llava")
    records, reasons = bad_records(tmp_path)
    good = [r for r in records if r["id"] not in reasons]
    max_length = max(LlavaConversations(good, tmp_path, p).lengths)
    data = LlavaConversations(records, tmp_path, p, max_length=max_length)
    expected = {}
    for reason in reasons.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(data.skipped) == expected
    assert data.skipped_ids == [r["id"] for r in records if r["id"] in reasons]
    assert data.ids == [r["id"] for r in good] and len(data) == len(good)
    for k, record in enumerate(good):
        assert [p.decode(run) for run in labelled_runs(data[k]["labels"])] == [f" {a}</s>" for a in answers(record)]


def test_bad_records_with_on_bad_error_give_one_line(tmp_path):
    p = processor("llava")
    records, reasons = bad_records(tmp_path)
    by_id = {r["id"]: r for r in records}
    max_length = LlavaConversations([by_id["one"]], tmp_path, p).lengths[0]
    for rid, reason in reasons.items():
        with pytest.raises(ValueError) as err:
            LlavaConversations([by_id["one"], by_id[rid]], tmp_path, p, max_length=max_length, on_bad="error")
        message = str(err.value)
        assert "\n" not in message and repr(rid) in message and reason in message and "fix" in message
    with pytest.raises(ValueError, match="on_bad"):
        LlavaConversations(records, tmp_path, p, on_bad="ignore")
    p = tiny.build_processor("llava")
    p.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        LlavaConversations(records, tmp_path, p)


def test_a_tokenisation_that_breaks_prefixes_raises(tmp_path):
    """A template whose generation prompt is not how the assistant turn starts: labels cannot be placed."""
    p = processor("llava")
    p.chat_template = tiny.CHAT_TEMPLATE.replace("{% if add_generation_prompt %}ASSISTANT:",
                                                 "{% if add_generation_prompt %}ASSISTANT:>")
    records = good_records(tmp_path)[:1]
    with pytest.raises(ValueError, match=r"record 'one': the prompt before assistant turn 0 does not tokenise"):
        LlavaConversations(records, tmp_path, p)


MALFORMED = {
    "not a list": ({"id": "x"}, "not a list"),
    "no conversations": ([{"id": "x", "image": "a.png"}], "no 'conversations'"),
    "unknown role": ([{"id": "x", "conversations": [{"from": "system", "value": "hi"}]}], "'system'"),
    "gpt first": ([{"id": "x", "conversations": turns(("a", "b"))[::-1]}], "alternate"),
    "two humans": ([{"id": "x", "conversations": [{"from": "human", "value": "a"}] * 2}], "alternate"),
    "no answer": ([{"id": "x", "conversations": turns(("a", "b")) + [{"from": "human", "value": "c"}]}], "ends with"),
    "image not a path": ([{"id": "x", "image": 3, "conversations": turns(("a", "b"))}], "'image'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_give_one_line(tmp_path, case):
    content, expected = MALFORMED[case]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as err:
        load_records(path)
    assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def direct_batching(p, sample):
    """How the tiny model's first (hand-written) training loop built a sample, written out here as the reference:
    the evaluation prompt (chat template + generation prompt) with the image, then " answer</s>", labels on the
    answer only."""
    prompt_text = p.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["question"]}]}],
        add_generation_prompt=True)
    prompt = p(images=[sample["image"]], text=[prompt_text], return_tensors="pt")
    answer = p.tokenizer.encode(" " + sample["answer"], add_special_tokens=False) + [p.tokenizer.eos_token_id]
    ids = prompt["input_ids"][0].tolist() + answer
    labels = [-100] * prompt["input_ids"].shape[1] + answer
    return torch.tensor(ids), torch.tensor(labels), prompt["pixel_values"]


def test_export_round_trip_matches_the_direct_batching(tmp_path):
    out = tmp_path / "twins"
    n = 2
    subprocess.run([sys.executable, str(REPO / "experiments" / "export_twins.py"), "--out", str(out), "--n", str(n),
                    "--split", "train", "--seed", "5"], cwd=REPO, check=True, capture_output=True)
    records = load_records(out / "train.json")
    p = processor("checkpoint")
    data = LlavaConversations(records, out, p)
    samples = [twins.generate(name, "train", n, 5)[i] for i in range(n) for name in twins.TWINS]
    assert len(data) == len(samples) == n * len(twins.TWINS) and not data.skipped
    assert data.ids == [s["id"] for s in samples]
    for k, sample in enumerate(samples):
        item = data[k]
        assert [p.decode(run) for run in labelled_runs(item["labels"])] == [f" {sample['answer']}</s>"]
        ids, labels, pixels = direct_batching(p, sample)
        assert torch.equal(item["input_ids"], ids) and torch.equal(item["labels"], labels)
        assert torch.equal(item["pixel_values"], pixels)
    again = export_twins(tmp_path / "again", n, "train", 5)
    assert again.read_bytes() == (out / "train.json").read_bytes()
