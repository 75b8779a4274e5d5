"""FLOPs-matched token reduction for the ProxyV comparison (the paper's Table 5), on the evaluated prompts.

    python experiments/match_flops.py                 # the embedded tiny model and its ProxyV checkpoints
    python experiments/match_flops.py --model tiny-next --eval synthetic_hr   # the tiny LLaVA-NeXT on its twins

For each trained ProxyV checkpoint of the model config, prints the executed decoder FLOPs it saves on
the twins' eval prompts (the samples the sweep scores) and the FastV / PyramidDrop keep ratios that
save the same, and the VisionZip budget (D dominant + C contextual tokens per image, in the official
54:10 proportion) whose saving is closest (VisionZip's saving moves in steps of one token per image);
conf/experiment/table5.yaml states the result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.eval_bridge import twin_prompt_shapes  # noqa: E402
from analysis.flops import mean_flops  # noqa: E402
from analysis.flops.matching import match_param, saved_by  # noqa: E402
from analysis.flops.visionzip import placeholders_per_image  # noqa: E402
from analysis.lmms_model import LlavaAblate  # noqa: E402
from analysis.runner.spec import REPO_ROOT  # noqa: E402

VISIONZIP_RATIO = (54, 10)  # the official LLaVA-1.5 budget: 54 dominant (CLS included) + 10 contextual


def visionzip_budget(tokens: int) -> tuple[int, int]:
    """(D, C) of ``tokens`` = D + C tokens per image in the official 54:10 proportion (D >= 1)."""
    dominant = max(1, round(tokens * VISIONZIP_RATIO[0] / sum(VISIONZIP_RATIO)))
    return dominant, tokens - dominant


def match_visionzip(config, prompts, target: float) -> tuple[int, int, float]:
    """(D, C, saved): the VisionZip budget in the 54:10 proportion whose executed decoder saving on ``prompts``
    is closest to ``target``. The decoder's FLOPs depend on D + C only (the sequence keeps D + C tokens per
    image), so every total from 1 to the image's placeholders is tried."""
    savings = {}
    for tokens in range(1, placeholders_per_image(config) + 1):
        dominant, contextual = visionzip_budget(tokens)
        savings[(dominant, contextual)] = saved_by(config, prompts, "visionzip", dominant=dominant,
                                                   contextual=contextual)
    (dominant, contextual), saved = min(savings.items(), key=lambda item: abs(item[1] - target))
    return dominant, contextual, saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="a conf/model/ name")
    p.add_argument("--eval", default="synthetic", help="a conf/eval/ name: its tasks are the prompts")
    p.add_argument("--limit", type=int, default=50, help="eval samples per twin (the sweep's eval.limit)")
    p.add_argument("--fastv-start", type=int, default=2, help="FastV's K (its paper's LLaVA setting: 2)")
    args = p.parse_args()
    model_cfg = OmegaConf.load(REPO_ROOT / "conf" / "model" / f"{args.model}.yaml")
    tasks = tuple(OmegaConf.load(REPO_ROOT / "conf" / "eval" / f"{args.eval}.yaml").tasks)
    base = LlavaAblate(str(REPO_ROOT / model_cfg.pretrained), device="cpu", progress=False)
    prompts = twin_prompt_shapes(base, tasks, args.limit)
    print(f"{len(prompts)} prompts; mean vision tokens {sum(p['mask'].count('v') for p in prompts) / len(prompts):.1f},"
          f" mean length {sum(len(p['mask']) for p in prompts) / len(prompts):.1f}")
    print(f"{'ProxyV':<10}{'saved':>8}  {'FastV K=' + str(args.fastv_start) + ' keep':>16}{'saved':>8}"
          f"  {'PDrop keep':>12}{'saved':>8}  {'VisionZip D+C':>14}{'saved':>8}")
    for start, path in sorted((int(k), v) for k, v in (model_cfg.get("proxyv") or {}).items()):
        if not isinstance(path, str):  # several checkpoints for a start layer: the first, as the sweep's default
            path = path[0]
        proxyv = LlavaAblate(str(REPO_ROOT / path), device="cpu", progress=False)
        target = mean_flops(proxyv.model.config, twin_prompt_shapes(proxyv, tasks, args.limit),
                            proxyv.variant)["reduction"]
        fastv = match_param(base.model.config, prompts, "fastv", "keep", target, start_layer=args.fastv_start)
        pdrop = match_param(base.model.config, prompts, "pdrop", "keep", target)
        dominant, contextual, zipped = match_visionzip(base.model.config, prompts, target)
        print(f"{'L' + str(start):<10}{target:>8.1%}  {fastv[0]:>16.4f}{fastv[1]:>8.1%}  {pdrop[0]:>12.4f}{pdrop[1]:>8.1%}"
              f"  {f'{dominant}+{contextual}':>14}{zipped:>8.1%}")


if __name__ == "__main__":
    main()
