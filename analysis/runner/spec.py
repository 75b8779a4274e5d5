"""Config -> :class:`RunSpec`: everything one run needs, validated before any heavy work.

:func:`prepare` checks a composed config (the variant is known and its parameters valid, the weights
are there -- the error says how to get them --, the layers exist in this model, the eval is sane),
resolves the one :class:`~analysis.variant.Variant` of the run, and names its record directory.
A bad config raises :class:`ConfigError`, whose message is one line. Loads no model (only its
``config.json``) and imports no lmms-eval.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .. import results
from ..config_groups import CONF_DIR, ConfigError, group_choices
from ..variant import Variant, baseline, family_of, resolve_variant

REPO_ROOT = results.REPO_ROOT
MODEL_IDENTITY_KEYS = ("name", "dtype", "attn_implementation", "newline_tokens")
# How the vision side runs, part of the identity where set and passed to the plugin: the processor's image resizing
# bounds and how a video is sampled (Qwen-VL only; analysis/video_input.py), and the tower's own attention backend
# (analysis.models.attn_implementations)
VISION_KEYS = ("min_pixels", "max_pixels", "fps", "max_num_frames", "vision_attn_implementation")


@dataclass
class ModelRef:
    """A model config resolved to its weights: ``identity`` is what of it determines results."""

    name: str
    path: str
    cfg: dict

    @property
    def identity(self) -> dict:
        # The weights' fingerprint, not their path: moving a checkpoint keeps its results, retraining does not.
        # A Qwen-VL processor's resizing bounds and the video sampling change the vision tokens, the tower's backend
        # its numerics: part of the identity where set (a config without them keeps its hashes).
        vision = {k: self.cfg[k] for k in VISION_KEYS if self.cfg.get(k) is not None}
        if vision.get("vision_attn_implementation") == self.cfg.get("attn_implementation"):
            del vision["vision_attn_implementation"]  # the tower on the model's own backend: nothing differs
        return {**{k: self.cfg.get(k) for k in MODEL_IDENTITY_KEYS}, **vision,
                "weights": results.weights_fingerprint(self.path)}


def proxyv_field(variant: Variant) -> dict | None:
    """The pinned ``proxyv`` field of a record (and of a ProxyV run's identity): the checkpoint's start layer and
    settings; None for other variants."""
    return {"start_layer": variant.start_layer, **variant.options} if variant.family == "proxyv" else None


@dataclass
class RunSpec:
    """A validated run: what is computed (hashed) and how (``settings``, not hashed).

    ``model`` is what the variant runs on; ``base`` is the model of the baseline: the same, except for a
    trained variant (ProxyV), whose checkpoint is compared with the model it was made from.
    """

    cfg: dict
    model: ModelRef
    base: ModelRef
    num_layers: int
    variant: Variant
    tasks: dict[str, str]  # lmms-eval task -> metric key of its per-sample result
    eval_name: str
    limit: int | None
    seed: int
    sweep_root: Path
    baselines_dir: Path
    include_path: str | None = None
    include_defaults: bool = False
    settings: dict = field(default_factory=dict)  # the `run` group: batch size, device, progress...

    @property
    def blind(self) -> bool:
        return self.variant.blind

    @property
    def baseline_variant(self) -> Variant:
        return baseline(self.blind)

    @property
    def model_name(self) -> str:
        return self.cfg["model"]["name"]

    def identity(self, of_baseline: bool = False) -> dict:
        """What determines the result: eval, seed, model identity, the variant (``run.*``, hydra and the
        spelling of the layers excluded)."""
        cfg = {k: v for k, v in self.cfg.items() if k not in ("run", "hydra", "start_layer", "end_layer", "op", "model")}
        if of_baseline:
            return {**cfg, "model": self.base.identity, "op": {"name": "none"}, "layers": []}
        v = self.variant
        proxyv = proxyv_field(v)
        params = {} if proxyv else v.options  # a checkpoint's settings are its own identity
        return {**cfg, "model": self.model.identity, "op": {"name": v.method, **params}, "layers": list(v.layers),
                **({"proxyv": proxyv} if proxyv else {})}

    @property
    def key(self) -> str:
        return results.config_hash(self.identity())

    @property
    def baseline_key(self) -> str:
        return results.config_hash(self.identity(of_baseline=True))

    @property
    def run_name(self) -> str:
        """The record's directory name: readable, and unique through the config hash."""
        v = self.variant
        where = f"_L{v.start_layer}-{v.end_layer}" if v.layers else ""
        return f"{v.method}{where}{'_blind' if v.blind else ''}_{self.key[:10]}"

    @property
    def run_dir(self) -> Path:
        return self.sweep_root / self.run_name

    @property
    def baseline_dir(self) -> Path:
        return self.baselines_dir / f"{self.base.name}-{self.eval_name}{'-blind' if self.blind else ''}_" \
                                    f"{self.baseline_key[:10]}"


# ----------------------------------------------------------------------------- weights

def _resolve_path(path: str) -> Path | None:
    """An existing directory for ``path``: as given (absolute or from the working directory), else from the repo root."""
    for candidate in (Path(path).expanduser(), REPO_ROOT / path):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def resolve_weights(model: dict) -> str:
    """The local directory of the model's weights: ``model.pretrained`` as a directory, or that hub id
    in the HF cache (looked up offline). Raises ConfigError saying how to get them."""
    pretrained = str(model["pretrained"])
    found = _resolve_path(pretrained)
    if found is not None:
        if not (found / "config.json").exists():
            raise ConfigError(f"model {model['name']}: {found} has no config.json; "
                              "point model.pretrained at a save_pretrained() directory")
        return str(found)
    hub_id = model.get("hub_id")
    if hub_id and pretrained == hub_id:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return snapshot_download(hub_id, local_files_only=True)
        except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
            pass
    how = model.get("how_to_get") or (f"hf download {hub_id}" if hub_id else None)
    where = f"no directory {pretrained!r}" + (f" and {hub_id} is not in the HF cache" if hub_id else "")
    raise ConfigError(f"model {model['name']}: weights not found ({where}); get them with: {how}"
                      + (f" (~{model['download_gb']} GB)" if model.get("download_gb") else "")
                      + ", or set model.pretrained=/path/to/checkpoint")


def _hf_config(model: ModelRef):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model.path)
        config.text_config.num_hidden_layers  # noqa: B018 -- a LLaVA config has a text config
        return config
    except (OSError, ValueError, AttributeError) as error:
        raise ConfigError(f"model {model.name}: cannot read {model.path}/config.json as a LLaVA or Qwen-VL config "
                          f"({str(error).splitlines()[0]})") from None


def _base_model(model_cfg: dict) -> ModelRef:
    """The model a trained checkpoint was made from (``model.baseline_model``, a conf/model/ name)."""
    name = model_cfg.get("baseline_model")
    if not name:
        raise ConfigError(f"model {model_cfg['name']} is a ProxyV checkpoint: set model.baseline_model to "
                          "the conf/model/ name of the model it was made from (its baseline), e.g. tiny")
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"model.baseline_model={name!r} is not a model config; known: "
                          f"{', '.join(group_choices('model'))}")
    base_cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return ModelRef(base_cfg["name"], resolve_weights(base_cfg), base_cfg)


def _trained_checkpoint(model_cfg: dict, family: str, start: int | None,
                        wanted: dict | None = None) -> tuple[ModelRef, dict]:
    """(ModelRef, settings) of the trained checkpoint of ``family`` listed for ``start`` in ``model.<family>``
    (a directory, or a list of them, e.g. spatial and learned proxies from one start layer): the first listed
    whose saved settings have every ``wanted`` value."""
    available = {int(k): v for k, v in (model_cfg.get(family) or {}).items()}
    if start not in available:
        listed = ", ".join(map(str, sorted(available))) or "none"
        raise ConfigError(f"model {model_cfg['name']} has no trained {family} checkpoint for start_layer={start} "
                          f"(listed in model.{family}: {listed}); train one (LLaVA: experiments/train.py "
                          f"variant=proxyv start_layer={start}; Qwen-VL: apply_proxyv and your own trainer, "
                          f"docs/qwen.md) and add it to conf/model/{model_cfg['name']}.yaml")
    paths = available[start] if isinstance(available[start], (list, tuple)) else [available[start]]
    wanted = {k: v for k, v in (wanted or {}).items() if v is not None}
    seen = []
    for path in paths:
        ref = ModelRef(model_cfg["name"], resolve_weights({**model_cfg, "pretrained": path, "hub_id": None}),
                       model_cfg)
        settings = getattr(_hf_config(ref), family, None)
        if not settings or settings.get("start_layer") != start:
            raise ConfigError(f"{ref.path} is not a {family} checkpoint starting at layer {start} "
                              f"(its config.json has {family}={settings})")
        if all(settings.get(k) == v for k, v in wanted.items()):
            return ref, dict(settings)
        seen.append(f"{ref.path} has " + ", ".join(f"{k}={settings.get(k)!r}" for k in wanted))
    asked = ", ".join(f"op.{k}={v!r}" for k, v in wanted.items())
    raise ConfigError(f"no trained {family} checkpoint for start_layer={start} has {asked}: " + "; ".join(seen))


# ----------------------------------------------------------------------------- the variant

def _int_or_none(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer or null, got {value!r}")
    return value


def _variant(cfg: dict, model: ModelRef, num_layers: int, hf_config) -> tuple[Variant, ModelRef, ModelRef]:
    """(variant, the model it runs on, the baseline's model), from the ``op`` group and the layers."""
    op = dict(cfg["op"])
    method = op.pop("name")
    try:
        fam = family_of(method)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    start, end = _int_or_none("start_layer", cfg.get("start_layer")), _int_or_none("end_layer", cfg.get("end_layer"))
    if method in fam.param_layers:  # e.g. pdrop: its layers are a parameter (op.layers)
        start = end = None
    blind = bool(cfg["eval"].get("blind", False))
    base, checkpoint = model, None
    own = getattr(hf_config, "proxyv", None)  # the model is itself a trained ProxyV checkpoint
    on_proxyv = fam.name == "reduction"  # token reduction may run on a ProxyV checkpoint (op.proxyv=L)
    if own and on_proxyv:
        if op.get("proxyv") not in (None, own["start_layer"]):
            raise ConfigError(f"model {model.name} is a ProxyV checkpoint starting at layer {own['start_layer']}, "
                              f"not op.proxyv={op['proxyv']}")
        op["proxyv"], base, checkpoint = own["start_layer"], _base_model(cfg["model"]), model.path
    elif own:
        if method not in ("none", "proxyv"):
            raise ConfigError(f"model {model.name} is a ProxyV checkpoint; run it with op=none, op=proxyv or a token "
                              f"reduction (fastv, pdrop, visionzip), not op={method}")
        base = _base_model(cfg["model"])
        method, fam, start, end, settings = "proxyv", family_of("proxyv"), own["start_layer"], None, dict(own)
        checkpoint = model.path
    elif fam.trained:  # op=proxyv start_layer=L: the model's trained checkpoint for L (matching op's settings)
        model, settings = _trained_checkpoint(cfg["model"], fam.name, start, op)
        checkpoint = model.path
    elif on_proxyv and op.get("proxyv") is not None:  # op=fastv ... op.proxyv=L: the learned checkpoint for L
        model, _ = _trained_checkpoint(cfg["model"], "proxyv", op["proxyv"], {"init": "learned"})
        checkpoint = model.path
    if fam.trained:
        asked = {k: v for k, v in op.items() if v is not None}
        differs = {k: (v, settings.get(k)) for k, v in asked.items() if settings.get(k) != v}
        if differs:
            raise ConfigError(f"op={method}: the checkpoint {checkpoint} has "
                              + ", ".join(f"{k}={have!r}" for k, (_, have) in differs.items())
                              + ", not " + ", ".join(f"op.{k}={want!r}" for k, (want, _) in differs.items()))
        op = fam.checkpoint_params(method, settings)
    try:
        variant = resolve_variant(method, num_layers, start_layer=start, end_layer=end, params=op, blind=blind,
                                  checkpoint=checkpoint)
    except (ValueError, TypeError) as error:
        hint = "; set start_layer / end_layer" if "start_layer" in str(error) or "end_layer" in str(error) else ""
        raise ConfigError(f"{error} (model {cfg['model']['name']}{hint})") from None
    return variant, model, base


def _qwen_op(cfg: dict, hf_config) -> dict:
    """The config to run on a Qwen-VL model (others: unchanged): a method the runner does not run there fails in one
    line (:func:`analysis.models.qwen_runs`); the parameters follow :func:`analysis.models.qwen_params` (pdrop:
    ``positions='original'``), except that the op group's ``positions`` is the LLaVA default ``renumber`` whether
    or not the command set it, so it is replaced here, not refused."""
    from ..models import QWEN_VL_CLASSES, qwen_params, qwen_runs, qwen_unsupported

    method = cfg["op"]["name"]
    if hf_config.model_type not in QWEN_VL_CLASSES:
        return cfg
    try:
        fam = family_of(method)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if not qwen_runs(method, fam.name):
        raise ConfigError(f"model {cfg['model']['name']}: {qwen_unsupported(method, hf_config.model_type)}")
    op = {k: v for k, v in cfg["op"].items() if not (method == "pdrop" and k == "positions")}
    return {**cfg, "op": qwen_params(method, op)}


def _check_countable(variant: Variant, model: ModelRef) -> None:
    """A run records its FLOPs: a variant whose family cannot count it fails here, before any evaluation."""
    from ..flops.variants import flops_of

    hf_config = _hf_config(model)
    settings = getattr(hf_config, "proxyv", None) if variant.options.get("proxyv") is not None else None
    if settings and variant.method in ("fastv", "pdrop") and hf_config.model_type == "llava_next":
        raise ConfigError(f"op={variant.method} on a LLaVA-NeXT ProxyV checkpoint executes, but its FLOPs are not "
                          "counted (AnyRes unpadding leaves crops that are not square: analysis.flops.proxyv_reduction) "
                          "and the runner records FLOPs with every result; run it with analysis.ablate() directly")
    try:
        counted = flops_of(variant, **({"proxyv_settings": dict(settings)} if settings else {}))
        if hasattr(counted, "with_config"):  # a count that reads the model's config (VisionZip: its tower's size)
            counted.with_config(hf_config)
    except NotImplementedError as error:
        raise ConfigError(f"op={variant.method}: {error}; the runner records FLOPs with every result, so run it "
                          "with analysis.ablate() directly until then") from None
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{error} (model {model.name})") from None


def _check_backends(model_cfg: dict, run: dict) -> None:
    """A vision-tower backend that cannot run here fails before any work, in one line."""
    from ..models import attn_implementations, pick_device

    vision = model_cfg.get("vision_attn_implementation")
    if vision is None:
        return
    try:
        device = pick_device(run.get("device")).type
        attn_implementations(model_cfg.get("attn_implementation") or "sdpa", vision, device)
    except (ValueError, RuntimeError) as error:  # RuntimeError: torch's word on a device string it cannot parse
        raise ConfigError(f"model {model_cfg['name']}: {error}") from None


def prepare(cfg: DictConfig | dict) -> RunSpec:
    """Validate a composed config and resolve it into a :class:`RunSpec`; raises :class:`ConfigError`."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # a sweep's job number is not known yet
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    cfg.pop("hydra", None)
    run = cfg["run"]
    set_offline(run.get("offline", True))
    _check_backends(cfg["model"], run)
    model = ModelRef(cfg["model"]["name"], resolve_weights(cfg["model"]), cfg["model"])
    hf_config = _hf_config(model)
    num_layers = hf_config.text_config.num_hidden_layers
    cfg = _qwen_op(cfg, hf_config)
    variant, model, base = _variant(cfg, model, num_layers, hf_config)
    _check_countable(variant, model)
    ev = cfg["eval"]
    tasks = ev["tasks"]
    if not isinstance(tasks, dict) or not tasks:
        raise ConfigError(f"eval {ev.get('name')}: `tasks` must map each lmms-eval task to its metric key")
    limit = ev.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ConfigError(f"eval.limit must be a positive integer (samples per task) or null, got {limit!r}")
    include = ev.get("include_path")
    if include and not Path(include).is_absolute():
        include = str(REPO_ROOT / include)
    runs_dir = Path(run["runs_dir"]).expanduser()
    return RunSpec(
        cfg=cfg, model=model, base=base, num_layers=num_layers, variant=variant, tasks=dict(tasks),
        eval_name=ev["name"], limit=limit, seed=int(cfg.get("seed", 0)),
        sweep_root=runs_dir / run["sweep_name"], baselines_dir=Path(run["baselines_dir"]).expanduser(),
        include_path=include, include_defaults=bool(ev.get("include_defaults", False)), settings=run,
    )


def set_offline(offline: bool) -> None:
    """No network for HF hub and datasets (read from the local cache only), unless ``run.offline=false``."""
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
