"""The shape of the package holds: dependencies point one way, every concept lives in one place, and
entry points stay thin. Each rule fails here the day it stops holding (read from the source's imports,
and, for what a module pulls in at run time, from a fresh interpreter's sys.modules)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "analysis"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (at any depth of its code, lazily or not)."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def _sources(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def _offenders(files, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in files:
        bad = sorted(n for n in imports_of(path) if n.startswith(forbidden) and n.split(".")[0] != "__future__")
        if bad:
            found[str(path.relative_to(REPO))] = bad
    return found


def test_analysis_never_imports_experiments():
    assert _offenders(_sources(PACKAGE), ("experiments",)) == {}


def test_layout_imports_nothing_of_ours():
    """The token layout is a leaf: layout.py (LLaVA, and the dispatch by model type) imports layout_qwen.py
    (Qwen-VL) and the crop grid both are made of; those two import nothing of ours but the crop grid."""
    leaves = [PACKAGE / "layout_qwen.py", PACKAGE / "crop_grid.py"]
    found = _offenders([PACKAGE / "layout.py", *leaves], ("analysis",))
    assert {path: sorted({name.rsplit(".", 1)[0] if name.count(".") > 1 else name for name in names})
            for path, names in found.items()} == {"analysis/layout.py": ["analysis.crop_grid", "analysis.layout_qwen"],
                                                  "analysis/layout_qwen.py": ["analysis.crop_grid"]}


def test_proxyv_does_not_import_flops():
    """FLOPs may read ProxyV's shapes; ProxyV never reads FLOPs (one direction)."""
    assert _offenders(_sources(PACKAGE / "proxyv"), ("analysis.flops",)) == {}


def test_flops_does_not_import_the_runner_or_the_eval_bridge():
    assert _offenders(_sources(PACKAGE / "flops"), ("analysis.runner", "analysis.sweep", "analysis.eval_bridge",
                                                      "analysis.lmms_model", "lmms_eval", "hydra")) == {}


def test_report_and_results_read_files_only():
    forbidden = ("torch", "transformers", "lmms_eval", "hydra", "analysis.runner", "analysis.sweep",
                 "analysis.eval_bridge", "analysis.flops", "analysis.lmms_model")
    files = [*_sources(PACKAGE / "report"), PACKAGE / "results.py", PACKAGE / "variant.py"]  # every report module
    assert len(files) > 3 and _offenders(files, forbidden) == {}
    code = ("import sys, analysis.report, analysis.results, analysis.variant; "
            "analysis.variant.family('ablation'); "
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {('torch', 'transformers', 'lmms_eval', 'hydra')!r}"
            " or m.startswith(('analysis.runner', 'analysis.sweep', 'analysis.flops'))); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_one_map_of_supported_llava_classes():
    """Only analysis/models.py names the LLaVA generation classes in code (training the tiny model aside)."""
    names = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
    found = []
    for path in _sources(PACKAGE):
        if path.name == "models.py" or "training" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name) and node.id in names:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == []


def test_one_class_per_concept_name():
    """One Variant, one thing called *Layout*, no second `evaluate`: the names say what things are."""
    defined: dict[str, list[str]] = {}
    for path in _sources(PACKAGE):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.col_offset == 0:
                defined.setdefault(node.name, []).append(str(path.relative_to(REPO)))
    assert defined["Variant"] == ["analysis/variant.py"]
    assert {file for name, files in defined.items() if name.endswith("Layout") for file in files} == \
        {"analysis/layout.py", "analysis/layout_qwen.py"}  # the token layout: one concept, LLaVA's and Qwen-VL's
    assert "evaluate" not in defined


def test_variant_families_register_in_one_place():
    """What a run changes is not listed anywhere else (no op lists beside the registry)."""
    for path in _sources(PACKAGE):
        text = path.read_text()
        for stale in ("EXTRA_OPS", "KNOWN_OPS", "DEFERRED_VARIANTS", "register_variant("):
            assert stale not in text, f"{path.relative_to(REPO)} still has {stale}"
    from analysis.variant import FAMILIES, family

    family("ablation")
    assert sorted(FAMILIES) == ["ablation", "proxyv", "reduction"]
    for fam in FAMILIES.values():
        assert callable(fam.load("execute")) and callable(fam.load("flops"))


def _import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (at any depth of its code): an imported name that is not
    a module (``from .layout import CropGrid``) counts as its module."""
    modules = {_module_name(path): path for path in _sources(PACKAGE)}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for imported in imports_of(path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                edges.add(imported)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of two or more modules that import each other, directly or around a loop (strongly connected
    components, found by following every module's imports; iterative, so any depth)."""
    reach = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        reach[start] = seen
    groups = {frozenset(b for b in graph if b in reach[a] and a in reach[b]) | {a} for a in graph}
    return sorted(sorted(group) for group in groups if len(group) > 1)


def test_circles_finds_a_loop_and_only_loops():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({**graph, "c": {"d"}}) == []


def test_no_module_imports_itself_around_a_loop():
    """Imports run one way: no two modules of the package import each other, even lazily inside a function.
    (The variant registry loads analysis.families by name on first use, importlib, not an import: the one
    deliberate loop, as in lm-eval's registry; it is not an import statement and not seen here.)"""
    assert circles(_import_graph()) == []


@pytest.mark.parametrize("script", sorted((REPO / "experiments").glob("*.py")), ids=lambda p: p.name)
def test_entry_points_are_thin(script):
    assert len(script.read_text().splitlines()) <= 80
