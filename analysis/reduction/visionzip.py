"""VisionZip (pre-LLM dominant + contextual token merging), executed as docs/reduction.md specifies.

    with ablate(model, "visionzip", dominant=54, contextual=10) as z:   # 64 tokens per LLaVA-1.5 image
        model.generate(**batch)                                         # LLaVA-NeXT: 64 per crop

Two per-instance attachments, removed in ``finally``:

* ``core.get_image_features`` (the instance attribute) runs the CLIP tower, selects and merges on the
  feature layer's hidden states (:func:`zip_image`), then the projector: every LLaVA-1.5 image gives D + C
  features; every LLaVA-NeXT image gives ``crops * (D + C)``: its base crop's D + C, then each high-res
  crop's, in the order the tower encodes them (no ``image_newline`` token, no unpadding).
* a forward pre-hook on the core shortens the call: per sample, per image, the first D + C (LLaVA-NeXT:
  ``crops * (D + C)``, the image's span and crops from :func:`analysis.layout.compute_layout`) of the
  image's placeholder positions stay and the rest are dropped from ``input_ids`` / ``attention_mask`` /
  ``position_ids`` (kept positions renumbered: minus the dropped positions before them). Decode steps
  (``generate()`` extends the mask it was given) get the same shortening of their attention mask and
  position ids, so the LLM sees contiguous positions and its KV cache holds only the kept tokens.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..layout import compute_layout
from ..models import llava_core, patch_instance
from .rules import check_on_proxyv

FILLER_ID = 0  # input id of the filler slots a shortened batch may need (attention mask 0)


class VisionZip:
    """The state of one ``visionzip`` block (what the block yields).

    Attributes:
        dominant, contextual: D (CLS included) and C.
        tokens_per_image: D + C, the image tokens the LLM sees per image (LLaVA-NeXT: per crop).
        selected: after an image encoding, per encoded crop (LLaVA-1.5: per image; LLaVA-NeXT: every crop of
            every image in the tower's order, base crop first) the tower indices (0 = CLS) of the kept tokens.
        targets: per encoded crop the tower indices of the C contextual targets, in order.
        crops: after an image encoding, per image the number of crops encoded (LLaVA-1.5: 1).
        kept_positions: after a prefill with images, (B, T') the original sequence index of every slot of the
            shortened call (-1: a filler slot, attention mask 0).
    """

    def __init__(self, core, dominant: int, contextual: int):
        self.core = core
        self.dominant, self.contextual = dominant, contextual
        self.tokens_per_image = dominant + contextual
        config = core.config
        vision = config.vision_config
        self.patches = (vision.image_size // vision.patch_size) ** 2
        self.anyres = config.model_type == "llava_next"
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise NotImplementedError(f"visionzip: vision_feature_select_strategy {strategy!r} is not supported")
        # image tokens the processor writes per LLaVA-1.5 image (LLaVA-NeXT: per image from the layout)
        self.placeholders = self.patches + (strategy == "full")
        self.image_token_id = config.image_token_id
        self.selected: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.crops: list[int] = []
        self.prefill_crops: list[int] = []  # crops per image of the last shortened prefill, in batch order
        self._image_sizes = None  # LLaVA-NeXT: the image_sizes of the last encoding (generate() drops them)
        self.kept_positions: torch.Tensor | None = None
        self._orig_len = self._short_len = None
        self._dropped: torch.Tensor | None = None  # (B,) positions dropped per sample

    # ------------------------------------------------------------------ the image encoder

    def feature_layer(self, vision_feature_layer) -> int:
        layer = self.core.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise NotImplementedError(f"visionzip: one vision feature layer is supported, got {layer!r}")
        depth = len(self.core.vision_tower.encoder.layers)
        index = layer % (depth + 1)
        if index == 0:
            raise ValueError("visionzip: the feature layer is the embedding output; it needs a tower layer's attention")
        return index

    def get_image_features(self, *args, **kwargs):
        """The core's ``get_image_features`` under the block (LLaVA-NeXT passes ``image_sizes`` second)."""
        if self.anyres:
            return self.encode_anyres(*args, **kwargs)
        return self.encode(*args, **kwargs)

    def encode(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, image_sizes=None,
               **kwargs):
        """``get_image_features`` of the block: tower, selection and merge, projector; one (D + C, d) per image."""
        if image_sizes is not None:
            raise ValueError("visionzip: image_sizes is not supported (fixed-size CLIP tower of LLaVA-1.5)")
        out, features = self._zip_crops(pixel_values, vision_feature_layer)
        self.crops = [1] * len(features)
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states,
                                          pooler_output=list(features))

    def encode_anyres(self, pixel_values, image_sizes=None, vision_feature_layer=None,
                      vision_feature_select_strategy=None, **kwargs):
        """LLaVA-NeXT's ``get_image_features`` under the block: each image's crops sliced from ``pixel_values``
        as HF does (``image_size_to_num_patches``), every crop zipped to D + C tokens, the projector; per image
        (crops * (D + C), d): [base crop, high-res crop 1, 2, ...], no newline token, no unpadding."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        if image_sizes is None:
            raise ValueError("visionzip on LLaVA-NeXT needs image_sizes (the processor returns them with the batch)")
        config = self.core.config
        crops = [image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                           patch_size=config.vision_config.image_size) for size in image_sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pixels[:n] for pixels, n in zip(pixel_values, crops, strict=True)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}, expected 4 or 5 dimensions")
        if pixel_values.shape[0] != sum(crops):
            raise ValueError(f"visionzip: pixel_values hold {pixel_values.shape[0]} crops, image_sizes imply "
                             f"{sum(crops)} ({crops})")
        out, features = self._zip_crops(pixel_values, vision_feature_layer)
        self.crops = crops
        self._image_sizes = torch.as_tensor(image_sizes).tolist()
        per_image = [f.reshape(-1, f.shape[-1]) for f in torch.split(features, crops, dim=0)]
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states,
                                          pooler_output=per_image)

    def _zip_crops(self, pixel_values, vision_feature_layer):
        """The tower on (n, 3, S, S) crops, :func:`zip_image` on each, the projector: (n, D + C, d_text)."""
        tower = self.core.vision_tower
        index = self.feature_layer(vision_feature_layer)
        out = tower(pixel_values, output_hidden_states=True, return_dict=True)
        merged, selected, targets = zip_image(tower.encoder.layers[index - 1], out.hidden_states[index - 1],
                                              out.hidden_states[index], self.dominant, self.contextual)
        self.selected, self.targets = list(selected), list(targets)
        return out, self.core.multi_modal_projector(merged)

    # ------------------------------------------------------------------ the shortened call

    def pre_hook(self, module, args, kwargs):
        if len(args) > 1 or (args and "input_ids" in kwargs):
            raise ValueError("visionzip: pass the core's arguments other than input_ids by keyword")
        if args:  # LLaVA-NeXT's generation class passes input_ids positionally
            kwargs = {**kwargs, "input_ids": args[0]}
            args = ()
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("visionzip locates image tokens from input_ids; call the model with input_ids "
                             "(as the processor returns them), not inputs_embeds")
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError("visionzip supports 2-D (batch, seq) attention masks only")
        images = kwargs.get("pixel_values") is not None or (kwargs.get("mm_encoder_outputs") or {}).get("image") \
            is not None
        if past == 0:
            self._orig_len = self._dropped = self.kept_positions = None
            if images and bool((input_ids == self.image_token_id).any()):
                return args, self._shorten_prefill(kwargs, input_ids, mask)
            return None
        if images:
            raise NotImplementedError("visionzip: images after the prefill are not supported (start a new prefill)")
        if self._orig_len is None:
            return None  # a prefill without images: nothing was shortened
        t = input_ids.shape[1]
        if cache is None or past < self._short_len or (mask is not None and
                                                       mask.shape[1] != self._orig_len + past - self._short_len + t):
            raise RuntimeError("visionzip: the KV cache is not the one this block built; build the cache (prefill, "
                               "with use_cache) inside the same `with ablate(...)` block")
        kwargs = dict(kwargs)
        if mask is not None:
            kept = self.kept_positions.clamp(min=0)
            head = torch.gather(mask[:, :self._orig_len], 1, kept) * (self.kept_positions >= 0)
            kwargs["attention_mask"] = torch.cat([head.to(mask.dtype), mask[:, self._orig_len:]], dim=1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] - self._dropped[:, None].to(kwargs["position_ids"].dtype)
        return args, kwargs

    def _kept_tokens(self, kwargs, input_ids, mask):
        """(B, T) bool: the positions the shortened call keeps (text, and per image its first K placeholders)."""
        K, P = self.tokens_per_image, self.placeholders
        image = input_ids == self.image_token_id
        if not self.anyres:
            occurrence = image.long().cumsum(dim=1) - 1  # index of each image token among the sample's image tokens
            counts = image.sum(dim=1)
            if bool((counts % P != 0).any()):
                raise ValueError(f"visionzip: a sample has {counts.tolist()} image tokens, not a multiple of the "
                                 f"{P} placeholders of one image")
            self.prefill_crops = [1] * int(counts.sum() // P)
            return ~image | (occurrence % P < K)
        image_sizes = kwargs.get("image_sizes")
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if kwargs.get("pixel_values") is None:  # generate() encoded the images and dropped image_sizes
            if encoded is None or self._image_sizes is None:
                raise ValueError("visionzip on LLaVA-NeXT: image features without image_sizes; encode them inside "
                                 "the block (generate() does) or pass image_sizes")
            image_sizes = self._image_sizes if image_sizes is None else image_sizes
        layout = compute_layout(input_ids, self.core.config, mask, image_sizes)
        sizes = torch.as_tensor(image_sizes).tolist()
        self.prefill_crops = [len(img.crops) for sample in layout.samples for img in sample.images]
        keep = ~image
        index = 0
        for b, sample in enumerate(layout.samples):
            for i, img in enumerate(sample.images):
                crops, placeholders = len(img.crops), img.end - img.start
                if crops * K > placeholders:
                    raise ValueError(
                        f"visionzip: image {i} of sample {b} (size {sizes[index]}) has {crops} crops x (dominant + "
                        f"contextual = {K}) = {crops * K} tokens, more than its {placeholders} placeholder positions; "
                        f"the sequence can only be shortened (lower dominant + contextual to at most "
                        f"{placeholders // crops})")
                keep[b, img.start:img.start + crops * K] = True
                index += 1
        if encoded is not None:  # features encoded before this call: they must be the ones of this layout
            expected = [len(img.crops) * K for sample in layout.samples for img in sample.images]
            got = [len(f) for f in encoded.pooler_output]
            if got != expected:
                raise RuntimeError(f"visionzip: the image features hold {got} tokens per image, the layout needs "
                                   f"{expected}; encode the images inside the same `with ablate(...)` block")
        return keep

    def _shorten_prefill(self, kwargs, input_ids, mask):
        B, T = input_ids.shape
        keep = self._kept_tokens(kwargs, input_ids, mask)
        dropped = (~keep).sum(dim=1)
        length = T - dropped
        width = int(length.max())
        right_padded = mask is not None and bool((mask[:, -1] == 0).any())
        slots = torch.full((B, width), -1, dtype=torch.long, device=input_ids.device)
        for b in range(B):
            where = keep[b].nonzero().flatten()
            start = 0 if right_padded else width - len(where)
            slots[b, start:start + len(where)] = where
        valid_slot = slots >= 0
        index = slots.clamp(min=0)
        kwargs = dict(kwargs)
        kwargs["input_ids"] = torch.where(valid_slot, torch.gather(input_ids, 1, index), FILLER_ID)
        if mask is not None:
            kwargs["attention_mask"] = (torch.gather(mask, 1, index) * valid_slot).to(mask.dtype)
        elif not bool(valid_slot.all()):
            kwargs["attention_mask"] = valid_slot.long()  # fillers must not be attended
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            before = (~keep).long().cumsum(dim=1)  # dropped positions up to and including each index
            renumbered = position_ids.expand(B, T) - before.to(position_ids.dtype)
            kwargs["position_ids"] = torch.where(valid_slot, torch.gather(renumbered, 1, index), 0)
        self._orig_len, self._short_len, self._dropped = T, width, dropped
        self.kept_positions = slots
        return kwargs

    def proxyv_layout(self, input_ids, config, attention_mask=None, image_sizes=None):
        """The token layout of a shortened chunk for a ProxyV model's plan (``ProxyV.host``): every crop's D + C
        tokens are the first D + C cells, row-major, of a crop grid whose other cells are removed -- the merged
        tokens have no place on the patch grid, so only learned proxies use them (docs/reduction.md)."""
        from ..layout import BatchLayout, CropGrid, ImageLayout, SampleLayout

        B = input_ids.shape[0]
        device = input_ids.device
        image = input_ids == self.image_token_id
        valid = torch.ones_like(image) if attention_mask is None else attention_mask.to(device).bool()
        side, K = int(self.patches ** 0.5), self.tokens_per_image
        crops = iter(self.prefill_crops)
        empty = torch.zeros(0, dtype=torch.long, device=device)
        samples = []
        for b in range(B):
            positions, images, cursor = image[b].nonzero().flatten(), [], 0
            while cursor < len(positions):
                n = next(crops)
                tokens = positions[cursor:cursor + n * K]
                grids = []
                for c in range(n):
                    grid = torch.full((side * side,), -1, dtype=torch.long, device=device)
                    grid[:K] = tokens[c * K:(c + 1) * K]
                    grids.append(CropGrid("base" if c == 0 else "highres", grid.view(side, side)))
                images.append(ImageLayout(int(tokens[0]), int(tokens[-1]) + 1, tuple(grids), empty))
                cursor += n * K
            samples.append(SampleLayout(tuple(images), positions, empty, (valid[b] & ~image[b]).nonzero().flatten(),
                                        (~valid[b]).nonzero().flatten()))
        return BatchLayout(tuple(samples), image, torch.zeros_like(image), valid)

    def release(self):
        self.core = None
        self._dropped = None


def zip_image(layer, layer_input, hidden, dominant: int, contextual: int):
    """VisionZip on a batch of images. ``layer``: the CLIP encoder layer that produces the feature layer;
    ``layer_input`` / ``hidden``: (I, N + 1, d) its input and output (the feature layer's hidden states,
    CLS first). Returns ((I, D + C, d) the merged tokens [CLS, dominant in index order, contextual],
    (I, D) the kept tower indices, (I, C) the targets' tower indices)."""
    attn = layer.self_attn
    I, N1, _ = hidden.shape
    heads, hd = attn.num_heads, attn.head_dim
    x = layer.layer_norm1(layer_input)
    keys = attn.k_proj(x).view(I, N1, heads, hd)
    query = attn.q_proj(x[:, :1]).view(I, 1, heads, hd)
    scores = torch.einsum("iqhd,ikhd->ihqk", query, keys)[:, :, 0] * attn.scale  # (I, H, N + 1): the CLS row
    cls_attention = scores.softmax(dim=-1)[:, :, 1:].sum(dim=1)  # (I, N): post-softmax, summed over heads
    order = torch.sort(cls_attention, dim=1, descending=True, stable=True).indices  # ties: lower index first
    patches = torch.sort(order[:, :dominant - 1], dim=1).values + 1
    selected = torch.cat([patches.new_zeros(I, 1), patches], dim=1)  # (I, D)
    parts = [torch.gather(hidden, 1, selected[:, :, None].expand(-1, -1, hidden.shape[-1]))]
    rest_mask = torch.ones(I, N1, dtype=torch.bool, device=hidden.device)
    rest_mask.scatter_(1, selected, False)
    n = N1 - dominant
    rest = torch.arange(N1, device=hidden.device).expand(I, N1)[rest_mask].view(I, n)  # (I, n) in index order
    targets = rest[:, :0]
    if contextual > 0:
        step = max(1, n // contextual)
        at = torch.arange(0, n, step, device=hidden.device)[:contextual]  # list positions of the targets
        others = torch.ones(n, dtype=torch.bool, device=hidden.device)
        others[at] = False
        metric = torch.gather(keys.mean(dim=2), 1, rest[:, :, None].expand(-1, -1, hd))  # (I, n, hd)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        similarity = metric[:, others] @ metric[:, at].transpose(1, 2)  # (I, n - C, C) cosine
        assign = similarity.argmax(dim=2)  # ties: the first target
        rest_hidden = torch.gather(hidden, 1, rest[:, :, None].expand(-1, -1, hidden.shape[-1]))
        one_hot = torch.nn.functional.one_hot(assign, contextual).to(hidden.dtype)  # (I, n - C, C)
        counts = one_hot.sum(dim=1).clamp(min=1)[:, :, None]
        merged = one_hot.transpose(1, 2) @ rest_hidden[:, others] / counts
        parts.append(rest_hidden[:, at] + merged)
        targets = rest[:, at]
    return torch.cat(parts, dim=1), selected, targets


def _check(core, dominant: int, contextual: int) -> None:
    config = core.config
    if config.model_type not in ("llava", "llava_next"):
        raise NotImplementedError(f"visionzip runs LLaVA-1.5 and LLaVA-NeXT, got model_type {config.model_type!r}")
    if config.model_type == "llava_next" and config.vision_feature_select_strategy != "default":
        raise NotImplementedError("visionzip on LLaVA-NeXT supports vision_feature_select_strategy 'default' only "
                                  f"(got {config.vision_feature_select_strategy!r})")
    proxyv = getattr(core, "proxyv", None)
    if proxyv is not None:
        check_on_proxyv("visionzip", proxyv.settings.start_layer, init=proxyv.settings.init)
        side = config.vision_config.image_size // config.vision_config.patch_size
        if dominant + contextual > side * side:
            raise ValueError(f"visionzip on a ProxyV model: dominant + contextual = {dominant + contextual} exceeds "
                             f"the {side * side} cells of a crop its learned proxies attend over")
    tower = core.vision_tower
    embeddings = getattr(tower, "embeddings", None)
    if getattr(embeddings, "class_embedding", None) is None or not hasattr(tower, "encoder"):
        raise NotImplementedError(
            f"visionzip needs a vision tower with a CLS token (CLIP): its CLS attention row picks the dominant "
            f"tokens; {type(tower).__name__} ({config.vision_config.model_type}) has none. VisionZip's fallback for "
            f"such towers (dominance = the mean attention a token receives) is not implemented; fastv or pdrop "
            f"rank with the LLM's attention and run on any tower (docs/reduction.md, VisionZip)")
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    placeholders = patches + (config.vision_feature_select_strategy == "full")
    if dominant + contextual > patches + 1:
        unit = "a crop" if config.model_type == "llava_next" else "an image"
        raise ValueError(f"visionzip: dominant + contextual = {dominant + contextual} exceeds the {patches} patches "
                         f"+ CLS of {unit}")
    if config.model_type == "llava_next":
        return  # the placeholders per image depend on its size: checked per image at the prefill
    if dominant + contextual > placeholders:
        raise ValueError(f"visionzip: dominant + contextual = {dominant + contextual} exceeds the {placeholders} "
                         f"image tokens per image (vision_feature_select_strategy "
                         f"{config.vision_feature_select_strategy!r}); the sequence can only be shortened")


@contextlib.contextmanager
def visionzip_context(model, variant, newline_tokens: str = "vision"):
    """The execution of the ``visionzip`` variant of the reduction family; yields the block's :class:`VisionZip`.
    ``newline_tokens`` is accepted for the family's common signature (no image_newline token reaches the LLM:
    LLaVA-1.5 has none and VisionZip's LLaVA-NeXT features drop them)."""
    if getattr(variant, "family", None) != "reduction" or variant.method != "visionzip":
        raise ValueError(f"visionzip_context runs the reduction family's visionzip, got {variant!r}")
    from .runtime import check_model

    core = llava_core(model)
    dominant, contextual = variant.options["dominant"], variant.options["contextual"]
    proxyv = getattr(core, "proxyv", None)
    check_model(proxyv, variant)
    _check(core, dominant, contextual)
    state = VisionZip(core, dominant, contextual)
    undo = []
    try:
        original = core.get_image_features

        @functools.wraps(original)  # generate() picks the encoder's arguments by the original's signature
        def get_image_features(*args, **kwargs):
            return state.get_image_features(*args, **kwargs)

        undo.append(patch_instance(core, "get_image_features", get_image_features))
        # before a ProxyV model's own pre-hook: it plans its proxies over the shortened call (learned proxies)
        undo.append(core.register_forward_pre_hook(state.pre_hook, with_kwargs=True, prepend=True).remove)
        if proxyv is not None:
            proxyv.host = state
            undo.append(functools.partial(setattr, proxyv, "host", None))
        yield state
    finally:
        for step in reversed(undo):
            step()
        state.release()
