"""pyproject.toml describes what the code needs: the Python it runs on and every third-party
package it imports, by the same names requirements.txt pins.

Watched red before the fix: against the old pyproject (requires-python >= 3.10, no
dependencies) test_python_is_3_11_or_later and test_dependencies_match_requirements failed;
with scipy left out of both files, test_every_third_party_import_is_declared named it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def name_of(requirement: str) -> str:
    """The normalised distribution name of a requirement such as `Pillow>=13` (PEP 503)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_python_is_3_11_or_later():
    # hashlib.file_digest (cxr/resume.py, cxr/bundle.py) and tomllib are new in 3.11.
    assert PROJECT["requires-python"] == ">=3.11"
    assert sys.version_info >= (3, 11)


def test_dependencies_match_requirements():
    """Same names; pyproject gives lower bounds (>=) or none, never a pin."""
    declared = PROJECT["dependencies"] + PROJECT["optional-dependencies"]["dev"]
    assert {name_of(r) for r in declared} == {name_of(r) for r in requirement_lines()}
    assert not [r for r in declared if "==" in r], "pyproject pins nothing: requirements.txt does"


def third_party_imports() -> set[str]:
    """Top-level modules imported anywhere in cxr/ and stages/ that are not ours or stdlib."""
    found = set()
    for path in [*ROOT.glob("cxr/*.py"), *ROOT.glob("stages/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"cxr", "stages", "__future__"}


def test_every_third_party_import_is_declared():
    runtime = {name_of(r) for r in PROJECT["dependencies"]}
    providers = importlib.metadata.packages_distributions()
    undeclared = {
        module: providers.get(module)
        for module in third_party_imports()
        if not {name_of(d) for d in providers.get(module, [])} & runtime
    }
    assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"
