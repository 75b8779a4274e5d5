"""FLOPs of token reduction (analysis.flops.reduction): hand-computed cases, the published FastV figure, the
CLI, and analytic == torch's counter on the real forward of tiny LLaVA-1.5 / LLaVA-NeXT models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import MULTI, PAIR, make_batch, model_for

from analysis.ablation import ablate
from analysis.flops import (
    PrefillTokens,
    TextDims,
    count_flops,
    load_config,
    main,
    mean_flops,
)
from analysis.flops.measure import _module_names, _split, by_module, torch_flop_counter
from analysis.flops.reduction import fastv_kept, pdrop_kept
from analysis.flops.variants import reduction_flops
from analysis.variant import resolve_variant

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- hand-computed small cases

def tiny_config(layers: int = 4):
    """A bare Llama text config: D 8, H 2, Hkv 1, hd 4, F 12, vocab 10 (no vision tower)."""
    return SimpleNamespace(model_type="llama", hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=4, intermediate_size=12, num_hidden_layers=layers, vocab_size=10)


def two_samples() -> PrefillTokens:
    """T = 7. Sample 0: t v v v v t t (n 4, t 3). Sample 1: left-padded, p p t v v t t (n 2, t 3)."""
    vision = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    return PrefillTokens(vision, valid)


# Per row: q_proj 2·8·8 = 128, k_proj = v_proj 2·8·4 = 64, o_proj 128, gate = up = down 2·8·12 = 192: 960.
# Per (query, key) pair: scores 2·H·hd = 16, values 16: 32.
ROW, PAIR_FLOPS = 960, 32
# The unpruned layer: executed 14 rows (B·T), 14·7 pairs; theoretical 7 + 5 rows, 7·8/2 + 5·6/2 = 43 pairs.
FULL, FULL_THEORY = 14 * ROW + 98 * PAIR_FLOPS, 12 * ROW + 43 * PAIR_FLOPS


def test_fastv_by_hand():
    # K = 2, R = 0.5: kept ceil(4/2) = 2 and ceil(2/2) = 1; rows 5 and 4; N = 5
    report = count_flops(tiny_config(), two_samples(), "fastv", start_layer=2, keep=0.5)
    pruned = 10 * ROW + 50 * PAIR_FLOPS  # B·N rows, B·N·N pairs
    rank = 2 * 2 * 7 * 2 * 4  # B·H·T·2·hd: the last token's score row over all T keys, counted in layer K
    assert [layer.total for layer in report.per_layer] == [FULL, FULL, pruned + rank, pruned]
    assert report.per_layer[2].executed["rank_scores"] == {"vision": rank}
    assert "rank_scores" not in report.per_layer[3].executed
    assert report.per_layer[3].executed["q_proj"] == {"vision": 3 * 128, "text": 6 * 128, "padding": 1 * 128}
    assert report.per_layer[3].executed["attn_scores"] == {"vision": 3 * 5 * 16, "text": 6 * 5 * 16,
                                                           "padding": 1 * 5 * 16}
    # theoretical: rows 5 + 4; pairs 15 + 10 (kept sequences t v v t t and t v t t: vision 2+3, 2; text 1+4+5, 1+3+4)
    pruned_theory = 9 * ROW + 25 * PAIR_FLOPS
    rank_theory = 2 * (7 + 5) * 2 * 4  # H·valid_b·2·hd per sample
    assert [layer.theoretical_total for layer in report.per_layer] == [FULL_THEORY, FULL_THEORY,
                                                                       pruned_theory + rank_theory, pruned_theory]
    assert report.per_layer[3].theoretical["attn_scores"] == {"vision": (5 + 2) * 16, "text": (10 + 8) * 16}
    assert [layer.ablated for layer in report.per_layer] == [False, False, True, True]
    assert report.layers == (2, 3) and report.variant == "fastv"
    assert report.lm_head == 10 * 2 * 8 * 10  # "all": the B·N rows the pruned forward outputs
    assert count_flops(tiny_config(), two_samples(), "fastv", start_layer=2, lm_head="last").lm_head == 2 * 2 * 8 * 10
    assert report.baseline == 4 * FULL and report.vision is None


def test_pdrop_by_hand():
    # boundaries 1, 2, 3, R = 0.5: vision floor(n·R^s) = (2, 1), (1, 0), (0, 0); rows (5, 4), (4, 3), (3, 3)
    report = count_flops(tiny_config(), two_samples(), "pdrop", layers=[1, 2, 3], keep=0.5)

    def rank(queries, keys):  # rank_q_proj 128 per query row, rank_k_proj 64 and rank_scores 16 per key row
        return queries * 128 + keys * (64 + 16)

    executed = [FULL,
                10 * ROW + 50 * PAIR_FLOPS + rank(2, 2 * 7),   # ranks the (B, T) input
                8 * ROW + 32 * PAIR_FLOPS + rank(2, 2 * 5),    # ranks stage 1's (B, 5) block
                6 * ROW + 18 * PAIR_FLOPS + rank(2, 2 * 4)]    # ranks stage 2's (B, 4) block
    assert [layer.total for layer in report.per_layer] == executed
    assert report.per_layer[1].executed["rank_k_proj"] == {"vision": 14 * 64}
    assert report.per_layer[3].executed["gate_proj"] == {"vision": 0, "text": 6 * 192, "padding": 0}
    theoretical = [FULL_THEORY,
                   9 * ROW + 25 * PAIR_FLOPS + rank(2, 7 + 5),
                   7 * ROW + (10 + 6) * PAIR_FLOPS + rank(2, 5 + 4),
                   6 * ROW + (6 + 6) * PAIR_FLOPS + rank(1, 4)]  # sample 1 has no vision token left to rank
    assert [layer.theoretical_total for layer in report.per_layer] == theoretical
    assert report.lm_head == 6 * 160
    assert report.layers == (1, 2, 3) and all(layer.ablated for layer in report.per_layer[1:])
    # PyramidDrop's position ids change no FLOPs
    original = count_flops(tiny_config(), two_samples(), "pdrop", layers=[1, 2, 3], keep=0.5, positions="original")
    assert original.to_dict() == report.to_dict()


def test_kept_counts_and_a_batch_without_vision_tokens():
    assert [fastv_kept(n, 0.5) for n in (0, 1, 4, 5, 576)] == [0, 1, 2, 3, 288]
    assert [pdrop_kept(576, 0.5, s) for s in (1, 2, 3)] == [288, 144, 72]
    assert pdrop_kept(5, 0.5, 2) == 1 and pdrop_kept(3, 0.5, 2) == 0
    text_only = PrefillTokens(torch.zeros(2, 7, dtype=torch.bool), two_samples().valid)
    for op, where in (("fastv", {"start_layer": 2}), ("pdrop", {"layers": [1, 3]})):
        report = count_flops(tiny_config(), text_only, op, **where)  # nothing to rank: the baseline executes
        assert report.total == report.baseline and report.theoretical == report.theoretical_baseline
        assert not any(layer.ablated for layer in report.per_layer)
        assert report.lm_head == 2 * 7 * 160


def test_variants_count_as_their_names():
    config = load_config("llava-1.5-7b")
    tokens = PrefillTokens.from_counts(576, 64, 576, text_before_image=35)
    fastv = resolve_variant("fastv", 32, start_layer=3, params={"keep": 0.25})
    assert count_flops(config, tokens, fastv).to_dict() == count_flops(config, tokens, "fastv", start_layer=3,
                                                                         keep=0.25).to_dict()
    pdrop = resolve_variant("pdrop", 32)  # the official four equal stages: boundaries 8, 16, 24
    assert pdrop.layers == (8, 16, 24)
    assert count_flops(config, tokens, pdrop).to_dict() == count_flops(config, tokens, "pdrop", layers=[8, 16, 24],
                                                                         keep=0.5).to_dict()
    assert isinstance(reduction_flops(fastv).keep, float)
    with pytest.raises(ValueError, match=r"^reduction_flops counts token reduction; 'skip_ffn L3–32' is of the "
                                         r"'ablation' family: count it with flops_of\(variant\) or count_flops$"):
        reduction_flops(resolve_variant("skip_ffn", 32, start_layer=3))
    with pytest.raises(ValueError, match="takes no options"):
        count_flops(config, tokens, "fastv", start_layer=3, shapes=None)
    with pytest.raises(ValueError, match="start_layer must be in 1..31"):
        count_flops(config, tokens, "fastv", start_layer=0)
    with pytest.raises(ValueError, match="strictly increasing"):
        count_flops(config, tokens, "pdrop", layers=[16, 8])
    # an evaluation's mean, each sample a batch-1 prefill with logits at the last token
    prompts = [{"mask": "t" * 5 + "v" * 576 + "t" * 40, "crop_shapes": [[24, 24]]}] * 2
    flops = mean_flops(config, prompts, fastv)
    single = count_flops(config, PrefillTokens.from_counts(576, 45, 576, text_before_image=5), fastv, lm_head="last")
    assert flops["total"] == single.total and flops["reduction"] == pytest.approx(single.reduction)


# ----------------------------------------------------------------------------- the published FastV figure

def fastv_paper_ratio(dims: TextDims, n: int, kept: int, k: int) -> float:
    """FLOPs share left by FastV per its paper: 4nd² + 2n²d + 2ndm per layer, K layers on n tokens, the rest on n̂."""
    d, m, layers = dims.hidden, dims.intermediate, dims.layers

    def layer(tokens):
        return 4 * tokens * d * d + 2 * tokens * tokens * d + 2 * tokens * d * m

    return (k * layer(n) + (layers - k) * layer(kept)) / (layers * layer(n))


def test_fastv_published_figure_llava15_7b():
    """FastV K=3, R=50% on LLaVA-1.5-7B: README "FLOPS=57%" of the baseline, "45% theoretical FLOPs reduction"."""
    config = load_config("llava-1.5-7b")
    dims = TextDims.from_config(config)
    report = count_flops(config, PrefillTokens.from_counts(576, 64, 576), "fastv", start_layer=3, keep=0.5)
    # ours, for 576 vision + 64 text tokens: 58.9% of the baseline in theory, 58.7% executed
    assert report.theoretical / report.theoretical_baseline == pytest.approx(0.5893, abs=1e-4)
    assert report.total / report.baseline == pytest.approx(0.5865, abs=1e-4)
    # the paper's formula on the image tokens alone (n = 576 -> 288): 54.0%, the "45%" (46.0%) reduction
    assert fastv_paper_ratio(dims, 576, 288, 3) == pytest.approx(0.5403, abs=1e-4)
    # the same formula on the whole prompt (640 -> 352, text is never pruned): 58.5%, ours within 0.5 point
    assert fastv_paper_ratio(dims, 640, 352, 3) == pytest.approx(0.5850, abs=1e-4)
    assert abs(report.theoretical / report.theoretical_baseline - fastv_paper_ratio(dims, 640, 352, 3)) < 0.005
    # the accounting difference at equal n: the formula weighs attention (2n²d) against 4d² + 2dm per token (MACs,
    # a two-matrix FFN); we count 2·(4d² + 3dm) per token (SwiGLU's three matrices) and 4n²d for the executed
    # rectangle. With no text our executed share is the formula's with those weights, plus the ranking row.
    no_text = count_flops(config, PrefillTokens.from_counts(576, 0, 576), "fastv", start_layer=3, keep=0.5)
    d, m = dims.hidden, dims.intermediate

    def ours(n):
        return 2 * n * (4 * d * d + 3 * d * m) + 4 * n * n * d

    rank = 2 * dims.heads * dims.head_dim * 576
    assert no_text.total == 3 * ours(576) + 29 * ours(288) + rank and no_text.baseline == 32 * ours(576)
    assert no_text.total / no_text.baseline == pytest.approx(0.5417, abs=1e-4)


# ----------------------------------------------------------------------------- CLI

def run_cli(*args: str) -> dict:
    cmd = [sys.executable, "-m", "analysis.flops", "--config", "llava-1.5-7b", "--vision-tokens", "576",
           "--text-tokens", "64", *args, "--json"]
    return json.loads(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout)


def test_cli_fastv_and_pdrop_json():
    fastv = run_cli("--op", "fastv", "--start-layer", "3", "--keep", "0.5")
    assert fastv["op"] == "fastv" and fastv["keep"] == 0.5 and fastv["layers"] == list(range(3, 32))
    assert fastv["stages"] == [{"first_layer": 0, "last_layer": 2, "rows": 640, "vision": 576},
                               {"first_layer": 3, "last_layer": 31, "rows": 352, "vision": 288}]
    assert fastv["theoretical_flops"] / fastv["theoretical_baseline_flops"] == pytest.approx(0.5893, abs=1e-4)
    assert sum(layer["flops"] for layer in fastv["per_layer"]) == fastv["total_flops"]
    assert fastv["per_layer"][3]["components"]["rank_scores"] == 2 * 32 * 128 * 640
    assert [layer["ablated"] for layer in fastv["per_layer"]] == [i >= 3 for i in range(32)]
    assert fastv["lm_head_flops"] == 2 * 352 * 4096 * 32064  # the B·N rows of the pruned forward
    pdrop = run_cli("--op", "pdrop", "--layers", "8,16,24", "--keep", "0.5")
    assert pdrop["layers"] == [8, 16, 24] and [s["vision"] for s in pdrop["stages"]] == [576, 288, 144, 72]
    assert pdrop["reduction"] > fastv["reduction"] > 0.4
    assert {"rank_q_proj", "rank_k_proj", "rank_scores"} <= set(pdrop["components"])
    assert run_cli("--op", "pdrop")["stages"] == pdrop["stages"]  # default keep 0.5, boundaries 8, 16, 24


def test_cli_table(capsys):
    assert main(["--config", "llava-1.5-7b", "--text-tokens", "64", "--op", "pdrop", "--layers", "8,16,24"]) == 0
    out = capsys.readouterr().out
    assert "op pdrop, keep 0.5 at boundaries 8,16,24" in out
    assert "layers 24..31: 136 (72 vision)" in out


@pytest.mark.parametrize("args, message", [
    (["--op", "skip_ffn", "--keep", "0.5"], "--keep applies to --op fastv / pdrop only, not --op skip_ffn"),
    (["--op", "proxyv", "--layers", "8"], "--layers applies to --op fastv / pdrop only"),
    (["--op", "fastv"], "--op fastv needs --start-layer K"),
    (["--op", "fastv", "--start-layer", "3", "--layers", "3"], "--layers gives PyramidDrop's stage boundaries"),
    (["--op", "pdrop", "--start-layer", "8"], "--op pdrop takes its stage boundaries as --layers K1,K2,..."),
    (["--op", "pdrop", "--layers", "8,x"], "--layers takes comma-separated layer indices"),
    (["--op", "pdrop", "--layers", "16,8"], "strictly increasing"),
    (["--op", "fastv", "--start-layer", "3", "--keep", "0"], "keep must be in (0, 1]"),
    (["--op", "fastv", "--start-layer", "32"], "start_layer=32 is out of range"),
    (["--op", "fastv", "--start-layer", "0"], "fastv: start_layer must be in 1..31"),
    (["--dominant", "54", "--contextual", "10"], "--dominant and --contextual apply to --op visionzip only, not --op none"),
    (["--op", "visionzip", "--start-layer", "3"], "--op visionzip merges vision tokens before the LLM"),
])
def test_cli_bad_input_is_one_line(capsys, args, message):
    assert main(["--config", "llava-1.5-7b", "--text-tokens", "64", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- analytic == torch counter

CASES = (
    ("fastv", {"start_layer": 2, "keep": 0.5}),
    ("fastv", {"start_layer": 1, "keep": 0.3}),
    ("pdrop", {"layers": [1, 2, 3], "keep": 0.5, "positions": "renumber"}),
    ("pdrop", {"layers": [1, 3], "keep": 0.3, "positions": "original"}),
)
ONE = (PAIR[0],)


def measured(model, batch, op, newline_tokens="vision", **where):
    """FlopCounterMode on ``model(**batch)`` under ``ablate(model, op, ...)``: the block's state, logits, split."""
    counter = torch_flop_counter()
    with torch.no_grad(), ablate(model, op, newline_tokens=newline_tokens, **where) as state, counter:
        logits = model(**batch).logits
    counts = {name: sum(by_op.values()) for name, by_op in counter.get_flop_counts().items()}
    return state, logits, _split(counts, _module_names(model, f"{type(model).__name__}."), counter.get_total_flops(),
                                 "flops")


def assert_exact(model, batch, op, newline_tokens="vision", **where):
    tokens = PrefillTokens.from_batch(batch, model.config, newline_tokens)
    report = count_flops(model.config, tokens, op, **where)
    state, logits, split = measured(model, batch, op, newline_tokens, **where)
    assert split.decoder_outside_layers == 0
    assert [layer.total for layer in report.per_layer] == list(split.per_layer)
    for layer, components in zip(report.per_layer, split.components):
        # PyramidDrop's ranking runs the layer's own q_proj / k_proj modules; FastV's score row is a matmul of its own
        assert by_module(layer.executed) == components, layer.layer
    assert report.total == split.decoder and report.lm_head == split.lm_head and report.vision == split.vision
    # the kept vision tokens and the rows the forward outputs are the execution's
    depth = TextDims.from_config(model.config).layers
    counted = reduction_flops(resolve_variant(op, depth, start_layer=where.get("start_layer"), layers=where.get("layers"),
                                              params={k: v for k, v in where.items() if k in ("keep", "positions")}))
    if counted.active(tokens):
        stages = counted.schedule(tokens).stages
        assert [[len(kept) for kept in stage] for stage in state.kept_vision] == [list(rows.vision) for _, rows in stages[1:]]
        assert logits.shape[:2] == (tokens.batch, stages[-1][1].width)
    else:
        assert state.kept_vision == [] and logits.shape[1] == tokens.seq_len
    return report


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("spec, kind", [("llava-qwen2-gqa", "llava"), ("next-mistral-gqa", "llava_next")])
def test_analytic_equals_torch_counter(spec, kind, attn, size):
    model = model_for(spec, attn)
    batch = make_batch(kind, ONE if size == 1 else PAIR)
    for op, where in CASES:
        report = assert_exact(model, batch, op, **where)
        assert report.total < report.baseline and report.theoretical < report.theoretical_baseline, (op, where)
        if size == 2:
            assert report.groups()["padding"] > 0  # left padding, then filler slots, are executed


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_backbones_and_newline_tokens_as_text(attn):
    assert_exact(model_for("llava-llama", attn), make_batch("llava", PAIR), "fastv", start_layer=3, keep=0.25)
    model, batch = model_for("next-llama", attn), make_batch("llava_next", PAIR)
    for newline_tokens in ("vision", "text"):
        assert_exact(model, batch, "pdrop", newline_tokens, layers=[2, 3], keep=0.5)
        assert_exact(model, batch, "fastv", newline_tokens, start_layer=2, keep=0.7)


@pytest.mark.filterwarnings("ignore:ablate\\(\\):UserWarning")  # "ablate(): the input has no image tokens"
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_several_images_a_text_only_sample_and_a_text_only_batch(attn):
    model = model_for("llava-qwen2-gqa", attn)
    batch = make_batch("llava", MULTI)  # the text-only sample keeps all its rows
    for op, where in CASES:
        assert_exact(model, batch, op, **where)
    text_only = make_batch("llava", (MULTI[1], ("USER: Hi ASSISTANT:", [])))
    for op, where in CASES:  # nothing to rank: HF's own layers run
        report = assert_exact(model, text_only, op, **where)
        assert report.total == report.baseline
