"""Training on transformers' Trainer (docs/training.md): LLaVA-format data (``llava_data``), the recipe's parameter
groups (``groups``, ``trainer.GroupedTrainer``), one run from ``conf/train.yaml`` (``run``), stage A of the tiny base
model (``tower``), the greedy twins evaluation (``evaluate``) and the 7B-shape step check (``step_check``).
"""
