"""The lmms-eval model class: any HF LLaVA / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint with an
ablation op applied.

    lmms-eval --model llava_ablate \
        --model_args pretrained=checkpoints/tiny-llava,op=skip_ffn,start_layer=12 \
        --tasks synth_ocrbench --include_path analysis/twins/tasks

Registered through our package's ``lmms_eval.models`` entry point (``analysis/lmms_manifest.py``).
Plays the role of lmms-eval's ``llava_hf`` except:

* generation is batched (left padding, requests sorted by prompt length);
* the variant -- one :class:`analysis.variant.Variant`: an operator on chosen decoder layers
  (:func:`analysis.ablation.ablate`) or a trained ProxyV checkpoint, optionally blind (every image
  blanked) -- is executed by its family around each batch, so the loaded model is never modified;
  :meth:`LlavaAblate.set_variant` switches variants between evaluations;
* a bad ``--model_args`` ends ``lmms-eval`` with one line and a non-zero exit;
* the device is chosen per process (``cuda:LOCAL_RANK`` under torchrun / accelerate), so
  data-parallel runs place one replica per GPU;
* :meth:`clean` keeps the model (lmms-eval's default deletes every module after each evaluation);
* Qwen-VL checkpoints (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
  ``Qwen3VLForConditionalGeneration``; docs/qwen.md, "Runner and plugin") take the same path: the processor's
  chat template writes ``<|vision_start|><|image_pad|><|vision_end|>`` per image, the processor sizes each image
  within ``min_pixels`` / ``max_pixels`` (model_args; default: the checkpoint's), the batch carries
  ``image_grid_thw`` instead of ``image_sizes``, and the prompt shapes add the ``vision_grids`` the tower's FLOPs
  need. The six operators, FastV, PyramidDrop (``positions='original'``) and ProxyV checkpoints run on them;
  VisionZip is a one-line error (no CLS token);
* videos: a task's ``doc_to_visual`` may give video file paths (as lmms-eval's video tasks do). On a Qwen-VL
  checkpoint each is decoded and sampled (``fps``, ``max_num_frames``: :mod:`analysis.video_input`) and passed to
  the processor as a ``<|video_pad|>`` part in the visuals' order; a LLaVA checkpoint refuses them in one line;
* it records what the runner needs beside the scores: the token shapes of every prompt (for
  FLOPs: :func:`analysis.flops.mean_flops`) and a few prompts to time the prefill on (:meth:`prefill_latency`).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from pathlib import Path

import torch
from lmms_eval.api.model import lmms
from lmms_eval.utils import Collator
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoProcessor

from .layout import compute_layout
from .models import (QWEN_VL_CLASSES, attn_implementations, pick_device, qwen_params, qwen_runs, qwen_unsupported,
                     vlm_generation_class)
from .variant import Variant, family, family_of, resolve_variant
from .video_input import DEFAULT_FPS, DEFAULT_MAX_FRAMES, Video, check_sampling, read_video

IMAGE_TOKEN = "<image>"


def _method_params(op) -> dict:
    """The parameters ``op``'s method declares ({} for an unknown op: its own error comes later)."""
    try:
        return dict(family_of(op).methods()[op])
    except (ValueError, TypeError, KeyError):
        return {}


def _one_line(error: Exception) -> str:
    return f"llava_ablate: {str(error).strip().splitlines()[0]}"


def _kind(visual) -> str:
    return "video" if isinstance(visual, Video) else "image"


def pick_dtype(dtype, device: torch.device, config=None) -> torch.dtype:
    """``"auto"``: float32 on CPU; on GPU the checkpoint's dtype, or bfloat16 when it says float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "", "auto"):
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    saved = getattr(torch, saved) if isinstance(saved, str) else saved
    return saved if saved in (torch.float16, torch.bfloat16) else torch.bfloat16


def is_qwen_vl_config(config) -> bool:
    """Whether ``config`` is a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint's (:data:`analysis.models.QWEN_VL_CLASSES`)."""
    return getattr(config, "model_type", None) in QWEN_VL_CLASSES


def load_llava(path: str | Path, device=None, dtype="auto", attn_implementation: str = "sdpa",
               min_pixels: int | None = None, max_pixels: int | None = None,
               vision_attn_implementation: str | None = None):
    """(model, processor) of a saved LLaVA / LLaVA-NeXT / Qwen-VL checkpoint (a directory or a hub id already in
    the HF cache; a ProxyV checkpoint loads with its ProxyV modules), in eval mode on ``device``, the
    processor padding on the left. ``min_pixels`` / ``max_pixels``: a Qwen-VL processor's resizing bounds per
    image (None: the checkpoint's ``preprocessor_config.json``); refused for LLaVA. ``vision_attn_implementation``:
    the vision tower's own attention backend (None: ``attn_implementation``; see
    :func:`analysis.models.attn_implementations`)."""
    device = pick_device(device)
    implementation = attn_implementations(attn_implementation, vision_attn_implementation, device.type)
    config = AutoConfig.from_pretrained(path)
    qwen = is_qwen_vl_config(config)
    pixels = {k: int(v) for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    if pixels and not qwen:
        raise ValueError(f"{', '.join(pixels)} apply to Qwen-VL processors only, not to model_type {config.model_type!r}")
    model_class = vlm_generation_class(config.model_type, str(path))
    kwargs = dict(dtype=pick_dtype(dtype, device, config), attn_implementation=implementation)
    if device.type == "cuda":  # load the weights straight onto this process's GPU, not through CPU memory
        kwargs["device_map"] = {"": device}
    if getattr(config, "proxyv", None):  # saved by a ProxyV model: the HF class + ProxyV modules + their weights
        from .proxyv import load_proxyv

        model = load_proxyv(path, **kwargs)
    else:
        model = model_class.from_pretrained(path, **kwargs)
    processor = AutoProcessor.from_pretrained(path)
    if pixels:  # smart_resize's bounds: the image processor's size (transformers 5 spells them so)
        size = dict(processor.image_processor.size)
        size.update({"shortest_edge": pixels["min_pixels"]} if "min_pixels" in pixels else {})
        size.update({"longest_edge": pixels["max_pixels"]} if "max_pixels" in pixels else {})
        processor.image_processor.size = {k: size[k] for k in ("shortest_edge", "longest_edge")}
    processor.tokenizer.padding_side = "left"
    return model.to(device).eval(), processor


class LlavaAblate(lmms):
    """lmms-eval ``simple`` model wrapping a HF LLaVA checkpoint and an ablation variant.

    Args (all reachable from ``--model_args``):
        pretrained: checkpoint directory or hub id (resolved offline from the HF cache).
        op, start_layer, end_layer, layers, and the method's parameters (e.g. ``keep=0.5`` for ``op=fastv``):
            the variant (see :func:`analysis.ablation.ablate`); ``layers`` is a
            space- or ``;``-separated list of indices when given as a string.
        blind: replace every image with a blank one (the blind control).
        newline_tokens: LLaVA-NeXT newline tokens treated as ``"vision"`` (default) or ``"text"``.
        min_pixels, max_pixels: a Qwen-VL processor's bounds on each image's pixels (None: the checkpoint's).
        fps, max_num_frames: how a video is sampled (frames per second of video, at most this many; Qwen-VL).
        batch_size, device, dtype, attn_implementation: as usual; ``device="auto"`` picks
            ``cuda:LOCAL_RANK`` when CUDA is available.
        vision_attn_implementation: the vision tower's attention backend, when it should differ from the language
            model's (e.g. ``flash_attention_2`` for Qwen2.5-VL's windowed tower; the decoder stays eager / sdpa).
        max_new_tokens: default when a task's generation_kwargs do not set it.
        model, processor: an already loaded pair (the runner passes these; ``pretrained`` is then a label).
    """

    is_simple = True

    def __init__(self, pretrained: str | None = None, op: str = "none", start_layer: int | None = None,
                 end_layer: int | None = None, layers=None, blind: bool = False, newline_tokens: str = "vision",
                 batch_size: int = 8, device: str | None = None, dtype: str = "auto",
                 attn_implementation: str = "sdpa", max_new_tokens: int = 32, progress: bool = True,
                 model=None, processor=None, min_pixels: int | None = None, max_pixels: int | None = None,
                 fps: float | None = None, max_num_frames: int | None = None,
                 vision_attn_implementation: str | None = None, **kwargs) -> None:
        super().__init__()
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k != "max_batch_size"}
        declared = _method_params(op)  # e.g. keep=0.5 for op=fastv
        unknown = sorted(set(kwargs) - set(declared))
        if unknown:
            raise TypeError(f"llava_ablate: unknown model_args {unknown}"
                            + (f" (op={op} takes {', '.join(sorted(declared))})" if declared else ""))
        if model is None:
            if pretrained is None:
                raise ValueError("llava_ablate needs pretrained=PATH (a saved LLaVA or Qwen-VL checkpoint)")
            model, processor = load_llava(pretrained, device, dtype, attn_implementation, min_pixels, max_pixels,
                                          vision_attn_implementation)
        self._model, self.processor = model, processor
        self.qwen = is_qwen_vl_config(model.config)  # a Qwen-VL model: grids, no image_sizes, fewer methods
        self.processor.tokenizer.padding_side = "left"
        self.pretrained = None if pretrained is None else str(pretrained)  # None: a model passed in memory
        self._device = next(model.parameters()).device
        self.batch_size_per_gpu = int(batch_size or 1)
        self.max_new_tokens = int(max_new_tokens)
        self.newline_tokens = newline_tokens
        self.progress = progress
        self.cli = False  # True when lmms-eval's CLI built it (create_from_arg_string)
        self.fps = float(DEFAULT_FPS if fps is None else fps)
        self.max_num_frames = int(DEFAULT_MAX_FRAMES if max_num_frames is None else max_num_frames)
        check_sampling(self.fps, self.max_num_frames)  # bad values fail here, in one line
        self.num_layers = model.config.text_config.num_hidden_layers
        self.set_variant(op, start_layer=start_layer, end_layer=end_layer, layers=layers, blind=blind, **kwargs)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lmms-eval's constructor: a bad ``--model_args`` ends the process with one line and a non-zero exit
        (lmms-eval would print a traceback and exit 0)."""
        try:
            lm = super().create_from_arg_string(arg_string, additional_config)
        except (ValueError, TypeError, OSError) as error:
            raise SystemExit(_one_line(error)) from None
        lm.cli = True  # a task's unusable visuals end the process in one line too (see generate_until)
        return lm

    # ----------------------------------------------------------------- what lmms-eval reads
    @property
    def model(self):
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def clean(self) -> None:
        """Keep the model: one loaded model serves every variant of a sweep (lmms-eval's default deletes it)."""
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    # ----------------------------------------------------------------- variant and bookkeeping
    def set_variant(self, op: str | Variant = "none", start_layer=None, end_layer=None, layers=None,
                    blind: bool = False, **params) -> Variant:
        """Switch the variant for the next evaluation (a :class:`~analysis.variant.Variant`, or an op name, its
        layers and its parameters) and reset the recorded prompt shapes and timing prompts. A ProxyV
        checkpoint is its own variant: ``op`` "none" or "proxyv" gives that variant."""
        if not isinstance(op, Variant):
            if isinstance(layers, str):
                layers = [int(i) for i in layers.replace(";", " ").replace(":", " ").split()]
            op = self._resolve(op, start_layer, end_layer, layers, bool(blind), params)
        if self.qwen and not qwen_runs(op.method, op.family):
            raise ValueError(qwen_unsupported(op.method, self._model.config.model_type))
        self.variant = op
        family(op.family).load("execute")  # an execution that cannot import fails here, not mid-evaluation
        self.prompt_shapes: list[dict] = []  # one per generated request, in request order of arrival
        self.timing_prompts: list[tuple[str, list]] = []  # (prompt, visuals) of the first requests
        return self.variant

    def _resolve(self, op: str, start_layer, end_layer, layers, blind: bool, params: dict) -> Variant:
        if self.qwen:  # before resolving: a refused method's parameters are not the point on Qwen-VL
            if not qwen_runs(op, family_of(op).name):
                raise ValueError(qwen_unsupported(op, self._model.config.model_type))
            params = qwen_params(op, params)  # pdrop: positions='original' (M-RoPE), renumber refused
        settings = getattr(self._model.config, "proxyv", None)
        if op == "proxyv" and not settings:
            raise ValueError(f"op=proxyv runs a trained ProxyV checkpoint; {self.pretrained} is not one (load one "
                             "saved by a ProxyV model: pretrained=<its directory>)")
        if settings and op in family("reduction").methods():  # token reduction on the ProxyV checkpoint
            if params.get("proxyv") not in (None, settings["start_layer"]):
                raise ValueError(f"{self.pretrained} is a ProxyV checkpoint starting at layer {settings['start_layer']}, "
                                 f"not proxyv={params['proxyv']}")
            params = {**params, "proxyv": settings["start_layer"]}
            return resolve_variant(op, self.num_layers, start_layer=start_layer, end_layer=end_layer, layers=layers,
                                   params=params, blind=blind, checkpoint=self.pretrained)
        if settings:  # the loaded model is a trained ProxyV checkpoint
            if op not in ("none", "proxyv"):
                raise ValueError(f"{self.pretrained} is a ProxyV checkpoint: use op=none, op=proxyv or a token "
                                 f"reduction (fastv, pdrop, visionzip), not op={op}")
            params = family_of("proxyv").checkpoint_params("proxyv", settings)
            return resolve_variant("proxyv", self.num_layers, start_layer=settings["start_layer"], params=params,
                                   blind=blind, checkpoint=self.pretrained)
        return resolve_variant(op, self.num_layers, start_layer=start_layer, end_layer=end_layer, layers=layers,
                               params=params, blind=blind)

    def variant_context(self):
        """The context in which the model computes the current variant (its family's execution)."""
        return family(self.variant.family).load("execute")(self._model, self.variant,
                                                           newline_tokens=self.newline_tokens)

    def _prompt(self, context: str, visuals: list) -> str:
        """The chat-formatted prompt for ``visuals`` (a list of images and :class:`~analysis.video_input.Video` s);
        the visuals go first, as LLaVA was trained (and as lmms-eval's Qwen-VL models place them). Qwen-VL: always
        the processor's chat template, which writes each image as ``<|vision_start|><|image_pad|><|vision_end|>``
        and each video with ``<|video_pad|>``, in the visuals' order (a LLaVA ``<image>`` in the context is
        dropped)."""
        kinds = [_kind(v) for v in visuals]
        if self.qwen:
            content = [{"type": kind} for kind in kinds]
            content.append({"type": "text", "text": context.replace(IMAGE_TOKEN, "").strip()})
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True)
        n_images = len(kinds)
        if IMAGE_TOKEN in context:
            n_images = 0
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True)
        return f"USER: {(IMAGE_TOKEN + chr(10)) * n_images}{context} ASSISTANT:"

    def _visuals(self, doc_to_visual, doc) -> list:
        """The doc's visuals in order: PIL images as RGB, video file paths read into
        :class:`~analysis.video_input.Video` s (Qwen-VL only); all blanked under the blind control."""
        from PIL import Image

        from .twins.blind import blank_image  # light; imported here to keep this module's import lean

        try:
            given = doc_to_visual(doc) or []
        except SystemExit as stop:  # lmms-eval's video tasks sys.exit() on a missing file: a recordable error here
            raise FileNotFoundError(f"the task's doc_to_visual stopped: {stop.code}") from None
        visuals = []
        for visual in given:
            if isinstance(visual, Image.Image):
                visuals.append(blank_image(visual.convert("RGB")) if self.variant.blind else visual.convert("RGB"))
            elif isinstance(visual, (str, Path)):
                if not self.qwen:
                    raise ValueError(f"this task gives videos ({visual}); {self._model.config.model_type} checkpoints "
                                     "take images only (videos run on Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints)")
                video = read_video(visual, self.fps, self.max_num_frames)
                visuals.append(video.blanked() if self.variant.blind else video)
            elif visual is not None:
                raise TypeError(f"doc_to_visual gave a {type(visual).__name__}; llava_ablate takes PIL images and "
                                "video file paths")
        return visuals

    def encode(self, prompts: list[str], visuals: list[list]) -> dict:
        """A left-padded model batch of ``prompts`` with their ``visuals`` (per prompt, images and
        :class:`~analysis.video_input.Video` s): ``input_ids``/``attention_mask`` (B, T), ``pixel_values``
        (+ ``image_sizes``; Qwen-VL: + ``image_grid_thw``, ``mm_token_type_ids``; videos: ``pixel_values_videos``,
        ``video_grid_thw``, and Qwen2.5-VL's ``second_per_grid_ts``)."""
        flat = [v for sample in visuals for v in sample]
        images = [v for v in flat if not isinstance(v, Video)]
        videos = [v for v in flat if isinstance(v, Video)]
        kwargs = {}
        if videos:  # frames already sampled: the processor keeps them and dates them from the metadata
            kwargs = {"videos": [v.frames for v in videos], "video_metadata": [v.metadata() for v in videos],
                      "do_sample_frames": False}
        batch = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True, **kwargs)
        batch = batch.to(self._device)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in batch:
                batch[key] = batch[key].to(self._model.dtype)
        return batch

    def _record_prompt_shapes(self, batch) -> None:
        """Per sample, what its FLOPs depend on: ``mask`` ("v"/"t" per attended position: vision or not, as
        the op sees it), ``crop_shapes`` (patch grid of every crop), and token counts."""
        config = self._model.config
        if self.qwen:
            return self._record_qwen_prompt_shapes(batch)
        sizes = batch.get("image_sizes")
        layout = compute_layout(batch["input_ids"], config, batch["attention_mask"], sizes)
        proxyv = getattr(config, "proxyv", None)
        # ProxyV computes newline tokens as text, and its FLOPs need its exact (unpadded AnyRes) shapes
        vision = layout.vision_mask("text" if proxyv else self.newline_tokens).cpu()
        valid = layout.valid_mask.cpu()
        first = 0  # images of the earlier samples in the batch
        for b, sample in enumerate(layout.samples):
            mask = "".join("v" if v else "t" for v in vision[b][valid[b]].tolist())
            record = {
                "mask": mask, "crop_shapes": tuple(c.shape for image in sample.images for c in image.crops),
                "vision": int(sample.vision.numel()), "newline": int(sample.newline.numel()),
                "text": int(sample.text.numel()),
            }
            n_images = len(sample.images)
            if proxyv:
                from .proxyv import proxyv_shapes

                ids = batch["input_ids"][b:b + 1, layout.valid_mask[b]]
                record["proxyv_shapes"] = proxyv_shapes(
                    config, ids, None, sizes[first:first + n_images] if sizes is not None else None)
            first += n_images
            self.prompt_shapes.append(record)

    def _record_qwen_prompt_shapes(self, batch) -> None:
        """Qwen-VL: ``mask`` (image and video pad tokens are vision), ``crop_shapes`` (merged ``(h, w)`` of each
        temporal block: an image, or two frames of a video), ``vision_grids`` (the ``(t, h, w)`` patch grid of each
        image / video the tower runs on: its FLOPs), token counts (``newline`` is 0: Qwen has none)."""
        from .layout_qwen import layout_of_batch

        layout = layout_of_batch(batch, self._model.config)
        vision = layout.vision_mask().cpu()
        valid = layout.valid_mask.cpu()
        for b, sample in enumerate(layout.samples):
            n_vision = int(vision[b][valid[b]].sum())
            self.prompt_shapes.append({
                "mask": "".join("v" if v else "t" for v in vision[b][valid[b]].tolist()),
                "crop_shapes": tuple(tuple(block.shape) for grid in sample.grids for block in grid.blocks),
                "vision_grids": tuple(tuple(int(x) for x in grid.grid_thw) for grid in sample.grids),
                "vision": n_vision, "newline": 0, "text": int(valid[b].sum()) - n_vision,
            })

    def _record_kept_vision(self, state, batch) -> None:
        """Token reduction on a ProxyV model: add to each prompt's shapes the vision tokens the execution kept at
        ProxyV's start (``kept_vision``: indices into the prompt's unpadded tokens), so that its FLOPs count the
        crops / blocks that really keep a cell (the ranking may empty a whole image or video block; without them the
        count assumes every crop keeps one: :mod:`analysis.flops.proxyv_reduction`)."""
        kept = getattr(state, "kept_vision", None)
        if not (kept and getattr(self._model.config, "proxyv", None)):
            return
        mask = batch["attention_mask"].cpu()
        rank = mask.long().cumsum(1) - 1  # padded position -> index among the sample's real tokens
        records = self.prompt_shapes[-mask.shape[0]:]
        for b, (record, positions) in enumerate(zip(records, kept[-1])):
            record["kept_vision"] = rank[b, positions.cpu()].tolist()

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Greedy answers for every request, in request order; batched by equal generation settings."""
        args = [r.args for r in requests]
        collator = Collator(args, lambda a: (-len(a[0]), a[0]), grouping=True)  # grouped by gen_kwargs
        answers = []
        bar = tqdm(total=len(args), desc=f"eval {self.variant}", disable=not self.progress or self.rank != 0,
                   leave=False, dynamic_ncols=True)
        for chunk in collator.get_batched(n=self.batch_size_per_gpu):
            contexts, gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            try:
                visuals = [self._visuals(fn, self.task_dict[t][s][i])
                           for fn, i, t, s in zip(doc_to_visual, doc_ids, tasks, splits)]
            except (ValueError, TypeError, OSError) as error:
                bar.close()
                if self.cli:  # lmms-eval's CLI prints a traceback for an Exception and exits 0
                    raise SystemExit(_one_line(error)) from None
                raise  # the runner records it as the run's error
            prompts = [self._prompt(c, v) for c, v in zip(contexts, visuals)]
            if len(self.timing_prompts) < 16:
                self.timing_prompts += list(zip(prompts, visuals))[:16 - len(self.timing_prompts)]
            answers += self._generate(prompts, visuals, dict(gen_kwargs[0]))
            bar.update(len(chunk))
        bar.close()
        return collator.get_original(answers)

    def _generate(self, prompts: list[str], visuals: list[list], gen_kwargs: dict) -> list[str]:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        batch = self.encode(prompts, visuals)
        self._record_prompt_shapes(batch)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        tokenizer = self.processor.tokenizer
        settings = dict(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
            do_sample=temperature > 0, num_beams=int(gen_kwargs.get("num_beams", 1) or 1),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        if temperature > 0:
            settings.update(temperature=temperature, top_p=gen_kwargs.get("top_p"))
        with self.variant_context() as state:
            out = self._model.generate(**batch, **settings)  # (B, T + new)
        self._record_kept_vision(state, batch)
        texts = self.processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for stop in until:
            texts = [t.split(stop)[0] if stop else t for t in texts]
        return texts

    @torch.no_grad()
    def prefill_latency(self, prompts: int = 4, repeats: int = 5, warmup: int = 2) -> dict | None:
        """Prefill wall time (ms) of one prompt at batch 1 under the current variant, robust to a shared
        machine: ``warmup`` untimed forwards, then ``repeats`` rounds over the first ``prompts`` evaluated
        prompts (interleaved, so a burst of load hits every prompt alike). Returns the median, quartiles,
        min and max over every timed forward, with ``n``, the torch thread count and the 1-minute load
        average beside the CPU count; None if nothing was evaluated."""
        chosen = self.timing_prompts[:prompts]
        if not chosen:
            return None
        times = []
        with self.variant_context():
            batches = [self.encode([prompt], [visuals]) for prompt, visuals in chosen]
            for _ in range(warmup):
                self._model(**batches[0], use_cache=False, logits_to_keep=1)
            for _ in range(repeats):
                for batch in batches:
                    self._sync()
                    start = time.perf_counter()
                    self._model(**batch, use_cache=False, logits_to_keep=1)
                    self._sync()
                    times.append(1000 * (time.perf_counter() - start))
        q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
        return {"median_ms": statistics.median(times), "q1_ms": q1, "q3_ms": q3, "min_ms": min(times),
                "max_ms": max(times), "n": len(times), "warmup": warmup, "threads": torch.get_num_threads(),
                "load_1min": os.getloadavg()[0], "cpus": os.cpu_count(), "device": self._device_name()}

    def _device_name(self) -> str:
        """Where the timings ran: ``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
        if self._device.type != "cuda":
            return self._device.type
        return f"{self._device} ({torch.cuda.get_device_name(self._device)})"

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def loglikelihood(self, requests):
        raise NotImplementedError("llava_ablate supports generation tasks (generate_until) only")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("llava_ablate supports single-round generation only")

