"""FLOPs matching (analysis.flops.matching): the value it returns is the one that was counted, and no value
on its grid saves closer to the target."""

from __future__ import annotations

import pytest

from analysis import tiny
from analysis.flops.matching import match_param, saved_by


def _prompts(vision: int, texts: list[int]) -> list[dict]:
    return [{"mask": "t" * 5 + "v" * vision + "t" * (t - 5), "crop_shapes": ((8, 8),)} for t in texts]


@pytest.mark.parametrize("method,settings", [("fastv", {"start_layer": 2}), ("pdrop", {})])
def test_match_is_the_closest_on_its_grid(method, settings):
    config = tiny.build_config("llava", "llama", image_size=64, patch_size=8, num_layers=8)
    prompts = _prompts(64, [20, 31, 44])
    target = 0.2
    value, saved = match_param(config, prompts, method, "keep", target, decimals=3, **settings)
    assert saved == saved_by(config, prompts, method, keep=value, **settings)  # what is returned was counted
    for neighbour in (value - 0.001, value + 0.001):
        if 0.01 <= neighbour <= 1:
            assert abs(saved - target) <= abs(saved_by(config, prompts, method, keep=neighbour, **settings) - target)
    with pytest.raises(ValueError, match="saves"):
        match_param(config, prompts, method, "keep", 0.99, **settings)  # no keep ratio saves 99%
