"""Every Python block of the README and docs/ runs as written, on the embedded tiny checkpoints, so a reader who
copies one meets no stale import, no name the block forgot to import, no layer the model does not have; every
FLOPs command (``python -m analysis.flops ...``) runs, and prints the figures the page shows after it; every job of
every runner command (``experiments/run.py ...``) is a valid run (prepared as the sweeper prepares it before any
work, against the model's real config.json where the weights are not here).

Each block runs on its own, in a fresh namespace holding what its page leaves to the reader -- ``model``,
``processor``, ``image``, ``prompt``, ``batch``, ``path`` (and ``torch``) -- built here per page: the tiny LLaVA
checkpoint for the LLaVA pages; for docs/qwen.md its own first block, which builds the tiny Qwen3-VL and its batch;
for docs/training_data.md a ``train.json`` and ``images_root/`` exported from the twins. A block whose comment says
its ``model`` is another kind (a ProxyV model) gets that kind. docs/running.md's registration of the proxyv family
runs on a registry without it, and must register what analysis/families.py does.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
REGISTRATION = ("docs/running.md", 0)  # the proxyv family's registration, as analysis/families.py writes it
PROXYV_MODEL = {("docs/flops.md", 1): "checkpoints/tiny-llava-proxyv-L16"}  # "model: a ProxyV model"


def code_blocks(page: str) -> list[tuple[int, str]]:
    """(line, code) of every ```python block of ``page``."""
    text = (REPO / page).read_text()
    return [(text[:m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"```python\n(.*?)```", text, re.DOTALL)]


BLOCKS = [(page, index, line) for page in PAGES for index, (line, _) in enumerate(code_blocks(page))]


def llava_reader(checkpoint: str = "checkpoints/tiny-llava") -> dict:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from analysis.proxyv import load_proxyv

    processor = AutoProcessor.from_pretrained(REPO / "checkpoints/tiny-llava")
    if checkpoint == "checkpoints/tiny-llava":
        model = LlavaForConditionalGeneration.from_pretrained(REPO / checkpoint).eval()
    else:
        model = load_proxyv(REPO / checkpoint).eval()
    side = processor.image_processor.crop_size["height"]
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (side, side, 3), dtype=np.uint8))
    prompt = "USER: <image>\nWhat is written here? ASSISTANT:"
    batch = processor(images=image, text=prompt, return_tensors="pt")
    return {"model": model, "processor": processor, "image": image, "prompt": prompt, "batch": batch}


def qwen_reader() -> dict:
    """What docs/qwen.md's first block leaves behind: its tiny Qwen3-VL, processor and video batch."""
    line, code = code_blocks("docs/qwen.md")[0]
    namespace: dict = {}
    exec(compile(code, f"docs/qwen.md:{line}", "exec"), namespace)
    return namespace


def training_data_reader(tmp_path: Path) -> dict:
    """A LLaVA conversation file and image folder, as the page reads them from the working directory."""
    from transformers import AutoProcessor

    from analysis.training.llava_data import export_twins

    json_path = export_twins(tmp_path / "images_root", 1, "train", 0)
    shutil.copyfile(json_path, tmp_path / "train.json")
    return {"processor": AutoProcessor.from_pretrained(REPO / "checkpoints/tiny-llava")}


def registry_without_proxyv(monkeypatch) -> dict:
    """The family registry without the proxyv family, and the names its registration uses."""
    from analysis import families, variant

    variant.family("ablation")  # the built-in families are registered
    monkeypatch.setattr(variant, "FAMILIES", {k: v for k, v in variant.FAMILIES.items() if k != "proxyv"})
    return {"register_family": variant.register_family, "Family": variant.Family,
            "_proxyv_layers": families._proxyv_layers}


def test_every_page_has_its_blocks_found():
    """The pages with Python examples are found, so a block cannot silently drop out of the test."""
    pages = {page for page, _, _ in BLOCKS}
    assert {"README.md", "docs/flops.md", "docs/proxyv.md", "docs/qwen.md", "docs/reduction.md"} <= pages
    assert {REGISTRATION, *PROXYV_MODEL} <= {(page, index) for page, index, _ in BLOCKS}


@pytest.mark.parametrize(("page", "index", "line"), BLOCKS, ids=[f"{p}:{line}" for p, _, line in BLOCKS])
def test_docs_code_runs(page, index, line, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    reader = {"torch": torch, "path": str(tmp_path / "saved")}
    if (page, index) == REGISTRATION:
        reader |= registry_without_proxyv(monkeypatch)
    elif page == "docs/qwen.md":
        if index == 0:
            reader = {}
        else:
            reader |= qwen_reader()
    elif page == "docs/training_data.md":
        reader |= training_data_reader(tmp_path)
        monkeypatch.chdir(tmp_path)
    else:
        reader |= llava_reader(PROXYV_MODEL.get((page, index), "checkpoints/tiny-llava"))
    _, code = code_blocks(page)[index]
    with torch.no_grad():
        exec(compile(code, f"{page}:{line}", "exec"), reader)
    if (page, index) == REGISTRATION:  # what the page registers is what the package registers
        from analysis import families, variant

        shown, real = variant.FAMILIES["proxyv"], families.PROXYV
        for field in ("resolve", "execute", "flops", "trained", "label_params"):
            assert getattr(shown, field) == getattr(real, field), field
        assert shown.methods() == real.methods()


FENCE = re.compile(r"^```([a-z]*)\n(.*?)^```\n", re.DOTALL | re.MULTILINE)


def shell_commands(page: str):
    """(line, command, shown output) of every command line in ``page``'s shell blocks, continuation lines joined and
    comments dropped; the output is the untyped block right after the shell block, given with its first command
    (the one it shows), None otherwise."""
    text = (REPO / page).read_text()
    fences = list(FENCE.finditer(text))
    for i, fence in enumerate(fences):
        if fence.group(1) not in ("bash", "sh"):
            continue
        after = fences[i + 1] if i + 1 < len(fences) else None
        shown = after.group(2) if after and after.group(1) == "" and not text[fence.end():after.start()].strip() \
            else None
        line = text[:fence.start()].count("\n") + 2
        for n, command in enumerate(fence.group(2).replace("\\\n", " ").splitlines()):
            yield line, command.split(" #")[0], shown if n == 0 else None


def flops_commands(page: str) -> list[tuple[int, list[str], str | None]]:
    """(line, argv, shown output) of every ``python -m analysis.flops`` command in ``page``'s shell blocks. Optional
    flags written ``[--json]`` are left out; a command naming a placeholder ``PATH`` is not one to run."""
    return [(line, shlex.split(re.sub(r"\[--[^\]]*\]", "", command))[3:], shown)
            for line, command, shown in shell_commands(page)
            if "-m analysis.flops" in command and "PATH" not in command]


COMMANDS = [(page, *command) for page in PAGES for command in flops_commands(page)]


def test_the_flops_commands_are_found():
    assert len(COMMANDS) >= 8 and sum(shown is not None for *_, shown in COMMANDS) >= 4


@pytest.mark.parametrize(("page", "line", "argv", "shown"), COMMANDS,
                         ids=[f"{page}:{line}:{' '.join(argv[-4:])}" for page, line, argv, _ in COMMANDS])
def test_docs_flops_command_prints_what_the_page_shows(page, line, argv, shown):
    from analysis.flops.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    assert code in (0, None), f"{page}:{line}: exit {code}"
    if shown is None:
        return
    printed, at = out.getvalue().splitlines(), 0
    for expected in shown.splitlines():  # in order; a "..." line stands for lines the page leaves out
        if expected.strip() == "...":
            continue
        while at < len(printed) and printed[at].rstrip() != expected.rstrip():
            at += 1
        assert at < len(printed), f"{page}:{line}: the page shows {expected!r}, which the command does not print"
        at += 1


def run_commands(page: str) -> list[tuple[int, list[str]]]:
    """(line, overrides) of every ``experiments/run.py`` command in ``page``'s shell blocks (``-m`` dropped)."""
    found = []
    for line, command, _ in shell_commands(page):
        if "experiments/run.py" in command:
            argv = shlex.split(command.split("&&")[-1])
            argv = argv[[a.endswith("experiments/run.py") for a in argv].index(True) + 1:]
            found.append((line, [a for a in argv if a != "-m"]))
    return found


RUN_COMMANDS = [(page, line, argv) for page in PAGES for line, argv in run_commands(page)]


def jobs_of(argv: list[str]) -> list[list[str]]:
    """The jobs of a command line as Hydra's basic sweeper expands it: every combination of the swept values
    (``a=1,2 b=3,4``: four jobs); ``hydra*`` overrides (how a sweep is launched, not what it computes) left out."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes = []
    for override in OverridesParser.create().parse_overrides(argv):
        key = override.input_line.split("=", 1)[0]
        if key.lstrip("+~").startswith("hydra"):
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() \
            else [override.get_value_element_as_str()]
        axes.append([f"{key}={value}" for value in values])
    return [list(job) for job in itertools.product(*axes)]


def test_the_run_commands_are_found():
    assert len(RUN_COMMANDS) >= 15


@pytest.mark.parametrize(("page", "line", "argv"), RUN_COMMANDS,
                         ids=[f"{page}:{line}:{' '.join(argv)[:60]}" for page, line, argv in RUN_COMMANDS])
def test_docs_run_command_jobs_are_valid_runs(page, line, argv, tmp_path, monkeypatch):
    """Each job composes and passes the runner's own validation (:func:`analysis.runner.spec.prepare`): group
    options, layer ranges against the model's depth, method parameters, trained checkpoints, FLOPs countable. A
    model whose weights are not here is read from its shipped config.json (``analysis/configs``): the same layer
    count and classes, no weights needed to validate. The main job and an experiment (their grids) go through the
    sweeper itself with ``run.dry_run=true``, which validates every job the same way."""
    from analysis.config_groups import ConfigError
    from analysis.runner import spec as spec_module
    from conftest import composed_config

    from analysis.sweep import check_overrides

    if not argv or any(a.startswith("+experiment=") for a in argv):  # grids: the sweeper's own dry run checks them
        import subprocess
        import sys

        out = subprocess.run([sys.executable, str(REPO / "experiments/run.py"), *argv, "run.dry_run=true",
                              f"run.runs_dir={tmp_path / 'runs'}", f"run.reports_dir={tmp_path / 'reports'}"],
                             cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, f"{page}:{line}: {out.stderr[-1500:]}"
        assert re.match(r"sweep \(dry run\): \d+ runs", out.stdout), out.stdout[:500]
        return
    check_overrides(argv)
    real = spec_module.resolve_weights

    def weights_or_config(model: dict) -> str:
        try:
            return real(model)
        except ConfigError as error:
            if "weights not found" not in str(error) and "not a directory" not in str(error):
                raise
            shipped = REPO / "analysis/configs" / f"{model.get('flops_config') or model['name']}.json"
            folder = tmp_path / model["name"]
            folder.mkdir(exist_ok=True)
            shutil.copyfile(shipped, folder / "config.json")
            return str(folder)

    monkeypatch.setattr(spec_module, "resolve_weights", weights_or_config)
    monkeypatch.chdir(REPO)
    for job in jobs_of(argv):
        prepared = spec_module.prepare(composed_config(*job, f"run.runs_dir={tmp_path / 'runs'}"))
        assert prepared.variant.method == prepared.cfg["op"]["name"] or prepared.variant.family == "proxyv"
