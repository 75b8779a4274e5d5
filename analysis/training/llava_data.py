"""LLaVA's conversation JSON as a training ``Dataset``: labels exactly on the assistant turns.

The format is the one LLaVA's own training reads (``llava_v1_5_mix665k.json``)::

    [{"id": "000000033471",
      "image": "coco/train2017/000000033471.jpg",          # str, list of str, or absent (text only)
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "The bus is white and red."},
                        {"from": "human", "value": "What feature can be seen on the back?"},
                        {"from": "gpt", "value": "An advertisement."}]}]

Every item is rendered by the model's own processor and chat template (``processor.apply_chat_template``)
with the images in the conversation, so the image-token expansion (fixed for LLaVA-1.5, per image size
for LLaVA-NeXT's AnyRes) is the processor's. The labelled spans are found by rendering the conversation
prefix by prefix: the tokens that ``messages[:i+1]`` adds to ``messages[:i]`` + generation prompt are the
answer of assistant turn ``i`` and whatever the template closes the turn with (``</s>`` in LLaVA-1.5's).
Every prefix must tokenise as a prefix of the next; if a tokenizer breaks that, the dataset raises instead
of placing a label on a wrong token.

    records = load_records("llava_v1_5_mix665k.json")
    data = LlavaConversations(records, "playground/data", processor, max_length=2048)
    print(len(data), data.skipped)                          # Counter({'missing_image': 12, ...})
    loader = DataLoader(data, batch_size=4, collate_fn=partial(collate, pad_token_id=tok.pad_token_id))

``export_twins`` writes the synthetic twins in this format (``experiments/export_twins.py``).
"""

from __future__ import annotations

import collections
import os
import json
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

IGNORE = -100
IMAGE_TAG = "<image>"
ROLES = {"human": "user", "gpt": "assistant"}

# What each kind of bad record is called in ``LlavaConversations.skipped``, and how to fix it.
FIXES = {
    "missing_image": "fix the record's image path or the image folder",
    "unreadable_image": "replace or re-download the image file",
    "no_image_tag": "put an <image> tag in a human turn for each image",
    "image_tag_count": "give the record as many <image> tags (in human turns) as images",
    "image_tag_in_answer": "remove the <image> tag from the gpt turn",
    "empty_answer": "give every gpt turn a non-empty answer, or drop the turn pair",
    "too_long": "raise max_length, or shorten the conversation",
}


# ---------------------------------------------------------------------------------------------- loading


def _malformed(where: str, problem: str) -> ValueError:
    return ValueError(f"{where}: {problem} (expected LLaVA's conversation JSON: a list of "
                      '{"id", "image", "conversations": [{"from": "human"|"gpt", "value": str}, ...]})')


def load_records(json_path) -> list[dict]:
    """The records of a LLaVA conversation JSON file, checked for shape (one-line ``ValueError`` naming
    the file and record otherwise): a list of dicts, each with ``conversations`` alternating ``human`` /
    ``gpt`` turns, starting with ``human`` and ending with ``gpt``, string values; ``image`` a path, a list
    of paths, or absent. Record contents (images, tags, lengths) are checked by :class:`LlavaConversations`."""
    path = Path(json_path)
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise _malformed(str(path), f"the top level is a {type(records).__name__}, not a list of records")
    for index, record in enumerate(records):
        where = f"{path}: record #{index}"
        if not isinstance(record, dict):
            raise _malformed(where, f"a {type(record).__name__}, not a dict")
        where += f" (id {record.get('id', '?')!r})"
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise _malformed(where, "no 'conversations' list" if turns is None else "'conversations' is not a "
                             "non-empty list")
        image = record.get("image")
        if not (image is None or isinstance(image, str)
                or (isinstance(image, list) and all(isinstance(i, str) for i in image))):
            raise _malformed(where, f"'image' is a {type(image).__name__}, not a path or a list of paths")
        for t, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or not isinstance(turn.get("value"), str):
                raise _malformed(f"{where} turn {t}", "a turn needs 'from' and a string 'value'")
            if turn["from"] not in ROLES:
                raise _malformed(f"{where} turn {t}", f"role {turn['from']!r} is neither 'human' nor 'gpt'")
            expected = "human" if t % 2 == 0 else "gpt"
            if turn["from"] != expected:
                raise _malformed(f"{where} turn {t}", f"is {turn['from']!r} where {expected!r} was expected: turns "
                                 "must alternate human/gpt, starting with human")
        if len(turns) % 2:
            raise _malformed(where, "the conversation ends with a human turn, which has no answer")
    return records


def image_paths(record: dict) -> list[str]:
    image = record.get("image")
    return [] if image is None else [image] if isinstance(image, str) else list(image)


def record_id(record: dict, index: int) -> str:
    return str(record.get("id", f"#{index}"))


# ------------------------------------------------------------------------------------------ conversation


def user_content(text: str, images: list) -> list[dict]:
    """A human turn as chat-template parts: an image part where each ``<image>`` tag stood (the tag and
    the whitespace around it stripped, as LLaVA's own preprocessing strips it), text parts between."""
    parts = []
    for k, segment in enumerate(text.split(IMAGE_TAG)):
        if k:
            parts.append({"type": "image", "image": images.pop(0)})
        if segment.strip():
            parts.append({"type": "text", "text": segment.strip()})
    return parts


def to_messages(record: dict, images: list) -> list[dict]:
    """The processor's messages for a checked record, with the (opened) ``images`` in tag order."""
    images = list(images)
    messages = []
    for turn in record["conversations"]:
        if turn["from"] == "human":
            messages.append({"role": "user", "content": user_content(turn["value"], images)})
        else:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["value"]}]})
    return messages


def content_problem(record: dict) -> str | None:
    """The bad-record reason found from the text alone (tags vs images, empty answers), or None."""
    n_images = len(image_paths(record))
    tags = sum(t["value"].count(IMAGE_TAG) for t in record["conversations"] if t["from"] == "human")
    if any(IMAGE_TAG in t["value"] for t in record["conversations"] if t["from"] == "gpt"):
        return "image_tag_in_answer"
    if n_images and not tags:
        return "no_image_tag"
    if tags != n_images:
        return "image_tag_count"
    if any(not t["value"].strip() for t in record["conversations"] if t["from"] == "gpt"):
        return "empty_answer"
    return None


def open_images(record: dict, image_folder) -> tuple[list[Image.Image], str | None, str]:
    """(RGB images, None, "") or ([], reason, detail) for a file that is missing or cannot be read."""
    images = []
    for rel in image_paths(record):
        path = Path(image_folder) / rel
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except FileNotFoundError:
            return [], "missing_image", f"image file {str(path)!r} does not exist"
        except (UnidentifiedImageError, OSError) as e:
            return [], "unreadable_image", f"image file {str(path)!r} cannot be read ({type(e).__name__})"
    return images, None, ""


def _render(processor, messages: list[dict], add_generation_prompt: bool = False) -> dict:
    return processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                         return_dict=True, return_tensors="pt")


def assistant_spans(processor, messages: list[dict], full_ids: list[int], rid: str) -> list[tuple[int, int]]:
    """[start, end) token positions of each assistant turn (answer + the template's end of turn) in
    ``full_ids``, found by rendering prefix by prefix with the images; raises if a prefix does not tokenise
    as a prefix of the conversation (a label would land on the wrong token)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(processor, messages[:i], add_generation_prompt=True)["input_ids"][0].tolist()
        after = _render(processor, messages[: i + 1])["input_ids"][0].tolist()
        for name, ids in (("the prompt before", before), ("the conversation up to", after)):
            if full_ids[: len(ids)] != ids:
                raise ValueError(
                    f"record {rid!r}: {name} assistant turn {i // 2} does not tokenise as a prefix of the whole "
                    "conversation with this tokenizer/chat template, so its answer tokens cannot be labelled "
                    "exactly; use a template whose turns end on a token boundary (or fix the tokenizer)")
        if len(after) <= len(before):
            raise ValueError(f"record {rid!r}: assistant turn {i // 2} adds no tokens to the prompt before it")
        spans.append((len(before), len(after)))
    return spans


# --------------------------------------------------------------------------------------------- dataset


class LlavaConversations(torch.utils.data.Dataset):
    """LLaVA conversation records as training items: ``input_ids``, ``attention_mask``, ``labels`` (1-D;
    the assistant turns' tokens, -100 on user turns, template text and image tokens), ``pixel_values`` as
    the processor returns them for the record's images (4-D for LLaVA-1.5, 5-D for NeXT) and, for NeXT,
    ``image_sizes``; text-only records have no pixel values.

    Bad records (missing / unreadable image, ``<image>`` tags not matching the images, a tag in an answer,
    an empty answer, longer than ``max_length`` tokens after the image tokens are expanded) are found at
    construction: ``on_bad="skip"`` drops them and counts them in ``skipped`` (a Counter by reason; the ids
    in ``skipped_ids``, one-line details in ``skipped_details``); ``on_bad="error"`` raises one
    ``ValueError`` line for the first, naming the record, the problem and the fix.

    Cost: construction opens every image and runs the processor ``2 * turns + 1`` times per record (the
    whole conversation, then each assistant turn's prefix before and after it), so counts and label spans
    are known before training; only the spans and lengths are kept. ``__getitem__`` opens the images again
    and runs the processor once. On LLaVA-1.5's 665k records that is a long one-off pass; on the tiny twins it
    is ~0.5 s per hundred records (~5 ms a record for the 128 px twins with LLaVA-NeXT's five crops, one CPU).
    ``workers`` > 1 checks the records in that many forked processes (same result, in record order).
    """

    def __init__(self, records: list[dict], image_folder, processor, max_length: int | None = None,
                 on_bad: str = "skip", workers: int = 1):
        if on_bad not in ("skip", "error"):
            raise ValueError(f"on_bad={on_bad!r}; expected 'skip' or 'error'")
        if getattr(processor, "chat_template", None) is None:
            raise ValueError(f"{type(processor).__name__} has no chat template: load the model's processor (its "
                             "chat_template.jinja) or set processor.chat_template")
        self.image_folder = Path(image_folder)
        self.processor = processor
        self.max_length = max_length
        self.on_bad = on_bad
        self.skipped: collections.Counter = collections.Counter()
        self.skipped_ids: list[str] = []
        self.skipped_details: list[str] = []
        self.records: list[dict] = []
        self.ids: list[str] = []
        self.lengths: list[int] = []
        self._spans: list[list[tuple[int, int]]] = []
        for index, (record, (reason, detail, checked)) in enumerate(zip(records, self._check_all(records, workers))):
            rid = record_id(record, index)
            if reason is not None:
                self._bad(rid, reason, detail)
                continue
            length, spans = checked
            self.records.append(record)
            self.ids.append(rid)
            self.lengths.append(length)
            self._spans.append(spans)

    def _check_all(self, records: list[dict], workers: int):
        """``_check`` of every record, in order: here, or in ``workers`` forked processes (each a contiguous
        share; the children inherit this dataset and the records, and send back only the small results)."""
        if workers <= 1 or len(records) < 2 * workers:
            for index, record in enumerate(records):
                yield self._check(record, record_id(record, index))
            return
        import multiprocessing

        global _FORKED
        _FORKED = (self, records)
        step = -(-len(records) // (4 * workers))
        bounds = [(start, min(start + step, len(records))) for start in range(0, len(records), step)]
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for chunk in pool.imap(_check_range, bounds):
                    yield from chunk
        finally:
            _FORKED = None

    def _check(self, record: dict, rid: str):
        reason = content_problem(record)
        if reason is not None:
            tags = sum(t["value"].count(IMAGE_TAG) for t in record["conversations"] if t["from"] == "human")
            details = {"no_image_tag": f"{len(image_paths(record))} image(s) but no <image> tag",
                       "image_tag_count": f"{tags} <image> tag(s) in human turns for {len(image_paths(record))} "
                                          "image(s)",
                       "image_tag_in_answer": "an <image> tag in a gpt turn",
                       "empty_answer": "a gpt turn with an empty answer"}
            return reason, details[reason], None
        images, reason, detail = open_images(record, self.image_folder)
        if reason is not None:
            return reason, detail, None
        messages = to_messages(record, images)
        full = _render(self.processor, messages)["input_ids"][0].tolist()
        if self.max_length is not None and len(full) > self.max_length:
            return "too_long", f"{len(full)} tokens after image expansion > max_length {self.max_length}", None
        return None, "", (len(full), assistant_spans(self.processor, messages, full, rid))

    def _bad(self, rid: str, reason: str, detail: str) -> None:
        line = f"record {rid!r}: {reason}: {detail}; fix: {FIXES[reason]}"
        if self.on_bad == "error":
            raise ValueError(line + " (or pass on_bad='skip' to drop such records and count them)")
        self.skipped[reason] += 1
        self.skipped_ids.append(rid)
        self.skipped_details.append(line)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record, rid = self.records[index], self.ids[index]
        images, reason, detail = open_images(record, self.image_folder)
        if reason is not None:
            raise ValueError(f"record {rid!r}: {detail} (it was readable when the dataset was built)")
        out = _render(self.processor, to_messages(record, images))
        input_ids = out["input_ids"][0]
        if len(input_ids) != self.lengths[index]:
            raise ValueError(f"record {rid!r}: {len(input_ids)} tokens now, {self.lengths[index]} when the dataset "
                             "was built (the processor changed?)")
        labels = torch.full_like(input_ids, IGNORE)
        for start, end in self._spans[index]:
            labels[start:end] = input_ids[start:end]
        item = {"input_ids": input_ids, "attention_mask": out["attention_mask"][0], "labels": labels}
        for key in ("pixel_values", "image_sizes"):
            if key in out:
                item[key] = out[key]
        return item


_FORKED = None  # (dataset, records) for the forked checkers of ``LlavaConversations._check_all``


def _check_range(bounds: tuple[int, int]) -> list:
    torch.set_num_threads(1)
    data, records = _FORKED
    return [data._check(records[i], record_id(records[i], i)) for i in range(*bounds)]


# ------------------------------------------------------------------------------------------------ batch


def _pad(rows: list[torch.Tensor], value, side: str) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for k, r in enumerate(rows):
        if side == "right":
            out[k, : len(r)] = r
        else:
            out[k, width - len(r):] = r
    return out


def collate(batch: list[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Stack items of :class:`LlavaConversations` into a model batch: ``input_ids`` padded with
    ``pad_token_id``, ``attention_mask`` with 0, ``labels`` with -100; the images of all samples in order
    (``pixel_values`` concatenated on dim 0, NeXT's crops zero-padded to the most crops of the batch as
    its processor pads them, ``image_sizes`` concatenated). Text-only items add no images."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r}; expected 'right' or 'left'")
    out = {
        "input_ids": _pad([b["input_ids"] for b in batch], pad_token_id, padding_side),
        "attention_mask": _pad([b["attention_mask"] for b in batch], 0, padding_side),
        "labels": _pad([b["labels"] for b in batch], IGNORE, padding_side),
    }
    pixels = [b["pixel_values"] for b in batch if "pixel_values" in b]
    if pixels:
        if pixels[0].dim() == 5:  # NeXT: (images, crops, C, H, W), crops differ per image size
            crops = max(p.shape[1] for p in pixels)
            pixels = [torch.cat([p, p.new_zeros(p.shape[0], crops - p.shape[1], *p.shape[2:])], dim=1)
                      for p in pixels]
        out["pixel_values"] = torch.cat(pixels)
    sizes = [b["image_sizes"] for b in batch if "image_sizes" in b]
    if sizes:
        out["image_sizes"] = torch.cat(sizes)
    return out


# ----------------------------------------------------------------------------------------------- twins


def twin_records(samples: list[dict], image_dir: str = "images") -> list[tuple[dict, Image.Image]]:
    """(LLaVA record, its image) for each twin sample: one human turn ``<image>\\n<question>``, one gpt
    turn with the canonical answer, the image at ``<image_dir>/<sample id>.png``."""
    return [({"id": s["id"], "image": f"{image_dir}/{s['id']}.png",
              "conversations": [{"from": "human", "value": f"{IMAGE_TAG}\n{s['question']}"},
                                {"from": "gpt", "value": s["answer"]}]}, s["image"]) for s in samples]


def export_twins(out_dir, n: int, split: str = "train", seed: int = 0, names=None, image_size: int | None = 64,
                 workers: int | None = None) -> Path:
    """Write ``n`` samples of each twin (interleaved round-robin, as the training stream draws them) as
    ``out_dir/<split>.json`` in LLaVA's format with PNG images under ``out_dir/images/``; the image folder
    to read it with is ``out_dir``; ``image_size`` None: each twin's own (128 for ``synth_*_hr``). Returns the
    JSON path. Same arguments, same files, whatever ``workers`` (processes drawing and writing the images;
    default: up to 8 CPUs for large exports)."""
    from analysis import twins

    names = list(names or twins.TWINS)
    out = Path(out_dir)
    path, meta_path = out / f"{split}.json", out / f"{split}.meta.json"
    meta = {"n": n, "seed": seed, "names": names, "image_size": image_size}
    if path.exists() and meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        return path  # already written (a resumed run, or another process of this one)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if n * len(names) >= 4000 else 1
    step = max(1, -(-n // (4 * workers)))
    jobs = [(str(out), name, split, seed, image_size, start, min(step, n - start))
            for name in names for start in range(0, n, step)]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            chunks = pool.map(_export_chunk, jobs)
    else:
        chunks = [_export_chunk(job) for job in jobs]
    per_twin = {name: [] for name in names}
    for job, chunk in zip(jobs, chunks):
        per_twin[job[1]] += chunk
    records = [per_twin[name][i] for i in range(n) for name in names]
    path.write_text(json.dumps(records, indent=1))
    meta_path.write_text(json.dumps(meta))  # last: its presence says the export is complete
    return path


def _export_chunk(job) -> list[dict]:
    """Samples ``start .. start + count`` of one twin: images written, records returned."""
    from analysis import twins

    out, name, split, seed, image_size, start, count = job
    records = []
    for record, image in twin_records(twins.generate(name, split, count, seed, image_size, start=start)):
        image.save(Path(out) / record["image"])
        records.append(record)
    return records
