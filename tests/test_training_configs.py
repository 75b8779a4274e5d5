"""The shipped scale configs (conf/deepspeed/*.json, conf/accelerate/*.yaml, the SLURM recipe) read the way
transformers 5.23, accelerate 1.15 and DeepSpeed 0.19 read them, on this CPU machine.

DeepSpeed: ``TrainingArguments(deepspeed=path, use_cpu=True)`` is accepted without a GPU (it builds
``HfTrainerDeepSpeedConfig`` and runs ``trainer_config_process``), so the "auto" values are resolved by the
Trainer's own code; the model-dependent ones by ``trainer_config_finalize`` on a tiny LLaVA, and the result is
validated by DeepSpeed's own config classes. accelerate: each YAML goes through ``load_config_from_file`` and
through ``accelerate launch``'s argument handling, whose environment then builds the FSDP / DeepSpeed plugins
the Trainer would get. Nothing here starts a process group or a DeepSpeed engine: no GPU run is claimed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import model_for

ROOT = Path(__file__).resolve().parents[1]
DS = {"zero2": ROOT / "conf/deepspeed/zero2.json", "zero3": ROOT / "conf/deepspeed/zero3.json"}
ACC = ROOT / "conf/accelerate"
SBATCH = ROOT / "scripts/slurm/train_multinode.sbatch"
# What the Trainer fills from TrainingArguments / the model: a fixed number here would have to match by hand.
TRAINER_AUTO = ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "bf16.enabled", "fp16.enabled", "zero_optimization.reduce_bucket_size"]
ZERO3_AUTO = ["zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold"]


def get(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def autos(node, prefix="") -> list[str]:
    """Every key whose value is still "auto"."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in autos(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == "auto" else []


@pytest.fixture(autouse=True)
def _no_leaked_state():
    """TrainingArguments(deepspeed=...) sets a module-global ZeRO-3 flag that from_pretrained reads, and
    accelerate keeps a singleton state: neither may reach the next test."""
    yield
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("name", DS)
def test_deepspeed_json_leaves_trainer_values_and_optimizer_to_the_trainer(name):
    config = json.loads(DS[name].read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] == int(name[-1])
    # No optimizer/scheduler: DeepSpeed would build its own single-lr optimizer and GroupedTrainer's per-group
    # learning rates would be ignored; the untested-optimizer flag lets DeepSpeed accept the Trainer's AdamW.
    assert "optimizer" not in config and "scheduler" not in config
    assert config["zero_allow_untested_optimizer"] is True
    for key in TRAINER_AUTO + (ZERO3_AUTO if name == "zero3" else []):
        assert get(config, key) == "auto", key
    assert not any(k.startswith("offload") for k in zero)  # like the official zero3.json
    if name == "zero3":
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # full weights when the Trainer saves
    else:
        assert zero["overlap_comm"] and zero["contiguous_gradients"]


@pytest.mark.parametrize("name", DS)
def test_trainer_resolves_every_auto_and_deepspeed_accepts_the_result(name, tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(DS[name]), use_cpu=True, report_to="none",
                             per_device_train_batch_size=2, gradient_accumulation_steps=3, max_grad_norm=0.5)
    hf = args.hf_deepspeed_config
    config = hf.config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (2, 3)
    assert config["train_batch_size"] == 2 * 3 * args.world_size == 6
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    assert hf.is_zero3() == (name == "zero3")
    assert args.deepspeed_plugin.zero_stage == int(name[-1])
    # What is left is what depends on the model (hidden size); the Trainer fills it when it builds the engine.
    assert set(autos(config)) == {k for k in TRAINER_AUTO + ZERO3_AUTO if k.startswith("zero_optimization")
                                  and k in autos(json.loads(DS[name].read_text()))}
    model = model_for("llava-llama")
    hf.trainer_config_finalize(args, model, num_training_steps=10)
    assert autos(config) == []
    hidden = model.config.text_config.hidden_size
    assert config["zero_optimization"]["reduce_bucket_size"] == hidden * hidden
    # DeepSpeed's own parser (pydantic, unknown keys forbidden) takes the resolved config, batch sizes checked.
    parsed = DeepSpeedConfig(config)
    assert (parsed.train_batch_size, parsed.zero_optimization_stage) == (6, int(name[-1]))
    assert parsed.zero_config.gather_16bit_weights_on_model_save == (name == "zero3")


def test_official_stage1_batch_on_8_gpus_resolves_to_512():
    """global = per_device x grad_accum x processes: 16 x 4 x 8 = 512, bf16 on (the official stage 1)."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    hf = HfTrainerDeepSpeedConfig(str(DS["zero3"]))
    hf.trainer_config_process(SimpleNamespace(
        world_size=8, per_device_train_batch_size=16, gradient_accumulation_steps=4, max_grad_norm=1.0,
        learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
        save_on_each_node=False, fp16=False, fp16_full_eval=False, bf16=True, bf16_full_eval=False))
    assert hf.config["train_batch_size"] == 512 and hf.config["bf16"]["enabled"] is True
    assert hf.mismatches == []


def launch_env(config: Path, *extra: str):
    """(args, environment) that `accelerate launch --config_file config ... experiments/train.py` would use."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), *extra, "experiments/train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as launch_command does before deepspeed_launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(
            list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else []))
        cmd, env = prepare_deepspeed_cmd_env(args)
        assert cmd is None  # torchrun on each node, not DeepSpeed's pdsh launcher
        return args, env
    return args, prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name, kind, precision", [("multi_gpu", "MULTI_GPU", "bf16"), ("fsdp", "FSDP", "bf16"),
                                                    ("deepspeed_zero3", "DEEPSPEED", None)])
def test_accelerate_yaml_loads_with_accelerates_loader(name, kind, precision):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACC / f"{name}.yaml"))
    assert config.distributed_type.value == kind
    assert (config.num_machines, config.num_processes, config.mixed_precision) == (1, 8, precision)
    if name == "deepspeed_zero3":
        assert (ROOT / config.deepspeed_config["deepspeed_config_file"]).resolve() == DS["zero3"]
        assert config.deepspeed_config["deepspeed_multinode_launcher"] == "standard"


def test_fsdp_yaml_builds_the_plugin_and_wraps_a_llava(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import ShardingStrategy, StateDictType
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    _, env = launch_env(ACC / "fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["FSDP_SYNC_MODULE_STATES"] == "true"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # sync_module_states makes the plugin ask the GPU for its device index; off only here, where there is none.
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")
    plugin = FullyShardedDataParallelPlugin()  # from the environment, as Accelerator() does in each process
    assert plugin.fsdp_version == 1 and plugin.use_orig_params is True
    assert plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.activation_checkpointing is False  # left to train.gradient_checkpointing
    model = model_for("llava-llama")
    plugin.set_auto_wrap_policy(model)
    policy = plugin.auto_wrap_policy
    assert policy.func is transformer_auto_wrap_policy
    assert {c.__name__ for c in policy.keywords["transformer_layer_cls"]} == {"LlamaDecoderLayer",
                                                                             "CLIPEncoderLayer"}
    # Why the YAML lists one backbone: accelerate refuses a class the model lacks, so the four-backbone list the
    # issue suggested would stop every run; other backbones override the key (docs/training_scale.md).
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP",
                       "LlamaDecoderLayer,Qwen2DecoderLayer,MistralDecoderLayer,CLIPEncoderLayer")
    with pytest.raises(ValueError, match="Qwen2DecoderLayer"):
        FullyShardedDataParallelPlugin().set_auto_wrap_policy(model)
    # The documented override for a Mistral backbone wraps that model.
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "MistralDecoderLayer,CLIPEncoderLayer")
    FullyShardedDataParallelPlugin().set_auto_wrap_policy(model_for("next-mistral-gqa"))


def test_deepspeed_yaml_builds_a_zero3_plugin_from_the_json(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    _, env = launch_env(ACC / "deepspeed_zero3.yaml")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == "conf/deepspeed/zero3.json"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)  # the JSON's path is relative to where accelerate is launched: the repo root
    plugin = DeepSpeedPlugin()  # runs accelerate's check that the YAML sets nothing the JSON owns
    assert plugin.zero_stage == 3 and plugin.zero3_init_flag is True
    assert "optimizer" not in plugin.deepspeed_config


def test_deepspeed_yaml_with_mixed_precision_would_be_refused(monkeypatch, tmp_path):
    """Guards the deliberate absence of mixed_precision in deepspeed_zero3.yaml."""
    from accelerate.utils import DeepSpeedPlugin

    config = yaml.safe_load((ACC / "deepspeed_zero3.yaml").read_text())
    config["mixed_precision"] = "bf16"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    _, env = launch_env(bad)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match="mixed_precision"):
        DeepSpeedPlugin()


def test_two_node_launch_runs_torchrun_per_node():
    """What the SLURM recipe passes on node 1 of 2: 8 local processes, 16 in all, rendezvous on node 0."""
    args, _ = launch_env(ACC / "deepspeed_zero3.yaml", "--num_machines", "2", "--num_processes", "16",
                         "--machine_rank", "1", "--main_process_ip", "node0", "--main_process_port", "29500")
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert args.rdzv_endpoint == "node0:29500" and args.rdzv_backend == "static"


def test_sbatch_recipe_is_valid_bash_and_uses_the_shipped_config():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    assert "--config_file conf/accelerate/deepspeed_zero3.yaml" in text
    assert (ROOT / "conf/accelerate/deepspeed_zero3.yaml").is_file()
    assert "--machine_rank $SLURM_PROCID" in text and "--ntasks-per-node=1" in text


def test_deepspeed_pin_is_the_same_everywhere():
    import deepspeed

    pyproject = (ROOT / "pyproject.toml").read_text()
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("deepspeed==")]
    assert pins == [f"deepspeed=={deepspeed.__version__}"]
    assert f'scale = ["{pins[0]}"]' in pyproject
