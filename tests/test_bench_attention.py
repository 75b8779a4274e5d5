"""The few-query attention benchmark (analysis/bench_attention.py): its masks are the rules they name, and every way it
times computes the same attention as a plain per-head, per-row loop written here. No timing is asserted."""

import json
import math

import pytest
import torch

from analysis import bench_attention as ba

PREFIX, VISION, SUFFIX, PROXIES = 3, 11, 4, 5


def loop_attention(q, k, v, allowed, scale):
    """Float64, one head and one query row at a time; query head h reads key head h // (H / Hkv)."""
    B, H, Nq, hd = q.shape
    groups = H // k.shape[1]
    out = torch.zeros(B, H, Nq, hd, dtype=torch.float64)
    for h in range(H):
        for r in range(Nq):
            keys = [j for j in range(k.shape[2]) if allowed[r, j]]
            scores = torch.tensor([float(q[0, h, r].double() @ k[0, h // groups, j].double()) * scale for j in keys])
            weights = torch.softmax(scores, 0)
            out[0, h, r] = sum(w * v[0, h // groups, j].double() for w, j in zip(weights, keys))
    return out


def test_text_rows_mask_is_each_row_reading_every_key_up_to_itself():
    shape = ba.text_rows(PREFIX, VISION, SUFFIX)
    T = PREFIX + VISION + SUFFIX
    positions = list(range(PREFIX)) + list(range(T - SUFFIX, T))
    expected = [[key <= pos for key in range(T)] for pos in positions]
    assert shape.allowed.tolist() == expected


def test_proxyv_mask_follows_the_proxy_plan_rule():
    shape = ba.proxyv_rows(PREFIX, VISION, SUFFIX, PROXIES)
    T = PREFIX + VISION + SUFFIX
    text_positions = list(range(PREFIX)) + list(range(T - SUFFIX, T))
    expected = []
    for i in range(PROXIES):  # the text before the video, then the proxies up to itself; never a vision key
        expected.append([key < PREFIX for key in range(T)] + [j <= i for j in range(PROXIES)])
    for pos in text_positions:  # every prompt key up to itself, no proxy
        expected.append([key <= pos for key in range(T)] + [False] * PROXIES)
    assert shape.allowed.tolist() == expected


@pytest.mark.parametrize("make", [lambda: ba.text_rows(PREFIX, VISION, SUFFIX),
                                  lambda: ba.proxyv_rows(PREFIX, VISION, SUFFIX, PROXIES)], ids=["text_rows", "proxyv"])
def test_every_method_computes_the_loop_attention(make):
    shape = make()
    Nq, Nk = shape.allowed.shape
    g = torch.Generator().manual_seed(3)
    H, Hkv, hd = 6, 2, 8
    q, k, v = torch.randn(1, H, Nq, hd, generator=g), torch.randn(1, Hkv, Nk, hd, generator=g), \
        torch.randn(1, Hkv, Nk, hd, generator=g)
    truth = loop_attention(q, k, v, shape.allowed, hd ** -0.5)
    assert (ba.reference(q, k, v, shape.allowed, hd ** -0.5).double() - truth).abs().max() < 1e-5
    checked = []
    for name, attend in ba.methods(shape).items():
        try:
            out = attend(q, k, v, shape.allowed, hd ** -0.5)
        except RuntimeError:  # cuDNN / memory-efficient SDPA do not run on the CPU
            assert name in ("sdpa_cudnn", "sdpa_efficient"), name
            continue
        assert out.shape == (1, H, Nq, hd), name
        assert (out.double() - truth).abs().max() < 1e-5, name
        checked.append(name)
    assert checked == ["hf_sdpa", "sdpa_math", "sdpa_gqa", "eager_grouped", "flash_pieces"]


def test_cli_prints_and_writes_every_method_of_both_shapes(tmp_path, capsys):
    from experiments.bench_attention import main

    out = tmp_path / "attention.json"
    main(["--config", "qwen2.5-vl-7b", "--prefix", "2", "--vision", "9", "--suffix", "3", "--proxies", "4",
          "--repeats", "1", "--warmup", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "28 query heads, 4 key heads of 128" in printed  # the shipped config's heads
    result = json.loads(out.read_text())
    rows = {(r["shape"], r["method"]): r for r in result["rows"]}
    for shape, (queries, keys) in {"text_rows": (5, 14), "proxyv": (9, 18)}.items():
        for method in ("hf_sdpa", "sdpa_math", "sdpa_gqa", "eager_grouped", "flash_pieces"):
            row = rows[shape, method]
            assert (row["queries"], row["keys"]) == (queries, keys)
            assert row["max_abs_diff"] < 1e-5 and row["median_s"] > 0 and math.isfinite(row["vs_hf_sdpa"])
        assert rows[shape, "hf_sdpa"]["vs_hf_sdpa"] == 1.0
        assert "error" in rows[shape, "sdpa_cudnn"]  # refused on the CPU, said so rather than timed


def test_cli_refuses_an_empty_part_in_one_line(capsys):
    from experiments.bench_attention import main

    with pytest.raises(SystemExit) as exit_:
        main(["--vision", "0"])
    assert exit_.value.code == 2
    assert "--vision must be at least 1" in capsys.readouterr().err
