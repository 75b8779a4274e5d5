"""The long-video GPU figures in docs/qwen.md (the current code's two tables) and in the README's Qwen-VL sentence are
those of the committed result files (docs/results/bench_qwen_video/run{6,7,8}_*_h200.json, three calls on one H200),
cell by cell: medians over the calls, each call's ratios as listed. A figure typed by hand, or a result file changed
without the docs, fails here. Nothing is timed."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs/results/bench_qwen_video"
CALLS = (6, 7, 8)
SHAPES = {"qwen2.5-vl-7b": "**Qwen2.5-VL-7B shape**", "qwen3-vl-8b": "**Qwen3-VL-8B shape**"}
NAMES = {"none": "baseline", "skip_attn": "skip_attn", "skip_ffn": "skip_ffn", "skip_attn_ffn": "skip_attn_ffn",
         "skip_attn_ffn HF norm": "skip_attn_ffn, HF norm (control)", "proxyv": "ProxyV"}


def calls(config: str) -> list[list[dict]]:
    """Each call's rows of ``config``, the variants in the same order in every call."""
    runs = [json.loads((RESULTS / f"run{n}_{config}_h200.json").read_text())["rows"] for n in CALLS]
    assert len({tuple(r["variant"] for r in rows) for rows in runs}) == 1
    return runs


def base_of(variant: str) -> str:
    """A row label without its start layer: ``skip_ffn-L14`` -> ``skip_ffn``."""
    return re.sub(r"-L\d+", "", variant)


def name_of(variant: str) -> str:
    return NAMES[base_of(variant)]


def docs_table(config: str) -> dict[str, list[str]]:
    """The first table after the shape's heading in docs/qwen.md (the current code's): variant -> its cells."""
    lines = (REPO / "docs/qwen.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(SHAPES[config]))
    rows = {}
    for line in lines[start + 4:]:
        if not line.startswith("|"):
            break
        cells = [c.strip().replace("*", "") for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def median(rows_per_call: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows_per_call)


@pytest.mark.parametrize("config", list(SHAPES))
def test_docs_tables_are_the_result_files(config):
    runs = calls(config)
    table = docs_table(config)
    assert list(table) == [name_of(r["variant"]) for r in runs[0]]
    for i, row in enumerate(runs[0]):
        per_call = [rows[i] for rows in runs]
        cells = table[name_of(row["variant"])]
        assert cells[0] == f"{median(per_call, 'median_s'):.3f}", row["variant"]
        assert cells[1] == f"{median(per_call, 'tower_median_s'):.3f}", row["variant"]
        assert cells[2] == f"{median(per_call, 'decoder_median_s'):.4f}", row["variant"]
        assert cells[7] == f"{median(per_call, 'peak_extra_mib'):,.0f}", row["variant"]
        assert cells[8] == str(max(r["layer_host_reads"]["count"] for r in per_call)), row["variant"]
        if row["variant"] == "none":
            assert cells[3:7] == ["-"] * 4
            continue
        flops = f"{median(per_call, 'decoder_flops_saved'):.1%} / {median(per_call, 'decoder_pairs_flops_saved'):.1%}"
        assert cells[3] == flops, row["variant"]
        assert cells[4] == f"{median(per_call, 'decoder_time_saved'):.1%}", row["variant"]
        assert cells[5] == " / ".join(f"{r['decoder_saved_ratio']:.2f}" for r in per_call), row["variant"]
        assert cells[6] == " / ".join(f"{r['decoder_pairs_saved_ratio']:.2f}" for r in per_call), row["variant"]


def test_readme_sentence_is_the_result_files():
    text = " ".join((REPO / "README.md").read_text().split())

    def percent(config: str, variant: str) -> str:
        runs = calls(config)
        i = next(k for k, r in enumerate(runs[0]) if base_of(r["variant"]) == variant)
        return f"{median([rows[i] for rows in runs], 'decoder_saved_ratio'):.0%}"

    q25, q3 = "qwen2.5-vl-7b", "qwen3-vl-8b"
    expected = (f"the decoder turns {percent(q25, 'skip_ffn')} of `skip_ffn`'s FLOPs saving into time on the "
                f"Qwen2.5-VL-7B shape ({percent(q3, 'skip_ffn')} on Qwen3-VL-8B), {percent(q25, 'skip_attn_ffn')} / "
                f"{percent(q3, 'skip_attn_ffn')} of `skip_attn_ffn`'s and {percent(q25, 'proxyv')} / "
                f"{percent(q3, 'proxyv')} of ProxyV's")
    assert expected in text
    baseline = [rows[0] for rows in calls(q25)]
    tower = statistics.median(r["tower_median_s"] / r["median_s"] for r in baseline)
    assert f"is {tower:.0%} of that prefill" in text


def test_docs_attention_table_is_the_result_files():
    """docs/qwen.md's few-query attention table: µs per call and, in brackets, the time relative to hf_sdpa."""
    lines = (REPO / "docs/qwen.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| way | Qwen2.5-VL-7B heads"))
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[tuple(re.findall(r"`(\w+)`", cells[0].split(":")[0]))] = cells[1:]
    columns = [(config, shape) for config in ("qwen2.5-vl-7b", "qwen3-vl-8b") for shape in ("text_rows", "proxyv")]
    rows = {config: {(r["shape"], r["method"]): r for r in
                     json.loads((RESULTS / f"attention_{config}_h200.json").read_text())["rows"]}
            for config in ("qwen2.5-vl-7b", "qwen3-vl-8b")}
    assert sorted(m for ms in table for m in ms) == sorted({m for _, m in rows["qwen2.5-vl-7b"]})
    for methods, cells in table.items():
        for (config, shape), cell in zip(columns, cells, strict=True):
            found = [rows[config][shape, m] for m in methods]
            expected = " / ".join(f"{r['median_s'] * 1e6:,.0f}" for r in found)
            if len(found) == 1 and methods[0] != "hf_sdpa":
                expected += f" ({found[0]['vs_hf_sdpa']:.2f})"
            assert cell == expected, (methods, config, shape)
