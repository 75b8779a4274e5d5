"""The lmms-eval registration of our model class, read through the ``lmms_eval.models`` entry point.

lmms-eval imports this module while ``lmms_eval.models`` is still loading, so it must stay light:
no torch, no transformers, nothing from ``analysis`` beyond this file (the class itself is imported
lazily, by its dotted path, only when ``--model llava_ablate`` is asked for).
"""

from lmms_eval.models.registry_v2 import ModelManifest

MODEL_NAME = "llava_ablate"

MANIFEST = ModelManifest(
    model_id=MODEL_NAME,
    simple_class_path="analysis.lmms_model.LlavaAblate",
    aliases=("vision_redundancy",),
)
