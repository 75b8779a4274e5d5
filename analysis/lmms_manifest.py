"""The lmms-eval registration of our model class, read through the ``lmms_eval.models`` entry point.

lmms-eval loads the entry point while ``lmms_eval.models`` is still initialising, so this module
stays light and imports nothing at module level: the entry point is the function :func:`manifests`,
which lmms-eval calls once its registry exists (importing ``ModelManifest`` at the top would make
``import analysis.lmms_manifest`` -> ``lmms_eval.models`` -> this module a circular import). The model
class itself is imported lazily, by its dotted path, only when ``--model llava_ablate`` is asked for.
"""

MODEL_NAME = "llava_ablate"
CLASS_PATH = "analysis.lmms_model.LlavaAblate"


def manifests() -> list:
    """The ModelManifest(s) lmms-eval registers: ``llava_ablate`` (alias ``vision_redundancy``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH, aliases=("vision_redundancy",))]
