"""Demo of the operators on a tiny random-weight LLaVA: how far each op moves the output.

A stand-in for the main job until the Hydra runner lands: it shows the public API end to end.
    .venv/bin/python experiments/demo_ops.py
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from analysis import OPERATORS, ablate, compute_layout, tiny


def main() -> None:
    torch.manual_seed(0)
    model = tiny.build_model("llava_next", "llama", num_layers=8)
    processor = tiny.build_processor("llava_next")
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (48, 64, 3), dtype=np.uint8))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is written?"}]}],
        add_generation_prompt=True,
    )
    batch = processor(images=[image], text=[prompt], return_tensors="pt")
    layout = compute_layout(batch["input_ids"], model.config, batch["attention_mask"], batch["image_sizes"])
    sample = layout.samples[0]
    print(f"{len(sample.vision)} vision tokens ({len(sample.newline)} newline), {len(sample.text)} text tokens, "
          f"crops {[c.shape for c in sample.images[0].crops]}, unpadded grid {sample.images[0].unpadded.shape}")
    with torch.no_grad():
        vanilla = model(**batch).logits[0, -1].softmax(-1)
        print(f"{'op':<15}" + "".join(f"{f'L>={s}':>10}" for s in (0, 2, 4, 6)) + "   (total variation of the next-token distribution)")
        for op in OPERATORS:
            row = []
            for start in (0, 2, 4, 6):
                with ablate(model, op, start_layer=start):
                    probs = model(**batch).logits[0, -1].softmax(-1)
                row.append(0.5 * (probs - vanilla).abs().sum().item())
            print(f"{op:<15}" + "".join(f"{v:>10.4f}" for v in row))


if __name__ == "__main__":
    main()
