"""dvc.yaml and oos/dvc.yaml cover the code each stage runs: every `cxr` module a stage script imports,
directly or through another cxr module, is in that stage's deps.

Checked by hand: removing `cxr/infer.py` from the evaluate stage's deps turns
test_every_imported_module_is_a_dep red, naming the stage and the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def cxr_imports(path: Path) -> set[str]:
    """The cxr modules one file imports (as repo-relative paths)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.split(".")[0] != "cxr":
                continue
            candidate = ROOT / (name.replace(".", "/") + ".py")
            if candidate.is_file():
                found.add(candidate.relative_to(ROOT).as_posix())
    return found


def transitive_imports(script: str) -> set[str]:
    """Every cxr module reachable from `script` through imports."""
    seen: set[str] = set()
    todo = [script]
    while todo:
        current = todo.pop()
        for module in cxr_imports(ROOT / current):
            if module not in seen and module != "cxr/__init__.py":
                seen.add(module)
                todo.append(module)
    return seen


PIPELINES = ("dvc.yaml", "oos/dvc.yaml")  # the default pipeline and out-of-source validation


def stage_scripts() -> dict[str, tuple[str, set[str]]]:
    out = {}
    for pipeline in PIPELINES:
        for name, stage in yaml.safe_load((ROOT / pipeline).read_text())["stages"].items():
            out[f"{pipeline}:{name}"] = _script_and_deps(stage.get("do", stage))
    return out


def _script_and_deps(stage: dict) -> tuple[str, set[str]]:
    """A stage's (or a foreach stage's `do`) script and its deps."""
    script = next(w for w in stage["cmd"].split() if w.startswith("stages/"))
    deps = {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
    return script, deps


def test_import_graph_finds_transitive_modules():
    # stages/train.py imports cxr.train, which imports cxr.data: both must be found.
    mods = transitive_imports("stages/train.py")
    assert {"cxr/train.py", "cxr/data.py", "cxr/infer.py"} <= mods


def test_every_imported_module_is_a_dep():
    missing = {
        name: sorted(transitive_imports(script) - deps)
        for name, (script, deps) in stage_scripts().items()
    }
    assert not {k: v for k, v in missing.items() if v}, f"stage deps lack imported code: {missing}"


def test_every_stage_script_is_a_dep_and_no_stale_code_deps():
    for name, (script, deps) in stage_scripts().items():
        assert script in deps, f"{name}: its own script {script} is not a dep"
        code = {d for d in deps if d.startswith("cxr/")}
        stale = code - transitive_imports(script)
        assert not stale, f"{name}: deps on modules it never imports (needless re-runs): {stale}"


def test_the_locks_record_the_code_in_the_repository():
    """Every code file a stage depends on (cxr/ and stages/, kept in git) has the md5 its
    dvc.lock records: the committed metrics, plots and models come from this code, and a
    refactor left without a re-run (or a `dvc commit` once the outputs are shown unchanged) is
    caught before it lands. Checked by hand: dvc.lock's ensemble.py entry as left by 92b0966
    (the refactor landed, evaluate and gradcam not re-run) turned this red. The comparison is
    cxr.relock's, the tool that records such a refactor (tests/test_relock.py)."""
    from cxr.relock import stale_code_deps

    stale = [f"{s.lock}:{s.stage}: {s.path}" for s in stale_code_deps(ROOT)]
    assert not stale, (
        "code changed since the stage ran (dvc repro, then commit dvc.lock; for a change shown "
        "not to alter outputs, python -m cxr.relock --write: docs/development.md): "
        + ", ".join(stale)
    )
