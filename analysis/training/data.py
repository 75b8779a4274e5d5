"""Batches of twin samples for the two training stages."""

from __future__ import annotations

import numpy as np
import torch

from analysis import twins

IGNORE = -100


def sample_stream(names: list[str], seed: int, start: int = 0):
    """Endless round-robin over twins of train samples; sample ``i`` is a pure function of (seed, i)."""
    i = start
    while True:
        name = names[i % len(names)]
        yield twins.generate(name, "train", 1, seed, start=i // len(names))[0]
        i += 1


def cell_targets(samples: list[dict]) -> torch.Tensor:
    """(B, GRID*GRID) class index of every cell, row-major like the tower's patch tokens."""
    index = {c: i for i, c in enumerate(twins.CELL_VOCAB)}
    return torch.tensor([[index[c] for row in s["cells"] for c in row] for s in samples])


def pixel_batch(processor, samples: list[dict]) -> torch.Tensor:
    return processor.image_processor([s["image"] for s in samples], return_tensors="pt")["pixel_values"]


def prompt_text(processor, question: str) -> str:
    """The conversation prompt the evaluation uses (chat template, generation prompt)."""
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
    )


def llava_batch(processor, samples: list[dict], blind: bool = False) -> dict:
    """Right-padded LLaVA batch with labels on the answer tokens (" answer</s>") only."""
    tokenizer = processor.tokenizer
    images = [twins.blank_image(s["image"]) if blind else s["image"] for s in samples]
    prompts = processor(images=images, text=[prompt_text(processor, s["question"]) for s in samples],
                        return_tensors="pt", padding=True)
    rows, labels = [], []
    for ids, mask, s in zip(prompts["input_ids"], prompts["attention_mask"], samples):
        prompt = ids[mask.bool()].tolist()
        answer = tokenizer.encode(" " + s["answer"], add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([IGNORE] * len(prompt) + answer)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [IGNORE] * (width - len(lab)) for lab in labels]),
        "pixel_values": prompts["pixel_values"],
    }


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
