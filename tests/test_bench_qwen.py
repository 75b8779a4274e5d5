"""The long-video benchmark (analysis/bench_qwen.py) at a toy shape on the CPU: every variant runs, the decoder is
timed inside the whole call, and the FLOPs columns are the analytic counts. No timing is asserted."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.video_utils import VideoMetadata

from analysis import tiny_qwen
from analysis.bench_qwen import STAMP_TOKENS, build_batch, build_config, run, table
from analysis.flops import PrefillTokens, count_flops
from analysis.layout_qwen import layout_of_batch

# The profiler tables of a run with --profile: one per variant, the controls included
PROFILES = ["profile_none.txt", "profile_proxyv.txt", "profile_proxyv_sdpa_gqa.txt", "profile_skip_attn.txt",
            "profile_skip_attn_ffn.txt", "profile_skip_attn_ffn_hf_norm.txt", "profile_skip_attn_ffn_sdpa_gqa.txt",
            "profile_skip_ffn.txt"]


def options(**over):
    base = dict(config="qwen2.5-vl-7b", layers=2, width=256, vision_depth=1, blocks=2, side=8, text=8, start_layer=1,
                reduce_factor=4, repeats=1, warmup=0, device="cpu", dtype="float32", attn="sdpa", vision_attn=None,
                profile=None)
    return Namespace(**{**base, **over})


def test_every_variant_runs_and_the_flops_are_the_analytic_ones(tmp_path):
    meta, rows = run(options(profile=tmp_path))
    assert [r["variant"] for r in rows] == ["none", "skip_attn-L1", "skip_ffn-L1", "skip_attn_ffn-L1",
                                            "skip_attn_ffn-L1 HF norm", "proxyv-L1", "skip_attn_ffn-L1 SDPA GQA",
                                            "proxyv-L1 SDPA GQA"]
    assert meta["vision_tokens"] == 2 * 4 * 4 and meta["prompt_tokens"] == 32 + 8 + 2 and meta["proxies"] == 2
    by = {r["variant"]: r for r in rows}
    assert by["none"]["flops_saved"] == 0 and by["none"]["decoder_flops_saved"] == 0
    for name in ("skip_attn-L1", "skip_ffn-L1", "skip_attn_ffn-L1", "proxyv-L1"):
        assert 0 < by[name]["decoder_flops_saved"] < 1 and 0 < by[name]["flops_saved"] < by[name]["decoder_flops_saved"]
    assert by["skip_attn_ffn-L1"]["decoder_flops"] < by["skip_ffn-L1"]["decoder_flops"]
    for control, base in (("skip_attn_ffn-L1 HF norm", "skip_attn_ffn-L1"), ("skip_attn_ffn-L1 SDPA GQA",
                                                                            "skip_attn_ffn-L1"),
                          ("proxyv-L1 SDPA GQA", "proxyv-L1")):  # controls: the same computation, timed
        assert by[control]["decoder_flops"] == by[base]["decoder_flops"]
    # over allowed pairs only (the causal triangle), skipping vision queries' attention saves less, skipping their
    # FFN a larger share: the two counts bracket what the kernels do
    assert by["skip_attn-L1"]["decoder_pairs_flops_saved"] < by["skip_attn-L1"]["decoder_flops_saved"]
    assert by["skip_ffn-L1"]["decoder_pairs_flops_saved"] > by["skip_ffn-L1"]["decoder_flops_saved"]
    for r in rows:
        assert 0 < r["decoder_median_s"] < r["median_s"]  # the decoder is timed inside the whole call
        assert 0 < r["tower_median_s"] < r["median_s"] - r["decoder_median_s"]  # so is the tower, before it
        assert r["layer_host_reads"] == {"count": 0, "where": []}  # no variant's layer stalls the launch queue
    assert sorted(p.name for p in tmp_path.iterdir()) == PROFILES
    ffn = (tmp_path / "profile_skip_ffn.txt").read_text()  # the decoder alone: the tower's operators are absent
    assert ffn.startswith("skip_ffn: decoder span") and "aten::linear" in ffn and "conv3d" not in ffn
    assert "proxyv-L1" in table(meta, rows)


def test_the_tower_on_its_own_backend():
    """--vision-attn: the tower on another backend than the decoder's (on a GPU: flash_attention_2, one varlen call
    per block instead of one call per window); here eager against sdpa, said in the table's first line."""
    meta, rows = run(options(vision_attn="eager"))
    assert (meta["attn"], meta["vision_attn"]) == ("sdpa", "eager") and len(rows) == 8
    assert "float32 sdpa (tower: eager) on CPU" in table(meta, rows).splitlines()[0]
    assert "(tower:" not in table(*run(options()))
    with pytest.raises(ValueError, match="^vision_attn_implementation='flash_attention_2' "):
        run(options(vision_attn="flash_attention_2"))  # no flash-attn here, nor a CUDA GPU


def qwen3(**over):
    """A toy Qwen3-VL-8B: 4 layers, 3 tower blocks (DeepStack taps 8, 16, 24 of 27 become 0, 1, 2), ProxyV at 3."""
    return options(**{**dict(config="qwen3-vl-8b", layers=4, vision_depth=3, blocks=3, start_layer=3), **over})


def test_qwen3_every_variant_runs_and_the_prompt_holds_the_timestamps():
    meta, rows = run(qwen3())
    assert [r["variant"] for r in rows] == ["none", "skip_attn-L3", "skip_ffn-L3", "skip_attn_ffn-L3",
                                            "skip_attn_ffn-L3 HF norm", "proxyv-L3", "skip_attn_ffn-L3 SDPA GQA",
                                            "proxyv-L3 SDPA GQA"]
    # 3 blocks of 4x4 merged tokens; per block a 6-token timestamp, <|vision_start|>, <|vision_end|>; the outer
    # <|vision_start|> / <|vision_end|> of the chat template; 8 text tokens
    assert meta["vision_tokens"] == 3 * 16 and meta["prompt_tokens"] == 8 + 2 + 3 * (6 + 2) + 3 * 16
    assert meta["stamp_tokens"] == STAMP_TOKENS == 6 and meta["proxies"] == 3
    config = build_config(qwen3())
    assert config.vision_config.deepstack_visual_indexes == [0, 1, 2]
    batch, _ = build_batch(config, qwen3())
    assert "second_per_grid_ts" not in batch
    assert torch.equal(batch["mm_token_type_ids"] == 2, batch["input_ids"] == config.video_token_id)
    tokens = PrefillTokens.from_batch(batch, config)
    by = {r["variant"]: r for r in rows}
    for name, op in (("none", "none"), ("skip_attn-L3", "skip_attn"), ("skip_ffn-L3", "skip_ffn"),
                     ("skip_attn_ffn-L3", "skip_attn_ffn")):
        report = count_flops(config, tokens, op, start_layer=3, lm_head="last")
        assert by[name]["flops"] == report.total + report.lm_head + report.vision
        assert by[name]["decoder_flops"] == report.total
        assert by[name]["decoder_pairs_flops_saved"] == 1 - report.theoretical / report.theoretical_baseline
    # the timestamps and per-block start / end tokens are counted: the same prompt, counted from its token numbers
    counts = PrefillTokens.from_qwen_counts(config, video_grids=[(3, 8, 8)], text_tokens=8 + 2 + 3 * (6 + 2))
    assert by["none"]["decoder_flops"] == count_flops(config, counts, lm_head="last").total
    assert 0 < by["proxyv-L3"]["decoder_flops_saved"] < 1


def _classes(input_ids, config):
    """Each token as pad / start / end / other, from the first <|vision_start|> to the last <|vision_end|>."""
    names = {config.video_token_id: "pad", config.vision_start_token_id: "start", config.vision_end_token_id: "end"}
    ids = input_ids[0].tolist()
    first = ids.index(config.vision_start_token_id)
    last = len(ids) - ids[::-1].index(config.vision_end_token_id)
    return [names.get(i, "other") for i in ids[first:last]]


def test_qwen3_video_is_laid_out_as_the_real_processor_lays_it_out():
    """The tiny Qwen3-VL processor on 6 frames of 32x32 px: 3 blocks of 8x8 patches (4 px), as --blocks 3 --side 8.
    Its tokenizer spells a timestamp by characters, so the bench batch is built with that many stamp tokens."""
    processor = tiny_qwen.build_processor("qwen3_vl")
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text",
                                                                                             "text": "hi"}]}],
                                           add_generation_prompt=True)
    frames = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    metadata = VideoMetadata(total_num_frames=6, fps=2.0, frames_indices=list(range(6)))
    real = processor(text=[prompt], videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                     return_tensors="pt")
    real_config = tiny_qwen.build_config("qwen3_vl")
    config = build_config(qwen3())
    batch, _ = build_batch(config, qwen3(), stamp_tokens=len("<0.2 seconds>"))
    assert batch["video_grid_thw"].tolist() == real["video_grid_thw"].tolist() == [[3, 8, 8]]
    assert _classes(batch["input_ids"], config) == _classes(real["input_ids"], real_config)
    ours, theirs = (layout_of_batch(b, c).samples[0].videos[0] for b, c in ((batch, config), (real, real_config)))
    offset = ours.start - theirs.start
    assert [(a - offset, b - offset) for a, b in ours.block_spans] == list(theirs.block_spans)
    assert len(theirs.block_spans) == 3 and not ours.contiguous


def test_bad_options_are_one_line():
    with pytest.raises(ValueError, match="^--config llava-1.5-7b is llava; this benchmark builds Qwen2-VL"):
        run(options(config="llava-1.5-7b"))
    with pytest.raises(ValueError, match="^--width 200 must be a multiple of the head width 128"):
        run(options(width=200))
    with pytest.raises(ValueError, match=r"^--vision-depth 2 is too shallow for the config's DeepStack taps "
                                         r"\[8, 16, 24\] of 27 blocks \(they become \[0, 1, 1\]\)$"):
        run(qwen3(vision_depth=2))
    with pytest.raises(ValueError, match="^start_layer=2: Qwen3-VL's DeepStack adds vision features"):
        run(qwen3(start_layer=-1))  # half of 4 layers: before the DeepStack layers 0..2


def test_the_device_script_runs_both_shapes_and_packs_the_profiles(tmp_path):
    """scripts/device_qwen_bench.sh (the prepared GPU call of item 6) at its CPU smoke shape: both configs' tables,
    the Qwen2.5-VL profiler tables in one archive, the machine notes."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "device_qwen_bench.sh"
    done = subprocess.run(["bash", str(script), str(tmp_path), "--smoke"], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "machine.txt", "profile_qwen2.5-vl-7b.tar.gz", "run_qwen2.5-vl-7b.json", "run_qwen2.5-vl-7b.txt",
        "run_qwen3-vl-8b.json", "run_qwen3-vl-8b.txt"]
    for config in ("qwen2.5-vl-7b", "qwen3-vl-8b"):
        result = json.loads((tmp_path / f"run_{config}.json").read_text())
        assert result["meta"]["config"] == config
        variants = [r["variant"] for r in result["rows"]]
        assert variants[3:5] == ["skip_attn_ffn-L3", "skip_attn_ffn-L3 HF norm"]
        assert variants[6:] == ["skip_attn_ffn-L3 SDPA GQA", "proxyv-L3 SDPA GQA"]
    notes = (tmp_path / "machine.txt").read_text()
    repo = script.parents[1]
    files = sorted((str(f.relative_to(repo)) for d in ("analysis", "experiments", "scripts")
                    for f in (repo / d).rglob("*") if f.is_file() and f.suffix in (".py", ".sh", ".json")),
                   key=lambda name: name.encode())
    listing = "".join(f"{hashlib.sha1((repo / f).read_bytes()).hexdigest()}  {f}\n" for f in files)
    assert f"\ncode {hashlib.sha1(listing.encode()).hexdigest()[:12]}\n" in notes  # the code that ran, by content
    assert re.search(r"^qwen2\.5-vl-7b start \d\d:\d\d:\d\d\ntower on flash_attention_2: skipped \(flash-attn not "
                     r"importable, or a smoke run\)\nqwen3-vl-8b start .*\nend ", notes, re.M), notes
    with tarfile.open(tmp_path / "profile_qwen2.5-vl-7b.tar.gz") as archive:
        names = sorted(Path(n).name for n in archive.getnames() if n.endswith(".txt"))
    assert names == PROFILES


@pytest.mark.parametrize("variant", ["skip_attn_ffn_sdpa_gqa", "proxyv_sdpa_gqa"])
def test_the_sdpa_gqa_controls_compute_the_same_on_sdpas_own_gqa(monkeypatch, variant):
    """The SDPA GQA rows: the variant's explicit-mask attention gets SDPA's own GQA (the key / value heads not
    repeated) and the logits of its base variant; the switch is gone after the block."""
    from analysis import bench_qwen
    from analysis.models import vlm_generation_class
    from analysis.proxyv import apply_proxyv

    args = options(layers=3, start_layer=1, width=1024)  # 8 query heads over the shipped config's 4 key heads
    config = build_config(args)
    batch, _ = build_batch(config, args)
    torch.manual_seed(0)
    model = vlm_generation_class(config.model_type)._from_config(config, attn_implementation="sdpa").eval()
    base = bench_qwen.SDPA_GQA[variant]
    if base == "proxyv":
        model = apply_proxyv(model, 1, 4, seed=0)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        calls.append((attn_mask is not None, query.shape[1], key.shape[1], kwargs.get("enable_gqa", False)))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    logits = {}
    for name in (base, variant):
        calls.clear()
        with torch.no_grad(), bench_qwen.variant_context(model, name, 1):
            logits[name] = model(**batch, logits_to_keep=1).logits
        masked = [c for c in calls if c[0]]  # the explicit-mask calls: the variant's layers (HF's are causal)
        heads = config.text_config.num_attention_heads, config.text_config.num_key_value_heads
        assert heads == (8, 4)
        assert len(masked) == 2, (name, calls)  # layers 1 and 2: the variant's layers
        if name == variant:
            assert all(c[1:] == (*heads, True) for c in masked), calls
        else:
            assert all(c[1:] == (heads[0], heads[0], False) for c in masked), calls
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    assert (logits[variant] - logits[base]).abs().max() < 1e-5
