"""The main job: sweep variants of a LLaVA model (ablation ops x decoder layers, trained ProxyV
checkpoints), scored by lmms-eval.

    python experiments/run.py                                       # the main job: default sweep, tiny model
    python experiments/run.py -m op=skip_ffn start_layer=8,12,16    # an ad-hoc sweep, in its own folder
    python experiments/run.py -m model=llava-1.5-7b eval=lmms hydra/launcher=submitit_slurm

Each run writes runs/<sweep>/<run>/result.json (+ samples.jsonl); finished runs are skipped on a
re-run; reports/<sweep>/report.md is written when the sweep ends. An ad-hoc sweep's folder is named
after its overrides (analysis.sweep.sweep_tag). Configs: conf/. Logic: analysis/runner/ (one run),
analysis/sweep.py (the sweep), analysis/report/ (the report).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout too
from analysis.runner import run_one  # noqa: E402
from analysis.sweep import CONF_DIR, ConfigError, check_overrides, hydra_argv  # noqa: E402

# conf/hydra/launcher/submitit_*.yaml set our defaults on the plugin's schemas of the same name, on purpose.
warnings.filterwarnings("ignore", message="(?s).*is validated against ConfigStore schema with the same name")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        record = run_one(cfg)
    except ConfigError as error:
        sys.exit(f"error: {error}")  # one line, and the sweep stops: the config is wrong, not the run
    return record.get("relative_score") if record else None


if __name__ == "__main__":
    argv = sys.argv[1:]
    try:
        check_overrides(argv)  # unknown group options, before Hydra prints its multi-line error
    except ConfigError as error:
        sys.exit(f"error: {error}")
    sys.argv[1:] = hydra_argv(argv)  # op parameters in a sweep over op; the ad-hoc sweep's own folder
    main()
