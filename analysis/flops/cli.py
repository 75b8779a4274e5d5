"""``python -m analysis.flops``: analytic prefill FLOPs of a checkpoint config under a variant (see docs/flops.md).

    python -m analysis.flops --config llava-1.5-7b --vision-tokens 576 --text-tokens 64 \\
        --op skip_ffn --start-layer 12 --json
    python -m analysis.flops --config llava-1.5-7b --vision-tokens 576 --text-tokens 64 --op fastv --start-layer 3 --keep 0.5
    python -m analysis.flops --config llava-1.5-7b --vision-tokens 576 --text-tokens 64 --op pdrop --layers 8,16,24 --keep 0.5
    python -m analysis.flops --config llava-1.5-7b --vision-tokens 576 --text-tokens 64 --op visionzip --dominant 54 --contextual 10
    python -m analysis.flops --config qwen2.5-vl-7b --image-grid 1,36,54 --video-grid 8,24,42 --text-tokens 64 --op skip_ffn --start-layer 14
"""

from __future__ import annotations

import argparse
import json
import sys

from .configs import load_config, shipped_configs
from .dims import tokens_per_crop, vision_flops
from .proxyv import DEFAULT_INIT, DEFAULT_REDUCE_FACTOR, INITS
from .qwen import grid_of_resolution, is_qwen, parse_grid
from .reduction import METHODS as REDUCTION_METHODS
from .report import FlopsReport, count_flops
from .tokens import PrefillTokens
from .variants import known_variants, make_variant


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.flops",
        description="Analytic prefill FLOPs of a LLaVA or Qwen-VL model under an op (see docs/flops.md, docs/qwen.md).",
    )
    parser.add_argument("--config", required=True,
                        help=f"config.json (LLaVA or bare text backbone) or a shipped name: {', '.join(shipped_configs())}")
    parser.add_argument("--vision-tokens", type=int, default=None,
                        help="vision tokens of the image(s) without newline tokens (default: one crop)")
    parser.add_argument("--tokens-per-crop", type=int, default=None,
                        help="LM tokens per crop (default: (image_size/patch_size)^2 of the config)")
    parser.add_argument("--newline-tokens", type=int, default=0, help="LLaVA-NeXT image_newline tokens")
    parser.add_argument("--text-tokens", type=int, required=True,
                        help="text tokens of the prompt (Qwen-VL: every token but the image / video pads, "
                             "<|vision_start|> / <|vision_end|> and Qwen3-VL's timestamps included)")
    parser.add_argument("--text-before-image", type=int, default=0,
                        help="how many of the text tokens precede the image (Qwen-VL: all images and videos, "
                             "back to back; e.g. a system prompt); default 0")
    qwen = parser.add_argument_group("Qwen-VL configs (qwen2_vl, qwen2_5_vl, qwen3_vl): the vision inputs")
    qwen.add_argument("--image-grid", action="append", default=[], metavar="T,H,W",
                      help="an image's patch grid, as an image_grid_thw row (T = 1); repeatable")
    qwen.add_argument("--video-grid", action="append", default=[], metavar="T,H,W",
                      help="a video's patch grid, as a video_grid_thw row (T = frames / temporal_patch_size); "
                           "repeatable")
    qwen.add_argument("--image-size", action="append", default=[], metavar="HxW",
                      help="an image of H x W pixels, resized as the processor does (smart_resize within "
                           "--min-pixels / --max-pixels); repeatable")
    qwen.add_argument("--video-size", action="append", default=[], metavar="FxHxW",
                      help="a video of F frames of H x W pixels (each frame resized as --image-size); repeatable")
    qwen.add_argument("--min-pixels", type=int, default=None,
                      help="smart_resize's lower bound per image / frame (default 4·(patch·merge)^2)")
    qwen.add_argument("--max-pixels", type=int, default=None,
                      help="smart_resize's upper bound per image / frame (default 1280·(patch·merge)^2)")
    parser.add_argument("--newline-as", choices=("vision", "text"), default=None,
                        help="whether ops treat newline tokens as vision tokens (ablate()'s default) or text "
                             "(always text for --op proxyv)")
    parser.add_argument("--op", default="none", help=f"one of: {', '.join(known_variants())}")
    parser.add_argument("--start-layer", type=int, default=None,
                        help="first layer of the op (default 0); --op fastv: K, pruned from layer K on")
    parser.add_argument("--keep", type=float, default=None, metavar="R",
                        help="--op fastv / pdrop: share of the vision tokens kept (FastV: ceil(R·n) from layer K; "
                             "PyramidDrop: floor(n·R^s) after boundary s; default 0.5)")
    parser.add_argument("--layers", default=None, metavar="K1,K2,...",
                        help="--op pdrop: its stage boundaries (default: four equal stages, 8,16,24 of 32 layers)")
    parser.add_argument("--dominant", type=int, default=None, metavar="D",
                        help="--op visionzip: dominant tokens per image / crop, the CLS token included (default 54)")
    parser.add_argument("--contextual", type=int, default=None, metavar="C",
                        help="--op visionzip: contextual (merged) tokens per image / crop (default 10)")
    parser.add_argument("--proxy-reduce", type=int, default=None, metavar="F",
                        help=f"--op proxyv: reduce factor, (side/F)^2 proxies per crop (spatial; default "
                             f"{DEFAULT_REDUCE_FACTOR})")
    parser.add_argument("--proxy-init", choices=INITS, default=None,
                        help=f"--op proxyv: proxy initialiser (default {DEFAULT_INIT})")
    parser.add_argument("--learned-proxies", type=int, default=None, metavar="N",
                        help="--op proxyv --proxy-init learned: learned proxies per crop / grid block (required on "
                             "Qwen-VL configs; LLaVA default side^2 / F^2)")
    parser.add_argument("--on-proxyv", type=int, default=None, metavar="L",
                        help="--op fastv / pdrop / visionzip on a ProxyV model from layer L (learned proxies, reduce "
                             "factor --proxy-reduce, default 4): its ProxyV layers are counted")
    parser.add_argument("--end-layer", type=int, default=None, help="exclusive; default the number of layers")
    parser.add_argument("--lm-head", choices=("all", "last"), default="all",
                        help="logits at every position (a forward) or at the last (generate's prefill)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _format_table(report: FlopsReport, title: str) -> str:
    def tf(x: int) -> str:
        return f"{x / 1e12:9.4f}"

    header = f"{'layer':>5} {'ablated':>7} {'TFLOPs':>9} {'baseline':>9} {'saved':>6} {'theory':>9} {'th. base':>9}"
    lines = [title, header]
    for layer, base in zip(report.per_layer, report.baseline_per_layer):
        saved = 1 - layer.total / base.total
        lines.append(f"{layer.layer:>5} {'yes' if layer.ablated else '':>7} {tf(layer.total)} {tf(base.total)} "
                     f"{saved:6.1%} {tf(layer.theoretical_total)} {tf(base.theoretical_total)}")
    lines.append(f"{'all':>5} {'':>7} {tf(report.total)} {tf(report.baseline)} {report.reduction:6.1%} "
                 f"{tf(report.theoretical)} {tf(report.theoretical_baseline)}")
    lines.append("")
    lines.append(f"decoder executed     {report.total / 1e12:.4f} TFLOPs  (baseline {report.baseline / 1e12:.4f}, "
                 f"reduction {report.reduction:.2%})")
    lines.append(f"decoder theoretical  {report.theoretical / 1e12:.4f} TFLOPs  (baseline "
                 f"{report.theoretical_baseline / 1e12:.4f}, reduction {report.theoretical_reduction:.2%})")
    lines.append(f"LM head              {report.lm_head / 1e12:.4f} TFLOPs")
    if report.vision is not None:
        lines.append(f"vision tower + proj. {report.vision / 1e12:.4f} TFLOPs" + _vision_detail(report))
    components = report.components()
    lines.append("executed by component: " + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in components.items()))
    lines.append("executed by group:     " + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in report.groups().items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = _variant_options(args)
        config = load_config(args.config)
        if is_qwen(config):
            tokens, image_grids, video_grids = _qwen_tokens(args, config)
            per_crop, vision_tokens = None, int(tokens.vision.sum())
        else:
            _no_qwen_flags(args, config)
            # a bare text backbone has no crop size: its vision tokens are one block unless told otherwise
            per_crop = args.tokens_per_crop or tokens_per_crop(config) or max(args.vision_tokens or 0, 1)
            vision_tokens = args.vision_tokens if args.vision_tokens is not None else tokens_per_crop(config) or 0
            tokens = PrefillTokens.from_counts(vision_tokens, args.text_tokens, per_crop, args.newline_tokens,
                                               args.text_before_image, args.newline_as)
        layers = options.pop("layers", None)
        extras = _on_proxyv(args, options)
        start = args.start_layer if args.start_layer is not None or args.op in ("pdrop", "visionzip") else 0
        report = count_flops(config, tokens, args.op, layers, start_layer=start, end_layer=args.end_layer,
                             lm_head=args.lm_head, **options, **extras)
        plain = {k: v for k, v in options.items() if k != "proxyv"}  # the rows and the shortening: as without ProxyV
        stages = _stages(config, tokens, args.op, layers, start, args.end_layer, plain)
        shortened = _shortened(config, tokens, args.op, plain)
        options = {**plain, **options}  # the defaults the stages filled in (keep)
    except (ValueError, TypeError, OSError, NotImplementedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        qwen = {"image_grids": [list(g) for g in image_grids], "video_grids": [list(g) for g in video_grids]} if (
            is_qwen(config)) else {}
        out = {"config": str(args.config), "vision_tokens": vision_tokens, "tokens_per_crop": per_crop,
               "newline_tokens": args.newline_tokens, "text_tokens": args.text_tokens,
               "text_before_image": args.text_before_image, **qwen,
               **_proxy_flags(options), **_reduction_flags(options, stages), **shortened, **report.to_dict()}
        print(json.dumps(out))
    else:
        flags = {**_proxy_flags(options), **({"keep": options["keep"]} if "keep" in options else {}),
                 **{k: options[k] for k in ("dominant", "contextual") if k in options}}
        detail = "".join(f", {k.removeprefix('proxy_')} {v}" for k, v in flags.items())
        where = "boundaries" if args.op == "pdrop" else "layers"
        span = "before the LLM" if args.op == "visionzip" else f"at {where} {_span(report.layers)}"
        if is_qwen(config):
            inputs = ", ".join([f"image {'x'.join(map(str, g))}" for g in image_grids]
                               + [f"video {'x'.join(map(str, g))}" for g in video_grids]) or "no image"
            what = f"{vision_tokens} vision from {inputs} (T x H x W patches), {args.text_tokens} text"
        else:
            what = f"{vision_tokens} vision, {args.newline_tokens} newline, {args.text_tokens} text"
        print(_format_table(report, f"{args.config}: op {report.variant}{detail} {span}, {tokens.seq_len} tokens "
                                    f"({what})"))
        if shortened:
            short = shortened["shortened"]
            print(f"decoder sequence:     {short['seq_len']} tokens ({short['vision']} vision, {short['text']} text) "
                  f"instead of {tokens.seq_len}; vision baseline {shortened['baseline_vision_flops'] / 1e12:.4f} TFLOPs")
        if stages:
            print("rows per stage:       " + ", ".join(
                f"layers {s['first_layer']}..{s['last_layer']}: {s['rows']} ({s['vision']} vision)" for s in stages))
    return 0


def _qwen_tokens(args, config):
    """A Qwen-VL prompt from the grid / size flags: (PrefillTokens, image grids, video grids)."""
    given = [flag for flag, value in (("--vision-tokens", args.vision_tokens), ("--tokens-per-crop", args.tokens_per_crop),
                                      ("--newline-tokens", args.newline_tokens or None)) if value is not None]
    if given:
        raise ValueError(f"{' and '.join(given)} {'do' if len(given) > 1 else 'does'} not apply to Qwen-VL configs: "
                         "give the vision inputs as --image-grid / --video-grid T,H,W or --image-size HxW / "
                         "--video-size FxHxW")
    bounds = {"min_pixels": args.min_pixels, "max_pixels": args.max_pixels}
    images = [parse_grid(g) for g in args.image_grid]
    for size in args.image_size:
        height, width = _parse_sizes(size, 2, "--image-size", "HxW (pixels, e.g. 504x756)")
        images.append(grid_of_resolution(config, height, width, **bounds))
    videos = [parse_grid(g) for g in args.video_grid]
    for size in args.video_size:
        frames, height, width = _parse_sizes(size, 3, "--video-size", "FxHxW (frames x pixels, e.g. 16x336x588)")
        videos.append(grid_of_resolution(config, height, width, frames, **bounds))
    bad = [g for g in images if g[0] != 1]
    if bad:
        raise ValueError(f"an image grid has T = 1 (the processor repeats the image to fill a temporal patch), got "
                         f"{','.join(map(str, bad[0]))}; give videos as --video-grid")
    tokens = PrefillTokens.from_qwen_counts(config, images, videos, args.text_tokens, args.text_before_image)
    return tokens, images, videos


def _parse_sizes(text: str, n: int, flag: str, form: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) != n or min(values) <= 0:
        raise ValueError(f"{flag} takes {form}, got {text!r}")
    return values


def _no_qwen_flags(args, config) -> None:
    given = [flag for flag, value in (("--image-grid", args.image_grid), ("--video-grid", args.video_grid),
                                      ("--image-size", args.image_size), ("--video-size", args.video_size),
                                      ("--min-pixels", args.min_pixels), ("--max-pixels", args.max_pixels)) if value]
    if given:
        raise ValueError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to Qwen-VL configs "
                         f"(qwen2_vl, qwen2_5_vl, qwen3_vl), not {getattr(config, 'model_type', None)!r}; use "
                         "--vision-tokens")


def _variant_options(args) -> dict:
    """The variant options of the command line (ProxyV's, token reduction's), checked against ``--op``; sets
    ``args.newline_as``."""
    visionzip = [flag for flag, value in (("--dominant", args.dominant), ("--contextual", args.contextual))
                 if value is not None]
    if visionzip and args.op != "visionzip":
        raise ValueError(f"{' and '.join(visionzip)} {'apply' if len(visionzip) > 1 else 'applies'} to --op visionzip "
                         f"only, not --op {args.op}")
    if args.op not in REDUCTION_METHODS:
        given = [flag for flag, value in (("--keep", args.keep), ("--layers", args.layers)) if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to --op "
                             f"{' / '.join(REDUCTION_METHODS)} only, not --op {args.op}")
    else:
        if args.proxy_reduce is not None and args.on_proxyv is None:
            raise ValueError("--proxy-reduce applies to --op proxyv, or to a reduction with --on-proxyv L")
        return _reduction_options(args)
    if args.learned_proxies is not None and (args.op != "proxyv" or args.proxy_init != "learned"):
        raise ValueError("--learned-proxies applies to --op proxyv --proxy-init learned only")
    if args.op != "proxyv":
        given = [flag for flag, value in (("--proxy-reduce", args.proxy_reduce), ("--proxy-init", args.proxy_init))
                 if value is not None and args.on_proxyv is None]
        if given:
            raise ValueError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} to --op proxyv "
                             f"only, not --op {args.op}")
        if args.op == "visionzip":
            return _visionzip_options(args)
        args.newline_as = args.newline_as or "vision"
        return {}
    if args.newline_as == "vision":
        raise ValueError("ProxyV computes newline tokens as text; drop --newline-as vision")
    args.newline_as = "text"
    learned = {"learned_proxies": args.learned_proxies} if args.learned_proxies else {}
    return {"reduce_factor": DEFAULT_REDUCE_FACTOR if args.proxy_reduce is None else args.proxy_reduce,
            "init": args.proxy_init or DEFAULT_INIT, **learned}


def _reduction_options(args) -> dict:
    """FastV's / PyramidDrop's options: ``keep`` and (PyramidDrop) the boundaries as ``layers``."""
    args.newline_as = args.newline_as or "vision"
    options = {} if args.keep is None else {"keep": args.keep}
    if args.layers is not None:
        if args.op != "pdrop":
            raise ValueError(f"--layers gives PyramidDrop's stage boundaries; --op {args.op} prunes from --start-layer K")
        try:
            options["layers"] = [int(k) for k in args.layers.split(",")]
        except ValueError:
            raise ValueError(f"--layers takes comma-separated layer indices (e.g. 8,16,24), got {args.layers!r}") from None
    if args.op == "pdrop" and (args.start_layer is not None or args.end_layer is not None):
        raise ValueError("--op pdrop takes its stage boundaries as --layers K1,K2,..., not --start-layer / --end-layer")
    if args.op == "fastv" and args.start_layer is None:
        raise ValueError("--op fastv needs --start-layer K (it ranks with layer K-1 and prunes from layer K)")
    return options


def _visionzip_options(args) -> dict:
    """VisionZip's ``dominant`` / ``contextual`` (the family's defaults where not given); no layers."""
    if args.start_layer is not None or args.end_layer is not None:
        raise ValueError("--op visionzip merges vision tokens before the LLM; it takes no --start-layer / --end-layer")
    if args.newline_as == "text":
        raise ValueError("--op visionzip keeps or drops LLaVA-NeXT newline tokens as image tokens; drop --newline-as text")
    args.newline_as = "vision"
    from ..variant import family_of

    defaults = family_of("visionzip").methods()["visionzip"]
    return {"dominant": defaults["dominant"] if args.dominant is None else args.dominant,
            "contextual": defaults["contextual"] if args.contextual is None else args.contextual}


def _shortened(config, tokens: PrefillTokens, op: str, options: dict) -> dict:
    """VisionZip's shortened decoder sequence (one sample) and the baseline's vision figure, else {}."""
    if op != "visionzip":
        return {}
    from .dims import TextDims

    counted = make_variant(op, TextDims.from_config(config).layers, **options).with_config(config)
    short = counted.shortened(tokens)
    vision = int((short.vision & short.valid).sum())
    return {"dominant": options["dominant"], "contextual": options["contextual"],
            "shortened": {"seq_len": short.seq_len, "vision": vision, "text": int(short.valid.sum()) - vision},
            "baseline_vision_flops": vision_flops(config, tokens.crops)}


def _vision_detail(report: FlopsReport) -> str:
    """VisionZip's split of the vision figure (tower, its selection / merge, projector), else ""."""
    parts = report.vision_parts
    if not parts:
        return ""
    if "merger" in parts:  # Qwen-VL
        deepstack = f", deepstack mergers {parts['deepstack'] / 1e12:.4f}" if parts["deepstack"] else ""
        return f"  (tower {parts['tower'] / 1e12:.4f}, merger {parts['merger'] / 1e12:.4f}{deepstack})"
    return (f"  (tower {parts['tower'] / 1e12:.4f}, visionzip selection + merge {parts['visionzip'] / 1e12:.4f}, "
            f"projector {parts['projector'] / 1e12:.4f})")


def _stages(config, tokens: PrefillTokens, op: str, layers, start, end, options) -> list[dict]:
    """Token reduction's stages (first / last layer, rows and vision rows of the one sample), else []."""
    if op not in REDUCTION_METHODS:
        return []
    from .dims import TextDims

    depth = TextDims.from_config(config).layers
    counted = make_variant(op, depth, layers, start_layer=start, end_layer=end, **options)
    options.setdefault("keep", counted.keep)
    if not counted.active(tokens):
        return []
    stages = counted.schedule(tokens).stages
    ends = [first - 1 for first, _ in stages[1:]] + [depth - 1]
    return [{"first_layer": first, "last_layer": last, "rows": sum(rows.alive), "vision": sum(rows.vision)}
            for (first, rows), last in zip(stages, ends)]


def _on_proxyv(args, options: dict) -> dict:
    """``--on-proxyv L``: the reduction's ``proxyv`` parameter and the FLOPs extra ``proxyv_settings`` (learned)."""
    if args.on_proxyv is None:
        return {}
    if args.op not in (*REDUCTION_METHODS, "visionzip"):
        raise ValueError(f"--on-proxyv applies to --op {' / '.join(REDUCTION_METHODS)} / visionzip, not --op {args.op}")
    if args.proxy_init not in (None, "learned"):
        raise ValueError(f"token reduction runs on ProxyV models with learned proxies only; drop --proxy-init "
                         f"{args.proxy_init}")
    if args.op != "visionzip" and args.newline_as == "vision" and args.newline_tokens:
        raise ValueError("on a ProxyV model, newline tokens are text (ProxyV's cells are the patches): drop "
                         "--newline-as vision")
    options["proxyv"] = args.on_proxyv
    return {"proxyv_settings": {"start_layer": args.on_proxyv, "reduce_factor": args.proxy_reduce or DEFAULT_REDUCE_FACTOR,
                                "init": "learned", "light_width": 0}}


def _proxy_flags(options: dict) -> dict:
    """ProxyV's options under their command-line names (for the JSON and the table title)."""
    return {"proxy_reduce": options["reduce_factor"], "proxy_init": options["init"]} if "init" in options else {}


def _reduction_flags(options: dict, stages: list[dict]) -> dict:
    """Token reduction's keep and stages (for the JSON)."""
    return {"keep": options["keep"], "stages": stages} if "keep" in options else {}


def _span(layers: tuple[int, ...]) -> str:
    if not layers:
        return "none"
    if list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}"
    return ",".join(map(str, layers))
