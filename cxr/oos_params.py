"""params.yaml `oos`: the out-of-source folds (which places each holds out) and the recipe
recorded beside the operating point.

Its own module so that the report stage (cxr/oos_report.py), which only reads predictions,
depends on the folds' definitions and not on the training code that cxr/oos.py runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr.params import ParamsError


@dataclass(frozen=True)
class Fold:
    name: str
    countries: list[str]  # `country` values held out
    locations: list[str]  # `location` values held out (where a country also holds a training
    # source: ieee8023's "China" is a location, while Kermany's hospital is in China too)
    datasets: list[str]  # whole datasets held out (e.g. rsna: a source of adult normals)


def folds_from_params(raw: dict) -> list[Fold]:
    """`oos.folds` of params.yaml: [{name, countries, locations, datasets}, ...], names unique."""
    folds, keys = [], ("countries", "locations", "datasets")
    for i, item in enumerate(raw or []):
        unknown = set(item) - {"name", *keys}
        if unknown or "name" not in item:
            raise ParamsError(f"oos.folds[{i}]: keys are name, {', '.join(keys)}; "
                              f"got {sorted(item)}")  # fmt: skip
        folds.append(Fold(str(item["name"]), *(list(item.get(k) or []) for k in keys)))
    names = [f.name for f in folds]
    if not folds or len(set(names)) != len(names):
        raise ParamsError(f"oos.folds must name at least one fold, each once; got {names}")
    return folds


@dataclass(frozen=True)
class OosParams:
    specificity: float
    bootstrap: int
    tasks: list[str]
    epochs: int | None
    folds: list[Fold]


def load_oos_params(path: str | Path) -> OosParams:
    """params.yaml `oos`, every key required and checked (one line naming the bad key)."""
    import yaml

    raw = (yaml.safe_load(Path(path).read_text()) or {}).get("oos")
    keys = ("specificity", "bootstrap", "tasks", "epochs", "folds")
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: oos missing")
    for key in keys:
        if key not in raw:
            raise ParamsError(f"{path}: oos.{key} missing")
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise ParamsError(f"{path}: oos.{unknown[0]} unknown (oos takes {', '.join(keys)})")
    spec, boot, tasks, epochs = raw["specificity"], raw["bootstrap"], raw["tasks"], raw["epochs"]
    if not isinstance(spec, (int, float)) or not 0 < spec < 1:
        raise ParamsError(f"oos.specificity must be a fraction in (0, 1), got {spec!r}")
    if not isinstance(boot, int) or boot < 1:
        raise ParamsError(f"oos.bootstrap must be a positive integer, got {boot!r}")
    if not isinstance(tasks, list) or not tasks or set(tasks) - {"binary", "four_class"}:
        raise ParamsError(f"oos.tasks must list binary and/or four_class, got {tasks!r}")
    if epochs is not None and (not isinstance(epochs, int) or isinstance(epochs, bool)
                               or epochs < 1):  # fmt: skip
        raise ParamsError(f"oos.epochs must be a positive integer or null, got {epochs!r}")
    return OosParams(float(spec), boot, list(tasks), epochs, folds_from_params(raw["folds"]))


def recipe(params: dict[str, Any], epochs: int | None) -> dict[str, Any]:
    """The training recipe the binary fold models had: params.yaml's `base`, `split` and
    `train_binary`, with `oos.epochs` in place of the section's own when set. It goes beside the operating point
    so that evaluate can refuse to give it to a model trained otherwise: a threshold is a point
    on one recipe's score scale (a 2-epoch model's 0.73 is not an 8-epoch model's)."""
    train = dict(params["train_binary"])
    if epochs is not None:
        train["epochs"] = epochs
    return {"base": dict(params["base"]), "split": dict(params["split"]), "train_binary": train}
