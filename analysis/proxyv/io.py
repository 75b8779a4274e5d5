"""``load_proxyv``: load a saved ProxyV model back with one call.

``save_pretrained`` of a ProxyV model writes the ProxyV weights with the others (keys
``...proxyv.*``) and the settings in ``config.json`` (``"proxyv": {...}``). The plain HF class
does not know those weights: ``from_pretrained`` drops them and logs them as UNEXPECTED. Here the
HF class is loaded, its load report is checked (only ProxyV keys may be unexpected; anything else
is reported), ProxyV is applied from the config, and the ProxyV weights are read from the
checkpoint files and loaded strictly (every ProxyV parameter must be there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings

from safetensors import safe_open
from transformers import AutoConfig
from transformers.utils import cached_file

from ..models import vlm_core, vlm_generation_class
from .apply import ProxyVSettings, apply_proxyv

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def _own_load_report():
    """Silence HF's load report for the duration; :func:`load_proxyv` checks the loading info itself."""
    logger = logging.getLogger("transformers.modeling_utils")
    flt = _DropLoadReport()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


def _checkpoint_files(path, hub_kwargs) -> list[str]:
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False,
                        **hub_kwargs)
    if index is None:
        single = cached_file(path, "model.safetensors", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if single is None:
            raise FileNotFoundError(f"{path} has no model.safetensors(.index.json); ProxyV checkpoints are "
                                    "written with save_pretrained (safetensors)")
        return [single]
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return [cached_file(path, shard, **hub_kwargs) for shard in shards]


def load_proxyv(path, **from_pretrained_kwargs):
    """Load a ProxyV model saved with ``save_pretrained``: HF class + ProxyV modules + their weights.

    Args:
        path: a directory or hub id, as for ``from_pretrained``.
        **from_pretrained_kwargs: passed to ``<LLaVA or Qwen-VL class>.from_pretrained`` (``dtype``,
            ``attn_implementation``, ``device_map``, ...).
    Returns:
        the model (and the loading info if ``output_loading_info=True`` was passed).
    """
    want_info = from_pretrained_kwargs.pop("output_loading_info", False)
    hub_kwargs = {k: from_pretrained_kwargs[k] for k in _HUB_KWARGS if k in from_pretrained_kwargs}
    config = AutoConfig.from_pretrained(path, **hub_kwargs)
    if getattr(config, "proxyv", None) is None:
        raise ValueError(f"{path} is not a ProxyV checkpoint (config.json has no 'proxyv'); use from_pretrained")
    model_class = vlm_generation_class(config.model_type, str(path))
    settings = ProxyVSettings.from_dict(config.proxyv)
    with _own_load_report():
        model, info = model_class.from_pretrained(path, output_loading_info=True, **from_pretrained_kwargs)
    apply_proxyv(model, **{k: v for k, v in vars(settings).items()})
    prefix = next(name for name, module in model.named_modules() if module is vlm_core(model).proxyv) + "."
    state = {}
    for file in _checkpoint_files(path, hub_kwargs):
        with safe_open(file, framework="pt") as f:
            state.update({k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})  # noqa: SIM118
    vlm_core(model).proxyv.load_state_dict(state, strict=True)  # missing or extra ProxyV keys: an error
    # HF reports our keys as unexpected, under its own load-time renaming (Qwen-VL: model.language_model.proxyv.*)
    info = {**info, "unexpected_keys": {k for k in info["unexpected_keys"] if ".proxyv." not in f".{k}"}}
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems:
        warnings.warn(f"loading {path}: {problems}", stacklevel=2)
    return (model, info) if want_info else model
