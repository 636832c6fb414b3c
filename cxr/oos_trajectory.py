"""Out-of-source AUC epoch by epoch: a diagnosis of the epoch a run keeps (RULE.md thirty-fifth
amendment; stages/oos_trajectory.py).

Each fold's binary model trains exactly as stages/oos.py trains it (same params, seed and draws:
scoring in evaluation mode changes nothing the training sees), and after every epoch the films
the fold stage scores are scored and its held-out films' scores kept. The table says how far the out-of-source AUC
moves from one epoch to the next, and whether the in-distribution criteria (validation macro-F1,
the default; validation loss; the last epoch) keep epochs that travel. It is never a way to
choose: an epoch chosen on the held-out films would make them part of training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.config import BaseParams, TrainParams
from cxr.infer import predict_proba
from cxr.models import CXRNet
from cxr.oos import fold_rows, run_fold
from cxr.oos_params import Fold
from cxr.oos_report import adult_binary, roc_auc
from cxr.train import EpochResult

KEEP = ["path", "label", "age_group", "group_id"]
# How a run could pick its epoch from what it is allowed to see, and (last) in hindsight.
RULES = {
    "val_macro_f1": "best validation macro-F1 (the default, `select_metric: macro_f1`)",
    "val_loss": "lowest validation loss (`select_metric: loss`)",
    "last": "the last epoch",
    "hindsight": "best held-out AUC (hindsight: not a rule a run can follow)",
}


def trace_fold(images: np.ndarray, table: pd.DataFrame, fold: Fold, p: TrainParams,
               base: BaseParams) -> tuple[pd.DataFrame, dict]:  # fmt: skip
    """Train the fold's binary model as stages/oos.py does and score the films the fold stage
    scores after every epoch. Returns the long table of the held-out films (one row per film
    and epoch: p_covid) and the fold's summary with each epoch's validation loss and macro-F1."""
    _, val, out = fold_rows(table, fold)
    scored = out | val
    # Scored in the fold stage's batches (its held-out and internal-validation films), so the
    # kept epoch's scores are its to the bit; only the held-out rows are kept.
    held = out[scored]
    films = table.loc[out, KEEP].assign(scored_as="held_out")
    rows: list[pd.DataFrame] = []
    epochs: list[dict] = []

    def score(_task: str, model: CXRNet, res: EpochResult) -> None:
        p_covid = predict_proba(model, images[scored], batch_size=64)[held, 1]
        rows.append(films.assign(epoch=res.epoch, p_covid=p_covid))
        epochs.append({"epoch": res.epoch, "val_loss": res.val_loss,
                       "val_macro_f1": res.val_macro_f1})  # fmt: skip

    _, summary = run_fold(images, table, fold, {"binary": p}, base, on_epoch=score)
    summary["epochs"] = epochs
    return pd.concat(rows, ignore_index=True), summary


EPOCH_COLUMN = "p_covid_epoch"


def write_fold_csv(frame: pd.DataFrame, path: Path) -> None:
    """The long table as one row per film and one `p_covid_epochN` column per epoch: the film's
    path, label and group written once, not once per epoch (a fold's file is a fifth the size)."""
    epochs = sorted(frame["epoch"].unique())
    blocks = [frame[frame["epoch"] == e].reset_index(drop=True) for e in epochs]
    films = blocks[0].drop(columns=["epoch", "p_covid"])
    for e, block in zip(epochs, blocks, strict=True):
        # trace_fold scores the same films in the same order after every epoch
        if not block["path"].equals(films["path"]):
            raise ValueError(f"epoch {e} scored other films than epoch {epochs[0]}")
        films[f"{EPOCH_COLUMN}{e}"] = block["p_covid"]
    films.to_csv(path, index=False, float_format="%.6f")


def read_fold_csv(path: Path) -> pd.DataFrame:
    """write_fold_csv's file as the long table trace_fold returned (rows epoch by epoch)."""
    wide = pd.read_csv(path)
    scores = [c for c in wide.columns if c.startswith(EPOCH_COLUMN)]
    long = wide.melt(id_vars=[c for c in wide.columns if c not in scores], value_vars=scores,
                     var_name="epoch", value_name="p_covid")  # fmt: skip
    long["epoch"] = long["epoch"].str.removeprefix(EPOCH_COLUMN).astype(int)
    return long


def held_out_auc(frame: pd.DataFrame) -> float:
    """Adult ROC AUC of held-out films (COVID-19 vs adult non-COVID), as cxr.oos_report's."""
    adult = adult_binary(frame[frame["scored_as"] == "held_out"])
    return roc_auc((adult["label"] == "covid").to_numpy(dtype=int),
                   adult["p_covid"].to_numpy(dtype=float))  # fmt: skip


def kept_epoch(rule: str, summary: dict, aucs: dict[int, float]) -> int:
    """The epoch `rule` keeps (ties: the earliest, as train_model keeps the first best)."""
    epochs = summary["epochs"]
    if rule == "val_macro_f1":
        return max(epochs, key=lambda e: (e["val_macro_f1"], -e["epoch"]))["epoch"]
    if rule == "val_loss":
        return min(epochs, key=lambda e: (e["val_loss"], e["epoch"]))["epoch"]
    if rule == "last":
        return max(e["epoch"] for e in epochs)
    return max(aucs, key=lambda e: (aucs[e], -e))  # hindsight


def summarise(frames: dict[str, pd.DataFrame], summaries: dict[str, dict]) -> dict[str, Any]:
    """Per epoch: each fold's held-out adult AUC and the pooled one (every fold at that epoch);
    per rule: the epoch each fold keeps and the pooled AUC of those epochs."""
    folds = list(frames)
    aucs = {f: {int(e): held_out_auc(g) for e, g in frames[f].groupby("epoch")} for f in folds}
    epochs = sorted(set().union(*(a.keys() for a in aucs.values())))
    per_epoch = []
    for e in epochs:
        pooled = pd.concat([frames[f][frames[f]["epoch"] == e] for f in folds])
        per_epoch.append({"epoch": e, "folds": {f: aucs[f].get(e) for f in folds},
                          "pooled": held_out_auc(pooled)})  # fmt: skip
    rules = {}
    for rule in RULES:
        kept = {f: kept_epoch(rule, summaries[f], aucs[f]) for f in folds}
        pooled = pd.concat([frames[f][frames[f]["epoch"] == kept[f]] for f in folds])
        rules[rule] = {"epochs": kept, "folds": {f: aucs[f][kept[f]] for f in folds},
                       "pooled": held_out_auc(pooled)}  # fmt: skip
    return {"per_epoch": per_epoch, "rules": rules,
            "kept": {f: summaries[f]["binary"]["best_epoch"] for f in folds}}  # fmt: skip


def auc_cell(v: float | None) -> str:
    """An AUC as a table shows it: three decimals, "-" where a fold had no AUC at that epoch."""
    return "-" if v is None or math.isnan(v) else f"{v:.3f}"


def markdown(result: dict[str, Any], params: str) -> str:
    folds = list(result["kept"])
    head = "| {} | " + " | ".join(f"fold {f}" for f in folds) + " | pooled |"
    lines = [
        "# Out-of-source AUC epoch by epoch (a diagnosis)", "",
        f"Generated by stages/oos_trajectory.py from `{params}`; do not edit. Held-out adult ROC "
        "AUC (COVID-19 vs adult non-COVID) of each fold's binary model after every epoch of "
        "the same training stages/oos.py runs; pooled = every fold's model at that epoch. "
        "Protocol: reports/oos/RULE.md, thirty-fifth amendment.", "",
        head.format("epoch"), "|---" * (len(folds) + 2) + "|",
    ]  # fmt: skip
    for row in result["per_epoch"]:
        cells = [auc_cell(row["folds"][f]) for f in folds] + [auc_cell(row["pooled"])]
        lines.append(f"| {row['epoch']} | " + " | ".join(cells) + " |")
    lines += ["", "Each fold's epoch as a rule would keep it (the epoch in brackets):", "",
              head.format("kept by"), "|---" * (len(folds) + 2) + "|"]  # fmt: skip
    for rule, r in result["rules"].items():
        cells = [f"{auc_cell(r['folds'][f])} ({r['epochs'][f]})" for f in folds]
        lines.append(f"| {RULES[rule]} | " + " | ".join(cells) + f" | {auc_cell(r['pooled'])} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, names: list[str], params: str) -> dict[str, Any]:
    """trajectory.{json,md} from the files of folds `names` in `out`."""
    frames = {f: read_fold_csv(out / f"{f}.csv") for f in names}
    summaries = {f: json.loads((out / f"{f}.json").read_text()) for f in names}
    result = summarise(frames, summaries)
    (out / "trajectory.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "trajectory.md").write_text(markdown(result, params))
    return result
