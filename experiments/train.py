"""Training (issue 11, in progress): transformers' Trainer on LLaVA-format data, one process.

    python experiments/train.py model=tiny variant=proxyv start_layer=16 train.max_steps=300 train.output_dir=DIR
    python experiments/train.py model=tiny variant=none train.output_dir=DIR            # the control
    python experiments/train.py model=tiny variant=skip_attn start_layer=16 train.output_dir=DIR   # Table 1
    python experiments/train.py ... data.json=train.json data.image_folder=images/      # your LLaVA data

Config: conf/train.yaml. Logic: analysis/training/run.py. The model lands in DIR/model (load_proxyv for
ProxyV, from_pretrained otherwise); DIR/checkpoints holds the Trainer's checkpoints (a re-run resumes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.config_groups import CONF_DIR, ConfigError  # noqa: E402
from analysis.runner.spec import resolve_weights  # noqa: E402


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    from analysis.training.run import train

    try:
        path = resolve_weights(OmegaConf.to_container(cfg.model, resolve=True))
        from hydra.core.hydra_config import HydraConfig

        final = train(OmegaConf.to_container(cfg, resolve=True), path, list(HydraConfig.get().overrides.task))
    except (ConfigError, ValueError, TypeError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    print(f"saved {final}")


if __name__ == "__main__":
    main()
