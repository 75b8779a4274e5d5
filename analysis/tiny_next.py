"""tiny-llava-next: the embedded tiny LLaVA made a LLaVA-NeXT (AnyRes), initialised from ``checkpoints/tiny-llava``.

HF ``LlavaNextForConditionalGeneration`` with the tiny model's 64 px CLIP tower (patch 8) and
``image_grid_pinpoints=[[128, 128]]``: a 128 px picture (a high-resolution twin, ``synth_*_hr``) gives
a base crop (the picture shrunk to 64 px: its 8 px characters become 4 px, too small for the tower)
and 2 x 2 high-resolution 64 px crops (characters at the 8 px the tower reads), 64 patch tokens each,
plus LLaVA-NeXT's ``image_newline`` after each of the 16 rows of the crops' 16 x 16 feature grid:

    64 (base) + 16 x (16 + 1) (crops + newlines) = 336 image tokens, 320 of them patch features.

Tower, projector and the 32-layer Llama LLM have the shapes of ``tiny-llava``'s, so its state dict maps
onto the NeXT model key for key; only ``image_newline`` is new (HF's initialisation: N(0, 1/hidden), seeded).

    model, processor = build()                       # from checkpoints/tiny-llava
    save(model, processor, "runs/next/init")         # float16, like the shipped checkpoints
    python -m analysis.tiny_next --out runs/next/init --eval 40   # build, save, and score before training
    python -m analysis.tiny_next --checkpoint runs/train/next/model --eval 200   # score a trained one

Base crop only (``base_only``): the same prompt with the 272 high-resolution image tokens (crops and
newlines) removed and the packed image features cut to the base crop's 64, i.e. exactly what the model
would see if AnyRes added no crops (LLaVA-1.5 on the picture shrunk to 64 px, through the NeXT model's
weights). The alternative ``blank_crops`` keeps every position and replaces the crops' pixels with those
of a blank page of the picture's paper colour.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "checkpoints" / "tiny-llava"
CROP = 64  # the tower's input size
PATCH = 8
IMAGE_SIZE = 128
PINPOINTS = [[IMAGE_SIZE, IMAGE_SIZE]]
BASE_TOKENS = (CROP // PATCH) ** 2  # 64
GRID_SIDE = IMAGE_SIZE // PATCH  # 16: the crops' feature grid per side
IMAGE_TOKENS = BASE_TOKENS + GRID_SIDE * (GRID_SIDE + 1)  # 336 = 64 + 256 + 16 newlines
SEED = 0


def next_config(base_config):
    """The ``LlavaNextConfig`` of a LLaVA-1.5 ``base_config`` with the AnyRes pinpoints of the 128 px twins."""
    from transformers import LlavaNextConfig

    return LlavaNextConfig(
        vision_config=base_config.vision_config.to_dict(), text_config=base_config.text_config.to_dict(),
        image_token_id=base_config.image_token_id, projector_hidden_act=base_config.projector_hidden_act,
        multimodal_projector_bias=base_config.multimodal_projector_bias, vision_feature_select_strategy="default",
        vision_feature_layer=-1, image_grid_pinpoints=PINPOINTS, tie_word_embeddings=False,
        image_seq_length=IMAGE_TOKENS,
    )


def build_processor(base=BASE):
    """A ``LlavaNextProcessor`` with the base checkpoint's tokenizer and chat template, the tower's 64 px crops
    and the 128 px pinpoint (the image processor of :func:`analysis.tiny.image_processor`)."""
    from transformers import AutoProcessor, LlavaNextProcessor

    from . import tiny

    old = AutoProcessor.from_pretrained(base)
    return LlavaNextProcessor(
        image_processor=tiny.image_processor("llava_next", CROP, PINPOINTS), tokenizer=old.tokenizer,
        patch_size=PATCH, vision_feature_select_strategy="default", chat_template=old.chat_template,
        num_additional_image_tokens=1,
    )


def build(base=BASE, seed: int = SEED):
    """(LlavaNextForConditionalGeneration in float32, eval mode; its processor), weights from ``base`` (a
    LLaVA-1.5 checkpoint of the same shapes), ``image_newline`` drawn from ``seed``."""
    from transformers import GenerationConfig

    from .models import generation_class

    old = generation_class("llava").from_pretrained(base, dtype=torch.float32)
    config = next_config(old.config)
    torch.manual_seed(seed)
    model = generation_class("llava_next")(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(old.state_dict(), strict=False)
    if sorted(missing) != ["model.image_newline"] or unexpected:
        raise RuntimeError(f"{base}: its state dict does not map onto the NeXT model (missing {missing}, "
                           f"unexpected {unexpected})")
    with torch.no_grad():  # as LlavaNextModel.__init__ draws it, but from our seed
        hidden = config.text_config.hidden_size
        g = torch.Generator().manual_seed(seed)
        model.model.image_newline.copy_(torch.randn(hidden, generator=g) / hidden**0.5)
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(base)
    return model.eval(), build_processor(base)


def save(model, processor, out, dtype=torch.float16, record: dict | None = None) -> Path:
    """Save as the shipped checkpoints are saved (``dtype`` weights, processor beside them, ``build.json``);
    ``model`` is left in float32."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(out)
    model.to(torch.float32)
    processor.save_pretrained(out)
    (out / "build.json").write_text(json.dumps({"entry": "analysis/tiny_next.py", **(record or {})}, indent=2,
                                               default=str))
    return out


# ------------------------------------------------------------------------------------------ prompt length


def prompt_composition(processor, questions) -> dict:
    """Image tokens, patch tokens (image tokens less newlines) and prompt tokens of the evaluation prompt (chat
    template + generation prompt) for the shortest and the longest of ``questions``, and the image share."""
    from PIL import Image

    from .training.evaluate import prompt_text

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    rows = {}
    for label, question in (("shortest", min(questions, key=len)), ("longest", max(questions, key=len))):
        ids = processor(images=[image], text=[prompt_text(processor, question)], return_tensors="pt")["input_ids"][0]
        vision = int((ids == image_id).sum())
        rows[label] = {"question": question, "prompt_tokens": len(ids), "image_tokens": vision,
                       "patch_tokens": vision - GRID_SIDE, "image_share": vision / len(ids),
                       "patch_share": (vision - GRID_SIDE) / len(ids)}
    return rows


def twin_questions(names) -> list[str]:
    """Every question template the twins ``names`` ask (their module-level QUESTIONS, filled with a letter)."""
    import importlib

    out = []
    for name in names:
        module = importlib.import_module(f"analysis.twins.{name.removeprefix('synth_').removesuffix('_hr')}")
        table = module.QUESTIONS
        out += [q.format(key="K", label="K") for q in (table.values() if isinstance(table, dict) else table)]
    return out


# ------------------------------------------------------------------------------------------ base crop only


def drop_high_res_tokens(batch: dict, image_token_id: int, keep: int = BASE_TOKENS) -> dict:
    """``batch`` (a processor output, one image per row) with each image's run of image tokens cut to its first
    ``keep`` (the base crop's) in ``input_ids`` and ``attention_mask``; pixel values and sizes unchanged.
    Raises unless every row loses the same number of tokens (a rectangular batch)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows_ids, rows_mask = [], []
    for row_ids, row_mask in zip(ids, mask):
        is_image = row_ids == image_token_id
        rank = torch.cumsum(is_image.long(), 0)  # 1-based index of each image token in its row
        if int(is_image.sum()) < keep:
            raise ValueError(f"a row has {int(is_image.sum())} image tokens, fewer than the {keep} to keep")
        kept = ~is_image | (rank <= keep)
        rows_ids.append(row_ids[kept])
        rows_mask.append(row_mask[kept])
    if len({len(r) for r in rows_ids}) != 1:
        raise ValueError("rows lose different numbers of image tokens (images of different sizes in one batch)")
    return {**batch, "input_ids": torch.stack(rows_ids), "attention_mask": torch.stack(rows_mask)}


@contextlib.contextmanager
def base_features_only(model):
    """Within: the NeXT model packs only each image's base-crop features (its first crop's patch tokens), no
    high-resolution crops and no ``image_newline``; the prompt must hold ``BASE_TOKENS`` image tokens per image
    (:func:`drop_high_res_tokens`)."""
    from .models import llava_core

    core = llava_core(model)

    def pack_base(image_features, image_sizes=None, vision_feature_select_strategy=None, image_newline=None,
                  **_):
        base = [features[0] for features in image_features]  # (crops, patches, hidden) -> the base crop's
        return base, torch.tensor([b.shape[0] for b in base], device=base[0].device)

    core.pack_image_features = pack_base
    try:
        yield
    finally:
        del core.pack_image_features


def base_only(model, processor):
    """(prepare, context) for :func:`analysis.training.evaluate.answer`: the base crop only, as defined above."""
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return (lambda batch, samples: drop_high_res_tokens(batch, image_id)), (lambda: base_features_only(model))


def blank_crops(processor):
    """A ``prepare`` for :func:`analysis.training.evaluate.answer`: the high-resolution crops' pixels replaced by
    those of a blank page of each picture's paper colour (positions, newlines and base crop kept)."""
    from analysis import twins

    def prepare(batch, samples):
        blank = processor.image_processor([twins.blank_image(s["image"]) for s in samples],
                                          return_tensors="pt")["pixel_values"]
        pixels = batch["pixel_values"].clone()
        pixels[:, 1:] = blank[:, 1:]
        return {**batch, "pixel_values": pixels}

    return prepare


def score_modes(model, processor, n: int, names=None, modes=("full", "base_only", "blank_crops", "blind"),
             batch_size: int = 8) -> dict:
    """Greedy scores per twin and mode on the first ``n`` eval samples of the high-resolution twins."""
    from analysis import twins

    from .training.evaluate import score_twins

    names = list(names or twins.HR_TWINS)
    out = {}
    for mode in modes:
        kwargs = {"blind": mode == "blind", "batch_size": batch_size}
        if mode == "base_only":
            kwargs["prepare"], kwargs["context"] = base_only(model, processor)
        elif mode == "blank_crops":
            kwargs["prepare"] = blank_crops(processor)
        out[mode] = score_twins(model, processor, n=n, names=names, **kwargs)
    return out


def main(argv=None) -> None:
    import argparse
    import time

    from analysis import twins

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for the initial (untrained) NeXT checkpoint, built from --base")
    parser.add_argument("--checkpoint", help="instead: score this saved NeXT checkpoint (e.g. a trained one)")
    parser.add_argument("--base", default=str(BASE))
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--eval", type=int, default=0, help="score N eval samples per high-res twin (0: skip)")
    parser.add_argument("--modes", nargs="+", default=["full", "base_only", "blank_crops", "blind"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", help="also write the record (scores, prompt composition) to this file")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if bool(args.out) == bool(args.checkpoint):
        parser.error("give --out (build from --base) or --checkpoint (score a saved model), one of them")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        from .training.evaluate import load_checkpoint

        model, processor = load_checkpoint(args.checkpoint)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        record = {"checkpoint": args.checkpoint}
    else:
        model, processor = build(args.base, args.seed)
        record = {"base": args.base, "seed": args.seed}
    record.update({"pinpoints": PINPOINTS, "image_tokens": IMAGE_TOKENS,
                   "prompt": prompt_composition(processor, twin_questions(twins.HR_TWINS))})
    if args.eval:
        start = time.time()
        record["eval_n"] = args.eval
        record["scores"] = score_modes(model, processor, args.eval, modes=args.modes, batch_size=args.batch_size)
        record["eval_s"] = round(time.time() - start, 1)
    if args.out:
        save(model, processor, args.out, record=record)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
