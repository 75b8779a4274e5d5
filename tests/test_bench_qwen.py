"""The long-video benchmark (analysis/bench_qwen.py) at a toy shape on the CPU: every variant runs, the decoder is
timed inside the whole call, and the FLOPs columns are the analytic counts. No timing is asserted."""

from __future__ import annotations

from argparse import Namespace

import pytest

from analysis.bench_qwen import run, table


def options(**over):
    base = dict(config="qwen2.5-vl-7b", layers=2, width=256, vision_depth=1, blocks=2, side=8, text=8, start_layer=1,
                reduce_factor=4, repeats=1, warmup=0, device="cpu", dtype="float32", attn="sdpa", profile=None)
    return Namespace(**{**base, **over})


def test_every_variant_runs_and_the_flops_are_the_analytic_ones(tmp_path):
    meta, rows = run(options(profile=tmp_path))
    assert [r["variant"] for r in rows] == ["none", "skip_attn-L1", "skip_ffn-L1", "skip_attn_ffn-L1", "proxyv-L1"]
    assert meta["vision_tokens"] == 2 * 4 * 4 and meta["prompt_tokens"] == 32 + 8 + 2 and meta["proxies"] == 2
    by = {r["variant"]: r for r in rows}
    assert by["none"]["flops_saved"] == 0 and by["none"]["decoder_flops_saved"] == 0
    for name in ("skip_attn-L1", "skip_ffn-L1", "skip_attn_ffn-L1", "proxyv-L1"):
        assert 0 < by[name]["decoder_flops_saved"] < 1 and 0 < by[name]["flops_saved"] < by[name]["decoder_flops_saved"]
    assert by["skip_attn_ffn-L1"]["decoder_flops"] < by["skip_ffn-L1"]["decoder_flops"]
    for r in rows:
        assert 0 < r["decoder_median_s"] < r["median_s"]  # the decoder is timed inside the whole call
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile_none.txt", "profile_proxyv.txt",
                                                          "profile_skip_ffn.txt"]
    assert "proxyv-L1" in table(meta, rows)


def test_bad_options_are_one_line():
    with pytest.raises(ValueError, match="^--config qwen3-vl-8b is qwen3_vl; this benchmark builds Qwen2-VL"):
        run(options(config="qwen3-vl-8b"))
    with pytest.raises(ValueError, match="^--width 200 must be a multiple of the head width 128"):
        run(options(width=200))
