"""A prior for "normal" on adult films, as a diagnosis (reports/oos/RULE.md, fifty-fourth
amendment): how far must the four-class model's "normal" be pushed before 70% of the held-out
adult normals are called normal, and what does that cost in COVID-19 and pneumonia films?

    python oos/prior_normal.py --out reports/oos/prior_normal.json

Reads the committed fold files of the default four-class recipe's out-of-source runs (no
training, no scoring): the shift `b` is added to the log-probability of "normal" and the call is
the argmax again. It chooses nothing (the amendment says why).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from cxr.config import FOUR_CLASSES as ORDER  # the fold files' columns, p4_<class>

NORMAL = ORDER.index("normal")
GRID = np.round(np.arange(0, 8.0001, 0.05), 2)  # the amendment's grid of shifts
TARGET = 0.70  # the share of held-out adult normals called normal
PNEUMONIA = {"viral", "bacterial", "pneumonia"}
RUNS = ("four_class_folds", "four_class_folds_seed43", "four_class_zen5",
        "four_class_zen5_seed43", "four_class_xeon")  # fmt: skip
SEED_PAIRS = (("four_class_folds", "four_class_folds_seed43"),
              ("four_class_zen5", "four_class_zen5_seed43"))  # fmt: skip
CANDIDATES = Path("reports/oos/candidates")


def shifted_calls(p: np.ndarray, b: float) -> np.ndarray:
    """Argmax after adding `b` to log p(normal): p(normal) times e^b, then renormalised (the
    argmax does not need the renormalising)."""
    q = np.array(p, dtype=float, copy=True)
    q[:, NORMAL] *= np.exp(b)
    return np.array(ORDER)[q.argmax(axis=1)]


def called_normal(fold: pd.DataFrame, b: float) -> dict[str, dict]:
    """Held-out adult films called normal at shift `b`, by what they are."""
    adult = fold[(fold["scored_as"] == "held_out") & (fold["age_group"] == "adult")]
    calls = shifted_calls(adult[[f"p4_{c}" for c in ORDER]].to_numpy(), b)
    out = {}
    for name, mask in (("normal", adult["label"] == "normal"),
                       ("covid", adult["label"] == "covid"),
                       ("pneumonia", adult["label"].isin(PNEUMONIA))):  # fmt: skip
        m = mask.to_numpy()
        if m.any():
            out[name] = {
                "n": int(m.sum()),
                "called_normal": round(float((calls[m] == "normal").mean()), 3),
            }
    normals = (adult["label"] == "normal").to_numpy()
    if normals.any():
        out["normal"]["called_covid"] = round(float((calls[normals] == "covid").mean()), 3)
    return out


def smallest_shift(fold: pd.DataFrame) -> float | None:
    """The smallest `b` of the grid calling at least TARGET of the held-out adult normals normal."""
    for b in GRID:
        if called_normal(fold, b)["normal"]["called_normal"] >= TARGET:
            return float(b)
    return None


def fold_files(run: str) -> dict[str, pd.DataFrame]:
    folder = CANDIDATES / run / "folds"
    return {f.name.removesuffix(".csv.gz"): pd.read_csv(f) for f in sorted(folder.glob("*.csv.gz"))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")
    args = parser.parse_args(argv)
    folds_by_run = {run: fold_files(run) for run in RUNS}  # each run's files read once
    shifts = {run: smallest_shift(folds["europe"]) for run, folds in folds_by_run.items()}
    runs = {run: {"shift": shifts[run],
                  "folds": {name: {"without": called_normal(f, 0.0), "with": called_normal(f, shifts[run])}
                            for name, f in folds_by_run[run].items()}}
            for run in RUNS}  # fmt: skip
    carried = {f"{a} -> {c}": {"shift": shifts[a], "europe": called_normal(folds_by_run[c]["europe"], shifts[a])}
               for x, y in SEED_PAIRS for a, c in ((x, y), (y, x))}  # fmt: skip
    mean = float(np.mean([shifts[r] for r in SEED_PAIRS[0]]))
    result = {"amendment": "fifty-fourth", "target": TARGET, "runs": runs, "carried_to_the_other_seed": carried,
              "mean_shift_four_class_folds": mean}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for run, r in runs.items():
        print(f"{run}: b = {r['shift']}")
        for name, f in r["folds"].items():
            print(f"  {name:9s} without {f['without']}\n  {'':9s} with    {f['with']}")
    print(f"mean b of four_class_folds' two seeds: {mean}; written to {args.out}")


if __name__ == "__main__":
    main()
