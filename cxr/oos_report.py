"""Out-of-source report: pool the folds' held-out predictions into per-fold and pooled results.

cxr/oos.py trains and scores the folds; this module only reads their predictions (so that a
change to the report does not make the folds' hours of training stale). It computes adult ROC AUC,
sensitivity at 90% specificity and specificity at 90% sensitivity with patient-bootstrap CIs,
chooses the COVID-19 operating point on the pooled held-out adult non-COVID films, breaks the
held-out non-COVID films down by finding, and writes reports/oos/results.md.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.metrics import bootstrap_ci

# --- pooled metrics --------------------------------------------------------------------------


def plain_or_packed(path: Path) -> Path:
    """`path`, or its gzipped twin `<path>.gz` where only that one is kept (oos/candidate.sh packs
    committed runs' fold files so: a twentieth of the bytes, the same rows); `path` when
    neither exists."""
    packed = path.with_name(path.name + ".gz")
    return packed if not path.exists() and packed.exists() else path


def pack(path: Path) -> Path:
    """Replace the plain file `path` by its gzipped twin (no time in the header: the same
    bytes on every run) and return the twin's path."""
    packed = path.with_name(path.name + ".gz")
    with open(path, "rb") as src, gzip.GzipFile(packed, "wb", compresslevel=9, mtime=0) as dst:
        shutil.copyfileobj(src, dst)
    path.unlink()
    return packed


def fold_file(folder: Path, fold: str) -> Path:
    """A fold's predictions in `folder`: `<fold>.csv` or its packed twin (plain_or_packed)."""
    return plain_or_packed(folder / f"{fold}.csv")


FILM = ["path", "scored_as"]  # one row of a fold file: a film, held out or internal validation


def require_same_films(a: pd.DataFrame, b: pd.DataFrame, what: str) -> None:
    """ValueError unless two fold files score the same films, each once: a comparison or a
    mean of their scores would otherwise be of different things."""
    odd = a.set_index(FILM).index.symmetric_difference(b.set_index(FILM).index)
    if len(a) != len(b) or len(odd):
        raise ValueError(f"{what} ({len(a)} and {len(b)} rows) do not score the same films, "
                         f"e.g. {list(odd[:1])}")  # fmt: skip


def largest_difference(scored: pd.DataFrame, before: pd.DataFrame, columns: list[str]) -> float:
    """The largest |difference| in `columns` between two scorings of the same films: how closely
    a re-run reproduces committed fold predictions (a candidate's check before it is judged)."""
    require_same_films(scored, before, "the new and the committed fold files")
    both = scored.merge(before, on=FILM, suffixes=("", "_before"), validate="1:1")
    return float(max((both[c] - both[f"{c}_before"]).abs().max() for c in columns))


def mean_covid_scores(binary: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """One fold's binary predictions with p_covid the plain mean of its p(COVID-19) and another
    model's on the same films: a two-member ensemble from fold files, no training. `other` is
    the four-class model's fold file (its p4_covid; its four-class columns are kept, so the
    report gives both: RULE.md forty-eighth amendment) or another binary model's (its p_covid:
    the fifty-first)."""
    require_same_films(binary, other, "the two fold files")
    if "p4_covid" in other:
        theirs = other[FILM + [c for c in other.columns if c.startswith("p4_")] + ["call4"]]
        score = "p4_covid"
    else:
        theirs, score = other[FILM + ["p_covid"]].rename(columns={"p_covid": "p_other"}), "p_other"
    out = binary.merge(theirs, on=FILM, how="left", validate="1:1")
    out["p_covid"] = (out["p_covid"] + out[score]) / 2
    return out.drop(columns="p_other", errors="ignore")


def adult_binary(frame: pd.DataFrame) -> pd.DataFrame:
    """Adult films only: COVID-19 vs adult non-COVID (children are all non-COVID: a shortcut)."""
    return frame[frame["age_group"] == "adult"]


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def threshold_at_specificity(negatives: np.ndarray, specificity: float) -> float:
    """The smallest threshold calling at least `specificity` of `negatives` negative.

    A film is called positive when p >= threshold, so the threshold is just above the
    ceil(specificity * n)-th smallest negative score (ties: all negatives at that score stay
    negative, which can only raise the achieved specificity).
    """
    s = np.sort(np.asarray(negatives, dtype=float))
    if not len(s):
        raise ValueError("no negative films to set a threshold on")
    k = int(np.ceil(specificity * len(s) - 1e-9))
    if k <= 0:
        return float(s[0])
    return float(np.nextafter(s[k - 1], np.inf))


def sens_at_spec(y: np.ndarray, s: np.ndarray, spec: float = 0.9) -> float:
    if not 0 < y.sum() < len(y):
        return float("nan")
    t = threshold_at_specificity(s[y == 0], spec)
    return float(np.mean(s[y == 1] >= t))


def spec_at_sens(y: np.ndarray, s: np.ndarray, sens: float = 0.9) -> float:
    """Specificity at the highest threshold that calls at least `sens` of the positives positive."""
    if not 0 < y.sum() < len(y):
        return float("nan")
    pos = np.sort(s[y == 1])[::-1]
    t = pos[int(np.ceil(sens * len(pos) - 1e-9)) - 1]
    return float(np.mean(s[y == 0] < t))


STATISTICS = {"roc_auc": roc_auc, "sensitivity_at_90_specificity": sens_at_spec,
              "specificity_at_90_sensitivity": spec_at_sens}  # fmt: skip


def group_bootstrap(
    y: np.ndarray, s: np.ndarray, groups: np.ndarray, n: int, seed: int, level: float = 0.95
) -> dict:
    """Point and percentile CI of each statistic, resampling whole patient groups
    (cxr.metrics.bootstrap_ci, the evaluate stage's bootstrap, on scores as two columns)."""

    def on_scores(fn):  # bootstrap_ci passes (labels, N x 2 probabilities)
        return lambda labels, prob: fn(labels, prob[:, 1])

    ci = bootstrap_ci(y, np.c_[1 - s, s], groups, {k: on_scores(fn) for k, fn in STATISTICS.items()},
                      n_resamples=n, seed=seed, level=level)  # fmt: skip
    return {k: {part: _num(v[part]) for part in ("point", "low", "high")} for k, v in ci.items()}


def _num(v: float | None) -> float | None:
    return None if v is None or np.isnan(v) else round(float(v), 4)


def four_class_rates(frame: pd.DataFrame) -> dict:
    """Call rates of the four-class model on held-out adult normals and adult COVID-19 films."""
    out: dict = {}
    if "call4" not in frame:
        return out  # four-class not run (oos.tasks)
    for label in ("normal", "covid"):
        rows = frame[(frame["age_group"] == "adult") & (frame["label"] == label)]
        if len(rows):
            rates = rows["call4"].value_counts(normalize=True)
            out[f"adult_{label}"] = {"n": len(rows)} | {
                k: round(float(rates.get(k, 0.0)), 4)
                for k in ("covid", "viral", "bacterial", "normal")
            }
    return out


def binary_report(frame: pd.DataFrame, threshold: float | None, n_boot: int, seed: int) -> dict:
    """Adult ROC AUC and operating points with patient-bootstrap CIs; calls at `threshold`."""
    adult = adult_binary(frame)
    y = (adult["label"] == "covid").to_numpy(dtype=int)
    s = adult["p_covid"].to_numpy(dtype=float)
    out = {"n_covid": int(y.sum()), "n_non_covid": int(len(y) - y.sum())}
    if 0 < y.sum() < len(y):
        out |= group_bootstrap(y, s, adult["group_id"].to_numpy(), n_boot, seed)
    if threshold is not None:
        out["at_threshold"] = {
            "sensitivity": _num(np.mean(s[y == 1] >= threshold)) if y.sum() else None,
            "specificity": _num(np.mean(s[y == 0] < threshold)) if (y == 0).sum() else None,
        }
    return out


def by_finding(frame: pd.DataFrame, threshold: float) -> list[dict]:
    """Each fold's held-out adult non-COVID films, by their sources.csv `finding`: how many, how
    many the pooled threshold calls COVID-19, and the ROC AUC of the fold's held-out adult
    COVID-19 films against that finding alone. A fold's AUC mixes what its negatives are; this
    says which of them the model confuses with COVID-19. Empty without a `finding` column."""
    if "finding" not in frame:
        return []
    rows = []
    for fold, part in adult_binary(frame).groupby("fold", sort=False):
        covid = part.loc[part["label"] == "covid", "p_covid"].to_numpy(dtype=float)
        negatives = part[part["label"] != "covid"]
        for finding, films in negatives.groupby("finding", sort=True):
            s = films["p_covid"].to_numpy(dtype=float)
            y = np.r_[np.ones(len(covid), dtype=int), np.zeros(len(s), dtype=int)]
            rows.append({"fold": fold, "finding": finding, "n": len(s),
                         "called_covid": _num(np.mean(s >= threshold)),
                         "roc_auc_vs_fold_covid": _num(roc_auc(y, np.r_[covid, s]))})  # fmt: skip
    return rows


def report(frame: pd.DataFrame, specificity: float, n_boot: int, seed: int) -> dict:
    """Per fold and pooled results, and the COVID-19 threshold chosen on the pooled folds:
    the smallest giving `specificity` on held-out adult non-COVID films. Rows scored as
    `internal_val` (the fold's own validation films) give the in-distribution estimate of the
    same models, reported beside; they choose nothing."""
    scored_as = frame["scored_as"] if "scored_as" in frame else pd.Series("held_out", frame.index)
    internal, frame = frame[scored_as == "internal_val"], frame[scored_as == "held_out"]
    if "p_covid" not in frame:  # oos.tasks without binary: the four-class calls alone
        return four_class_only(frame)
    adult = adult_binary(frame)
    negatives = adult.loc[adult["label"] != "covid", "p_covid"].to_numpy(dtype=float)
    threshold = threshold_at_specificity(negatives, specificity)
    result = {
        "operating_point": {"threshold": round(threshold, 6), "rule": (
            f"smallest p(COVID-19) threshold calling >= {specificity:.0%} of the pooled held-out "
            "adult non-COVID films negative"), "n_negatives": len(negatives)},
        "pooled": {"binary": binary_report(frame, threshold, n_boot, seed),
                   "four_class": four_class_rates(frame), "n": len(frame)},
        "folds": {},
        "non_covid_by_finding": by_finding(frame, threshold),
    }  # fmt: skip
    for name, rows in frame.groupby("fold", sort=False):
        result["folds"][name] = {"binary": binary_report(rows, threshold, n_boot, seed),
                                 "four_class": four_class_rates(rows), "n": len(rows)}  # fmt: skip
        own = internal[internal["fold"] == name]
        if len(own):
            result["folds"][name]["internal_val"] = {
                "binary": binary_report(own, threshold, n_boot, seed),
                "n": len(own),
            }
    return result


def four_class_only(frame: pd.DataFrame) -> dict:
    """The report of folds run with `oos.tasks: [four_class]`: call rates, no operating point."""
    folds = {name: {"four_class": four_class_rates(rows), "n": len(rows)}
             for name, rows in frame.groupby("fold", sort=False)}  # fmt: skip
    return {"operating_point": None, "pooled": {"four_class": four_class_rates(frame),
                                                "n": len(frame)}, "folds": folds}  # fmt: skip


# --- the Markdown page ------------------------------------------------------------------------


def _ci(stat: dict | None) -> str:
    if not stat or stat.get("point") is None:
        return "n/a"
    low, high = stat.get("low"), stat.get("high")
    band = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
    return f"{stat['point']:.3f}{band}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _binary_row(name: str, b: dict) -> str:
    at = b.get("at_threshold", {})
    return (f"| {name} | {b['n_covid']} / {b['n_non_covid']} | {_ci(b.get('roc_auc'))} | "
            f"{_ci(b.get('sensitivity_at_90_specificity'))} | "
            f"{_ci(b.get('specificity_at_90_sensitivity'))} | {_pct(at.get('sensitivity'))} | "
            f"{_pct(at.get('specificity'))} |")  # fmt: skip


def _finding_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "Held-out adult non-COVID films by finding (sources.csv): called COVID-19 at the "
             "pooled threshold, and the ROC AUC of the fold's held-out adult COVID-19 films "
             "against that finding alone. SARS (SARS-CoV-1, 2003) is a coronavirus pneumonia "
             "that looks like COVID-19 on a radiograph: a model that cannot tell them apart is "
             "expected.", "",
             "| fold | finding | n | called COVID-19 | AUC vs the fold's COVID-19 |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        auc = "n/a" if r["roc_auc_vs_fold_covid"] is None else f"{r['roc_auc_vs_fold_covid']:.3f}"
        lines.append(f"| {r['fold']} | {r['finding']} | {r['n']} | "
                     f"{_pct(r['called_covid'])} | {auc} |")  # fmt: skip
    return lines


def markdown(result: dict, config: dict) -> str:
    """reports/oos/results.md: the tables of results.json, generated (never edited by hand)."""
    op = result["operating_point"]
    head = [
        "# Out-of-source validation: results",
        "",
        "Generated by `dvc repro oos/dvc.yaml` (stages/oos_report.py) from `results.json`; do not "
        "edit. Protocol and rule: [docs/validation.md](../../docs/validation.md), "
        "[RULE.md](RULE.md).",
        "",
        f"Configuration: tasks {config.get('tasks')}, epochs per fold "
        f"{config.get('epochs') or 'as train_*'}; folds {', '.join(result['folds'])}.",
    ]
    if op is None:  # four-class folds only
        return "\n".join(head + four_class_lines(result)) + "\n"
    lines = head + [
        "",
        "Binary, adult films only (COVID-19 / adult non-COVID). AUC and operating points with 95% "
        "patient-bootstrap CIs; the last two columns at the pooled threshold "
        f"{op['threshold']:.4f} ({op['rule']}).",
        "",
        "| held-out films | n COVID-19 / non-COVID | ROC AUC | sens. at 90% spec. | "
        "spec. at 90% sens. | sens. at threshold | spec. at threshold |",
        "|---|---|---|---|---|---|---|",
        _binary_row("**pooled (out-of-source)**", result["pooled"]["binary"]),
    ]
    for name, fold in result["folds"].items():
        lines.append(_binary_row(f"fold {name}", fold["binary"]))
    internal = [(n, f["internal_val"]) for n, f in result["folds"].items() if "internal_val" in f]
    if internal:
        lines += ["", "The same fold models on their own validation films (sources they were "
                  "trained on: the in-distribution estimate):", "",
                  "| fold | n COVID-19 / non-COVID | ROC AUC | sens. at 90% spec. | "
                  "spec. at 90% sens. | sens. at threshold | spec. at threshold |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [_binary_row(f"fold {n} (internal val)", f["binary"]) for n, f in internal]
    lines += _finding_lines(result.get("non_covid_by_finding", []))
    return "\n".join(lines + four_class_lines(result)) + "\n"


def four_class_lines(result: dict) -> list[str]:
    """The four-class call rates on held-out adult films, pooled and per fold (none: no lines)."""
    rows = [("pooled", result["pooled"]["four_class"])]
    rows += [(f"fold {n}", f.get("four_class", {})) for n, f in result["folds"].items()]
    if not rows[0][1]:
        return []
    lines = ["", "Four-class calls on held-out adult films (share of each row):", "",
             "| held-out films | n | covid | viral | bacterial | normal |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for where, four in rows if len(result["folds"]) > 1 else rows[:1]:
        for key, r in four.items():
            lines.append(f"| {where}: {key.replace('_', ' ')} | {r['n']} | "
                         + " | ".join(_pct(r[k]) for k in ("covid", "viral", "bacterial", "normal"))
                         + " |")  # fmt: skip
    return lines
