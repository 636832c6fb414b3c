"""The numbers in README.md and docs/*.md that quote committed metrics, rendered from those files.

Over 400 lines on purpose: one small renderer per block, side by side, so that every quoted
number and the sentence around it are found in one place (splitting by page would scatter the
shared formatting helpers and the block registry).

    python -m cxr.readme_numbers            # check: exit 1 naming every stale block
    python -m cxr.readme_numbers --write    # re-render every block in place

A block is the text between `<!-- metrics:start NAME -->` and `<!-- metrics:end NAME -->`
(indented like the start marker, so a block can sit in a list item). Its content is never edited
by hand: BLOCKS maps each NAME to a function that renders it from the committed files
(metrics/*.json, reports/reference/*/, params.yaml). After a re-run changes a metric, `--write`
brings every sentence and table that quotes it in step; committing the metric without it turns
tests/test_readme_numbers.py red instead of leaving a stale number behind.

Some tables set the committed run beside records of other runs (seeds 1 and 2, ResNet-152, the
lung crop on validation). Those records are constants below, each with the commit that measured
it; the committed run's columns, and what is computed with them (a mean over the seeds, which
value is bold), are rendered from the files.

Over 400 lines, on purpose: one job (the documents' quoted numbers), most of it the layouts of
the twelve blocks, one short function each, read top to bottom beside the page they render; the
block machinery (find, render, check, write) is the last part.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import gzip
import io
import json
import math
import re
import statistics
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from cxr.config import as_recipe

ROOT = Path(__file__).resolve().parents[1]
START = re.compile(r"^(?P<lead>.*?)<!-- metrics:start (?P<name>[a-z0-9-]+) -->\s*$")
END = "<!-- metrics:end {name} -->"
WIDTH = 100  # prose lines of a block are wrapped to this, their indent included
TASKS = ("binary", "four_class")
CLASS_NAMES = {"covid": "COVID-19", "viral": "viral", "bacterial": "bacterial", "normal": "normal"}

# Where metrics/<task>.json keeps what the blocks quote (a bootstrap interval or a number).
ACCURACY, MACRO_F1, MACRO_AUC = "test.ci.accuracy", "test.ci.macro_f1", "test.ci.macro_auc"
SENS_ARGMAX = "test.ci.sensitivity"
SENS, SPEC = (f"test.covid_vs_rest.at_threshold.{k}" for k in ("sensitivity", "specificity"))
ADULT_AUC = "test.adult_only.roc_auc"
ADULT_SENS, ADULT_SPEC = (
    f"test.adult_only.at_threshold.{k}" for k in ("sensitivity", "specificity")
)
CHECK, CHECK_ARGMAX = "adult_check.at_threshold.call_rate", "adult_check.argmax.call_rate"
NORMAL = "adult_check.normal_call_rate"
THRESHOLD, VAL_F1, VAL_AUC = "threshold.value", "validation.macro_f1", "validation.adult_roc_auc"
TEST_ACCURACY, TEST_F1 = "test.accuracy", "test.macro.f1"


def documents(root: Path) -> list[Path]:
    """The Markdown files whose blocks are kept in step: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


class Files:
    """The committed files a block quotes, each read once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._read: dict[str, Any] = {}

    def resolve(self, relative: str) -> str:
        """`relative`, or its gzipped twin where only that one is committed (run folders keep
        their fold files so: cxr.oos_report.plain_or_packed)."""
        from cxr.oos_report import plain_or_packed  # pandas and sklearn: only when a block asks

        return str(plain_or_packed(self.root / relative).relative_to(self.root))

    def exists(self, relative: str) -> bool:
        return (self.root / self.resolve(relative)).exists()

    def fold_names(self, folder: str) -> list[str]:
        """The folds with a prediction file in `folder` (`<fold>.csv` or `<fold>.csv.gz`)."""
        files = [*(self.root / folder).glob("*.csv"), *(self.root / folder).glob("*.csv.gz")]
        return sorted({path.name.split(".")[0] for path in files})

    def load(self, relative: str) -> Any:
        if relative not in self._read:
            path = self.root / self.resolve(relative)
            text = (gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz"
                    else path.read_text())  # fmt: skip
            if relative.endswith(".csv"):  # rows as dicts of strings
                self._read[relative] = list(csv.DictReader(io.StringIO(text)))
            elif relative.endswith(".yaml"):
                self._read[relative] = yaml.safe_load(text)
            else:
                self._read[relative] = json.loads(text)
        return self._read[relative]

    def tasks(self, run: str | None = None) -> tuple[dict, dict]:
        """(binary, four-class) metrics of the committed run, or of a reports/reference run."""
        folder = "metrics" if run is None else f"reports/reference/{run}"
        return self.load(f"{folder}/binary.json"), self.load(f"{folder}/four_class.json")


# --- formats -------------------------------------------------------------------------------


def get(doc: Any, path: str) -> Any:
    for key in path.split("."):
        doc = doc[key]
    return doc


def num(x: float | dict) -> float:
    """A number, or the point estimate of a bootstrap interval."""
    return x["point"] if isinstance(x, dict) else x


def pct(x: float | dict) -> str:
    return f"{100 * num(x):.1f}%"


def f3(x: float | dict) -> str:
    return f"{num(x):.3f}"


def bold(text: str, on: bool = True) -> str:
    return f"**{text}**" if on else text


def ci(c: dict, strong: bool = False) -> str:
    """A bootstrap interval as "97.4% [96.4, 98.2]" (the point in bold when `strong`)."""
    return f"{bold(pct(c), strong)} [{100 * c['low']:.1f}, {100 * c['high']:.1f}]"


def ci3(c: dict) -> str:
    """A bootstrap interval of a fraction as "0.918 [0.864, 0.959]" (AUCs, out-of-source tables)."""
    return f"{c['point']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"


def count(n: int) -> str:
    return f"{n:,}"


def both(runs: tuple[dict, dict], fmt: Callable[[Any], str], *paths: str) -> list[str]:
    """One cell per task: the paths' values, formatted, joined by " / "."""
    return [" / ".join(fmt(get(m, p)) for p in paths) for m in runs]


def pair(runs: tuple[dict, dict], fmt: Callable[[Any], str], path: str) -> str:
    """One cell, "binary / four-class"."""
    return " / ".join(both(runs, fmt, path))


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def mean_sd(values: list[float], percent: bool) -> str:
    """Mean ± sample sd, "97.4 ± 0.7%" for rates and "0.876 ± 0.016" for scores."""
    m, s = statistics.mean(values), statistics.stdev(values)
    return f"{100 * m:.1f} ± {100 * s:.1f}%" if percent else f"{m:.3f} ± {s:.3f}"


# --- the blocks ----------------------------------------------------------------------------


def headline(f: Files) -> list[str]:
    runs = b, q = f.tasks()
    counts = f.load("metrics/data.json")
    children = sum(
        n for label, by_dataset in counts["test"].items() if label != "total"
        for by_age in by_dataset.values() for age, n in by_age.items() if age == "pediatric"
    )  # fmt: skip
    adults, pneumonia = get(b, "test.adult_only.n_by_class"), b["test"]["pneumonia"]["n"]
    intro = (
        f"Test split: {count(b['test']['n'])} images from {count(counts['groups']['test'])} patient "
        f"groups ({adults['covid']} COVID-19, {adults['non_covid']} adult non-COVID, "
        f"{count(children)} children); the four-class metrics leave out its {pneumonia} "
        f'`pneumonia` rows. "At threshold": p(COVID-19) >= {threshold_text(b, q)}.'
    )
    validation_link = "[docs/validation.md](docs/validation.md)"
    rows = [
        ["accuracy (argmax)", *both(runs, ci, ACCURACY)],
        ["macro F1 (argmax)", *both(runs, ci, MACRO_F1)],
        ["macro ROC AUC", *both(runs, ci, MACRO_AUC)],
        ["COVID-19 sensitivity, argmax", *both(runs, ci, SENS_ARGMAX)],
        ["COVID-19 sensitivity / specificity, **at threshold**", *both(runs, ci, SENS, SPEC)],
        [
            f"**adult-only** ROC AUC ({adults['covid']} COVID-19 vs {adults['non_covid']} adult "
            "non-COVID)",
            *both(runs, ci, ADULT_AUC),
        ],
        [
            "adult-only sensitivity / specificity, at threshold",
            *both(runs, ci, ADULT_SENS, ADULT_SPEC),
        ],
        [
            f"**adult_check called COVID-19**, at threshold ({b['adult_check']['n']} adult normals)",
            *both(runs, ci, CHECK),
        ],
        ["adult_check called COVID-19, argmax", *both(runs, ci, CHECK_ARGMAX)],
        ["adult_check called *normal* (four-class, argmax)", "-", pct(get(q, NORMAL))],
        [
            f"`pneumonia` test images ({pneumonia}) called COVID-19, at threshold",
            *both(runs, pct, "test.pneumonia.at_threshold.call_rate"),
        ],
        [
            "`pneumonia` test images called viral or bacterial (argmax)",
            "-",
            ci(get(q, "test.pneumonia.viral_or_bacterial_rate")),
        ],
        oos_row(f, validation_link),
    ]
    return [intro, "", *table(["test metric", "binary", "four-class"], rows)]


def threshold_text(b: dict, q: dict) -> str:
    """Where each model's COVID-19 threshold came from (metrics/<task>.json `threshold`)."""
    val = "chosen on adult validation images"
    if b["threshold"]["method"] == "oos":
        return (f"the binary model's out-of-source operating point, {f3(b['threshold']['value'])} "
                "(90% specificity on held-out hospitals' adult non-COVID films: "
                "[docs/validation.md](docs/validation.md)), the one `predict` uses, and for the "
                f"four-class model {f3(q['threshold']['value'])}, {val}")  # fmt: skip
    return (f"the threshold {val} (binary {f3(b['threshold']['value'])}, four-class "
            f"{f3(q['threshold']['value'])}), the operating point `predict` uses")  # fmt: skip


def oos_is_committed_recipe(f: Files) -> bool:
    """Whether the committed OOS folds were trained with params.yaml's recipe: the one
    recorded beside their operating point (cxr/oos_params.py recipe), as evaluate checks it."""
    recipe, params = f.load("reports/oos/operating_point.json").get("recipe"), f.load("params.yaml")
    return bool(recipe) and all(recipe_part(recipe, name) == recipe_part(params, name)
                                for name in recipe)  # fmt: skip


CANDIDATE_DIR = "reports/oos/candidates"


def two_seeds(name: str) -> dict[int, str]:
    """A candidate's run folders by seed: seed 42 in candidates/NAME, 43 in NAME_seed43."""
    return {42: f"{CANDIDATE_DIR}/{name}", 43: f"{CANDIDATE_DIR}/{name}_seed43"}


OOS_FOUR_CLASS = "reports/oos/four_class"  # the four-class folds (oos.tasks [four_class])
# The same fold and recipe trained on the Intel Xeon instead of the AMD EPYC Zen 1 (the eleventh
# amendment's "128 px" run, 112 px after all: RULE.md thirteenth amendment).
OOS_FOUR_CLASS_XEON = "reports/oos/candidates/four_class_xeon"
# The same fold on the Xeon with the source-adversarial head (RULE.md twenty-sixth amendment).
OOS_FOUR_CLASS_ADVERSARY = "reports/oos/candidates/adversary_four_class"
# The same fold on the AMD EPYC Zen 5, without and with class x age group balancing (RULE.md
# thirty-first amendment).
OOS_FOUR_CLASS_ZEN5 = "reports/oos/candidates/four_class_zen5"
OOS_FOUR_CLASS_AGE = "reports/oos/candidates/four_class_age"
# The same fold on the Zen 5: the default's seed 43 and, in seeds 42 and 43, the four-class task
# without the NIH pneumonia films (partial_labels false; RULE.md forty-first, forty-second).
OOS_FOUR_CLASS_ZEN5_SEED43 = "reports/oos/candidates/four_class_zen5_seed43"
OOS_FOUR_CLASS_NO_PNEUMONIA = two_seeds("four_class_no_pneumonia")
# The default four-class recipe through all three folds on the Zen 5, seeds 42 and 43 (RULE.md
# forty-eighth amendment: their p(COVID-19) averaged with the binary fold models').
OOS_FOUR_CLASS_FOLDS = two_seeds("four_class_folds")
# The europe fold on the Zen 5 with every pixel outside the lungs blanked (forty-ninth).
OOS_FOUR_CLASS_MASK = two_seeds("four_class_mask")
# The europe-fold changes run in two seeds, as the four-class table names them.
FOUR_CLASS_TWO_SEED_RUNS = (
    ("without the NIH pneumonia films", "forty-first", OOS_FOUR_CLASS_NO_PNEUMONIA),
    ("plain film, all three folds", "forty-eighth", OOS_FOUR_CLASS_FOLDS),
    ("blanked outside the lungs", "forty-ninth", OOS_FOUR_CLASS_MASK),
)


def recipe_part(params: dict, section: str) -> dict:
    """A params section as a recipe, with the train keys it predates (cxr.config.as_recipe)."""
    return as_recipe(section, params.get(section) or {})


def oos_four_class(f: Files) -> dict | None:
    """Held-out adult normals' four-class calls (pooled `adult_normal` of the four-class folds'
    results.json) with the folds' names, when those folds were run with params.yaml's recipe
    (base, split, train_four_class as committed); None otherwise."""
    if not (f.root / OOS_FOUR_CLASS / "results.json").exists():
        return None
    run, params = f.load(f"{OOS_FOUR_CLASS}/params.yaml"), f.load("params.yaml")
    if any(recipe_part(run, k) != recipe_part(params, k)
           for k in ("base", "split", "train_four_class")):  # fmt: skip
        return None
    result = f.load(f"{OOS_FOUR_CLASS}/results.json")
    normal = result["pooled"]["four_class"].get("adult_normal")
    return None if normal is None else normal | {"folds": list(result["folds"])}


def adult_normal_rate(f: Files, folder: str) -> float | None:
    """Held-out adult normals called normal by a four-class run (`folder`), or None without it."""
    if not (f.root / folder / "results.json").exists():
        return None
    return f.load(f"{folder}/results.json")["pooled"]["four_class"]["adult_normal"]["normal"]


def oos_four_class_xeon_normal(f: Files) -> float | None:
    """Held-out adult normals called normal by the same fold and recipe trained on the Xeon
    (OOS_FOUR_CLASS_XEON), or None without that run."""
    return adult_normal_rate(f, OOS_FOUR_CLASS_XEON)


def four_class_oos_text(f: Files) -> str | None:
    """'X% of N held-out adult normals called normal (fold F, ...)', or None when not measured;
    with the same fold and recipe trained on the Xeon beside it when that run exists (the
    committed models are the Xeon's, the committed four-class fold the Zen 1's)."""
    four = oos_four_class(f)
    if four is None:
        return None
    xeon = oos_four_class_xeon_normal(f)
    other = "" if xeon is None else f"; trained on the Xeon: {pct(xeon)}"
    return (f"{pct(four['normal'])} of {four['n']} held-out adult normals called normal "
            f"(fold {', '.join(four['folds'])}, trained on the Zen 1; {pct(four['viral'])} viral"
            f"{other})")  # fmt: skip


def oos_row(f: Files, link: str) -> list[str]:
    """The headline's out-of-source row: pooled held-out adult AUC and sensitivity at 90%
    specificity, when the committed OOS run used the default recipe (else a link only)."""
    label = "**out-of-source** (whole hospitals and countries held out)"
    if not oos_is_committed_recipe(f):
        return [label, link, link]
    pooled = f.load("reports/oos/results.json")["pooled"]["binary"]
    label = (f"**out-of-source** adult ROC AUC / sensitivity at 90% specificity ({pooled['n_covid']} "
             f"COVID-19 vs {pooled['n_non_covid']} adult non-COVID of held-out places, same recipe: "
             f"{link})")  # fmt: skip
    value = f"{ci(pooled['roc_auc'])} / {ci(pooled['sensitivity_at_90_specificity'])}"
    return [label, value, four_class_oos_text(f) or "not run (`oos.tasks`)"]


def targets(f: Files) -> list[str]:
    b, q = f.tasks()

    def verdict(
        value: float | dict, fmt: Callable[[Any], str], met: Callable[[float], bool]
    ) -> str:
        return f"{fmt(value)}: met" if met(num(value)) else f"{fmt(value)}: **missed**"

    def at_most_10(x: float) -> bool:
        return x <= 0.10

    rows = [
        [
            "adult_check called COVID-19 at the frozen threshold <= 10%",
            verdict(get(b, CHECK), pct, at_most_10),
            verdict(get(q, CHECK), pct, at_most_10),
        ],
        [
            "test COVID-19 sensitivity at the threshold >= 90%",
            verdict(get(b, SENS), ci, lambda x: x >= 0.90),
            "",
        ],
        ["adult-only ROC AUC >= 0.90", verdict(get(b, ADULT_AUC), f3, lambda x: x >= 0.90), ""],
        ["test macro-F1 >= 0.80", "", verdict(get(q, TEST_F1), f3, lambda x: x >= 0.80)],
    ]
    return table(["target of the adult-controls work", "binary", "four-class"], rows)


def new_hospital_targets(f: Files) -> list[str]:
    """Issue 18's targets, each as measured: out-of-source (reports/oos/results.json) and the
    four-class calls on adult_check (metrics/four_class.json)."""
    q = f.tasks()[1]
    pooled = f.load("reports/oos/results.json")["pooled"]
    binary = pooled["binary"]
    recipe = "" if oos_is_committed_recipe(f) else " (another recipe than the committed one)"

    def verdict(value: float | None, met: bool, fmt: Callable[[Any], str] = f3) -> str:
        if value is None:
            return "not measured"
        return f"{fmt(value)}: met" if met else f"{fmt(value)}: **missed**"

    auc, sens = num(binary["roc_auc"]), num(binary["sensitivity_at_90_specificity"])
    four = pooled.get("four_class", {}).get("adult_normal") or oos_four_class(f) or {}
    normal = four.get("normal")
    where = (
        f" (fold {', '.join(four['folds'])}: {OOS_FOUR_CLASS}, Zen 1)" if "folds" in four else ""
    )
    xeon = oos_four_class_xeon_normal(f)
    if where and xeon is not None:  # the same fold and recipe on the committed models' CPU
        where += f"; trained on the Xeon {verdict(xeon, xeon >= 0.70, pct)}"
    rates = [
        adult_normal_rate(f, folder) for folder in (OOS_FOUR_CLASS_ZEN5, OOS_FOUR_CLASS_ZEN5_SEED43)
    ]
    if where and None not in rates:  # and the default's two seeds on the AMD EPYC Zen 5
        where += (f"; seeds 42 and 43 on the Zen 5 {pct(rates[0])} and "  # met: in both
                  f"{verdict(rates[1], min(rates) >= 0.70, pct)}")  # fmt: skip
    check_normal, check_covid = num(get(q, NORMAL)), num(get(q, CHECK_ARGMAX))
    rows = [
        [f"out-of-source, pooled: adult ROC AUC >= 0.93{recipe}", verdict(auc, auc >= 0.93)],
        [f"out-of-source, pooled: sensitivity at 90% specificity >= 0.85{recipe}",
         verdict(sens, sens >= 0.85)],
        ["four-class: held-out adult normals called normal >= 70%",
         verdict(normal, normal is not None and normal >= 0.70, pct)
         + (where if normal is not None else " (no four-class folds: `oos.tasks`)")],
        ["four-class: adult_check called normal >= 70% (argmax)",
         verdict(check_normal, check_normal >= 0.70, pct)],
        ["four-class: adult_check called COVID-19 <= 5% (argmax)",
         verdict(check_covid, check_covid <= 0.05, pct)],
        ["films from sources this project never sees: AUC >= 0.90, sensitivity >= 0.80 at "
         "specificity >= 0.85", "measured outside the project (issue 18)"],
    ]  # fmt: skip
    return table(["target of the new-hospitals work (issue 18)", "as measured"], rows)


def adult_check_calls(f: Files) -> list[str]:
    q = f.tasks()[1]
    normal, covid = get(q, NORMAL), num(get(q, CHECK_ARGMAX))
    return [
        f"of the {q['adult_check']['n']} adult_check films the four-class model calls "
        f"{pct(normal)} normal, {pct(covid)} COVID-19 and the other {pct(1 - normal - covid)} "
        "viral or bacterial pneumonia (argmax)."
    ]


def per_class_f1(f: Files) -> list[str]:
    f1 = {CLASS_NAMES[c]: v["f1"] for c, v in f.tasks()[1]["test"]["per_class"].items()}
    listed = ", ".join(f"{c} {f3(v)}" for c, v in f1.items())
    return [f"Four-class test F1 by class: {listed}; the weakest is {min(f1, key=f1.get)}."]


# The seed-spread rows: label, path in metrics/<task>.json, shown as a rate (%) or a score.
SEED_ROWS = [
    ("val macro-F1, binary / four-class", VAL_F1, False),
    ("accuracy, binary / four-class", TEST_ACCURACY, True),
    ("macro F1, binary / four-class", TEST_F1, True),
    ("adult-only ROC AUC, binary / four-class", ADULT_AUC, True),
    ("COVID-19 sensitivity at threshold, binary / four-class", SENS, True),
    ("adult_check called COVID-19 at threshold, binary / four-class", CHECK, True),
    ("adult_check called COVID-19 at argmax, binary / four-class", CHECK_ARGMAX, True),
]
# Records of the default pipeline with base.seed 1 and 2 (commit c28879b: queued experiments of
# the default, each with its own split): (binary, four-class) per row of SEED_ROWS, then the
# four-class adult_check "normal" rate.
SEED_RECORDS = {
    1: [(0.858, 0.725), (0.981, 0.774), (0.923, 0.762), (0.965, 0.960), (0.914, 0.935),
        (0.150, 0.108), (0.083, 0.075), 0.242],
    2: [(0.883, 0.741), (0.967, 0.759), (0.880, 0.741), (0.954, 0.941), (0.938, 0.896),
        (0.258, 0.200), (0.092, 0.075), 0.317],
}  # fmt: skip


def seed_spread(f: Files) -> list[str]:
    runs = f.tasks()
    seed42 = [tuple(num(get(m, path)) for m in runs) for _, path, _ in SEED_ROWS]
    columns = [[*seed42, get(runs[1], NORMAL)], SEED_RECORDS[1], SEED_RECORDS[2]]
    rows = []
    for i, (label, _, percent) in enumerate(SEED_ROWS):
        show = pct if percent else f3
        cells = [" / ".join(map(show, column[i])) for column in columns]
        spread = " / ".join(mean_sd([c[i][t] for c in columns], percent) for t in range(2))
        rows.append([label, *cells, spread])
    normals = [column[-1] for column in columns]
    rows.append(
        ["adult_check called normal, four-class", *map(pct, normals), mean_sd(normals, True)]
    )
    return table(
        ["metric (test unless marked)", "seed 42 (committed)", "seed 1", "seed 2", "mean ± sd"],
        rows,
    )


def adult_controls(f: Files) -> list[str]:
    def column(runs: tuple[dict, dict], strong: bool) -> list[str]:
        def check(m: dict) -> str:
            return f"{ci(get(m, CHECK), strong)} / {bold(pct(get(m, CHECK_ARGMAX)), strong)}"

        b, q = runs
        return [
            pair(runs, f3, THRESHOLD),
            check(b),
            check(q),
            pair(runs, lambda c: ci(c, strong), ADULT_AUC),
            *both(runs, pct, ADULT_SENS, ADULT_SPEC),
            pair(runs, ci, ACCURACY),
            pair(runs, ci, MACRO_F1),
            ci(get(b, SENS)),
        ]

    labels = [
        (
            "COVID-19 threshold, binary / four-class (chosen on adult validation images; the "
            "default binary one: the out-of-source operating point)"
            if f.tasks()[0]["threshold"]["method"] == "oos"
            else "COVID-19 threshold chosen on adult validation images, binary / four-class"
        ),
        "adult_check called COVID-19, binary, at threshold / argmax",
        "adult_check called COVID-19, four-class, at threshold / argmax",
        "adult-only ROC AUC, binary / four-class",
        "adult-only sensitivity / specificity at threshold, binary",
        "adult-only sensitivity / specificity at threshold, four-class",
        "test accuracy, binary / four-class",
        "test macro F1, binary / four-class",
        "test COVID-19 sensitivity at threshold, binary",
    ]
    off, on = column(f.tasks("adult_controls_off"), False), column(f.tasks(), True)
    header = ["test metric, 95% CI", "adult controls **off**", "adult controls **on** (default)"]
    return table(header, [list(r) for r in zip(labels, off, on, strict=True)])


def hannover(f: Files) -> list[str]:
    ref, default = f.tasks("external_hannover"), f.tasks()
    held = "external.by_dataset.hannover"
    trained = "test.subgroups.covid.hannover_adult"
    rows = [
        ["Hannover called COVID-19 at the (adult-validation) threshold", *both(ref, ci, f"{held}.at_threshold.sensitivity")],
        ["Hannover called COVID-19, argmax", *both(ref, ci, f"{held}.argmax.sensitivity")],
        ["this run's own test split: adult-only ROC AUC", *both(ref, ci, ADULT_AUC)],
        ["this run's own adult_check called COVID-19 at threshold", *both(ref, ci, CHECK)],
        [
            f"default run, for comparison: its {get(default[0], trained)['n']} Hannover test films "
            "(patients never trained on, the hospital trained on) called COVID-19 at threshold",
            *both(default, pct, f"{trained}.covid_call_rate_at_threshold"),
        ],
    ]  # fmt: skip
    n = get(ref[0], held)["n"]
    return table(
        [f"Hannover held out ({n} COVID-19, never trained on)", "binary", "four-class"], rows
    )


# ResNet-152 for 4 epochs a task, everything else default, seed 42 (commit f6718ed); its binary
# threshold was 0.77. Per task (binary, four-class): validation macro-F1 and its best epoch,
# validation adult ROC AUC, then the test cells as they were written.
RESNET152_RECORD = [
    (0.850, 3, 0.895, "96.6% / 0.879", "94.4% [89.8, 97.5]", "83.3% [74.0, 91.0]", "3.3% / 15.0%"),
    (0.692, 4, 0.939, "72.9% / 0.706", "94.4% [90.6, 97.1]", "87.5% [77.3, 95.1]", "11.7% / 6.7%"),
]


def resnet152(f: Files) -> list[str]:
    columns = []
    for m, (f1, epoch, auc, *test) in zip(f.tasks(), RESNET152_RECORD, strict=True):
        f1_18, auc_18 = get(m, VAL_F1), get(m, VAL_AUC)
        columns.append(
            [bold(f"{f3(f1)} (epoch {epoch})", f1 > f1_18), bold(f3(auc), auc > auc_18), *test]
        )
        columns.append([
            bold(f3(f1_18), f1_18 > f1), bold(f3(auc_18), auc_18 > auc),
            f"{pct(get(m, TEST_ACCURACY))} / {f3(get(m, TEST_F1))}", ci(get(m, ADULT_AUC)),
            ci(get(m, SENS)), f"{pct(get(m, CHECK))} / {pct(get(m, CHECK_ARGMAX))}",
        ])  # fmt: skip
    labels = [
        "val macro-F1 (best epoch)", "val adult ROC AUC", "test accuracy / macro-F1",
        "test adult-only ROC AUC", "test COVID-19 sensitivity at threshold",
        "adult_check called COVID-19 at threshold / argmax",
    ]  # fmt: skip
    header = [
        "seed 42, full data, 112 px", "ResNet-152, 4 epochs, binary",
        "ResNet-18, 8 epochs (default), binary", "ResNet-152, 4 epochs, four-class",
        "ResNet-18, 8 epochs (default), four-class",
    ]  # fmt: skip
    return table(header, [[label, *cells] for label, *cells in zip(labels, *columns, strict=True)])


# Balance settings across seeds 42, 1, 2 on validation (commit b7937eb): (adult ROC AUC,
# macro-F1) per seed, None where a run was dropped for time. The default's seed 42 is the
# committed run, read from metrics/ (hence its first entry None here).
BALANCE_RECORDS = {
    "binary": [
        ("**default**: oversample, class x age group", [None, (0.943, 0.858), (0.961, 0.883)]),
        ("oversample, class", [(0.920, 0.850), (0.907, 0.832), (0.953, 0.901)]),
        ("weighted_loss, class x age group", [(0.916, 0.824), (0.874, 0.810), None]),
    ],
    "four-class": [
        ("**default**: oversample, class", [None, (0.931, 0.725), (0.964, 0.741)]),
        ("oversample, class x age group", [(0.953, 0.736), (0.908, 0.717), (0.954, 0.719)]),
        ("weighted_loss, class", [(0.930, 0.719), (0.890, 0.713), None]),
    ],
}


def balance_seeds(f: Files) -> list[str]:
    rows = []
    for m, (task, settings) in zip(f.tasks(), BALANCE_RECORDS.items(), strict=True):
        for k, (setting, runs) in enumerate(settings):
            if k == 0:  # the default: seed 42 is the committed run
                runs = [(get(m, VAL_AUC), get(m, VAL_F1)), *runs[1:]]
            done = [r for r in runs if r is not None]
            cells = [
                f"{bold(mean_sd([r[i] for r in done], False), k == 0)} "
                f"({' / '.join('-' if r is None else f3(r[i]) for r in runs)})"
                for i in range(2)
            ]
            rows.append([task, setting, str(len(done)), *cells])
    return table(["task", "setting", "seeds", "val adult ROC AUC", "val macro-F1"], rows)


# `base.crop: lungs`, same split and seed as the committed run (commit c28879b): its validation
# macro-F1 and adult ROC AUC, binary / four-class (its test numbers: reports/reference/crop_lungs/).
CROP_VALIDATION_RECORD = ("0.883 / 0.707", "0.960 / 0.966")


def crop(f: Files) -> list[str]:
    none, lungs = f.tasks(), f.tasks("crop_lungs")
    tests = [
        ("test accuracy, binary / four-class", TEST_ACCURACY),
        ("test macro F1, binary / four-class", TEST_F1),
        ("test adult-only ROC AUC, binary / four-class", ADULT_AUC),
        ("test COVID-19 sensitivity at threshold, binary / four-class", SENS),
        ("adult_check called COVID-19 at threshold, binary / four-class", CHECK),
    ]
    rows = [
        ["**validation**: macro-F1 binary / four-class", pair(none, f3, VAL_F1), CROP_VALIDATION_RECORD[0]],
        ["**validation**: adult ROC AUC binary / four-class", pair(none, f3, VAL_AUC), CROP_VALIDATION_RECORD[1]],
        *([label, pair(none, pct, path), pair(lungs, pct, path)] for label, path in tests),
        ["adult_check called normal, four-class", pct(get(none[1], NORMAL)), pct(get(lungs[1], NORMAL))],
    ]  # fmt: skip
    return table(["", "crop: none (default)", "crop: lungs"], rows)


def segment(f: Files) -> list[str]:
    s = f.load("metrics/segment.json")
    predicted = [(ds, x) for split in s["predicted"].values() for ds, x in split.items()]
    odd: dict[str, int] = {}
    for ds, x in predicted:
        if x["not_two_pieces"] or x["empty"]:
            odd[ds] = odd.get(ds, 0) + x["not_two_pieces"] + x["empty"]
    listed = ", ".join(f"{ds} {n}" for ds, n in sorted(odd.items())) or "none"
    raw, post = s["val"]["all"]["dice_raw"], s["val"]["all"]["dice"]
    parts = [("test", "all", "all"), ("test", "ieee8023", "ieee8023 (adults)"),
             ("test", "kermany", "kermany (children)"), ("val", "all", "all"),
             ("val", "ieee8023", "ieee8023"), ("val", "kermany", "kermany")]  # fmt: skip
    rows = [
        [
            f"{split}, {name}",
            str(s[split][ds]["n"]),
            f3(s[split][ds]["dice"]),
            f3(s[split][ds]["iou"]),
        ]
        for split, ds, name in parts
    ]
    epochs = f.load("params.yaml")["segment"]["epochs"]
    return [
        f"`metrics/segment.json` (the committed run; best epoch {s['best_epoch']} of {epochs}):",
        "",
        *table(["images with ground truth", "n", "Dice (mean)", "IoU (mean)"], rows),
        "",
        f"Post-processing (two largest pieces, holes filled) changes validation Dice by "
        f"{post - raw:+.5f} ({raw:.5f} -> {post:.5f}). Predicted masks that are empty: "
        f"{sum(x['empty'] for _, x in predicted)}; not two pieces, of "
        f"{count(sum(x['n'] for _, x in predicted))}: {listed}.",
    ]


def gradcam(f: Files) -> list[str]:
    g = f.load("metrics/gradcam.json")
    road, fill, border, lungs = g["road"], g["faithfulness"], g["border_share"], g["lungs"]

    def road_cell(part: str) -> str:
        return f"{f3(road[part]['combined'])} ({f3(road[part]['morf'])} / {f3(road[part]['lerf'])})"

    def fill_cell(part: str) -> str:
        x = fill[part]
        return f"{f3(x['cam_drop'])} vs {f3(x['random_drop'])} ({100 * x['cam_beats_random_share']:.0f}%)"

    def in_lungs(x: dict) -> str:
        return f"{x['in_lung_share']:.2f} / {x['lung_area_share']:.2f}"

    def zones(part: dict) -> tuple[str, str]:
        lift, hit = part["zone_lift"], part["pointing_hit"]
        return (
            f"{lift['mean']:.2f} (95% CI {lift['low']:.2f}-{lift['high']:.2f})",
            f"{round(hit['mean'] * hit['n'])} of the {hit['n']} ({hit['mean']:.2f}, CI "
            f"{hit['low']:.2f}-{hit['high']:.2f}; {part['pointing_chance']:.2f} by chance)",
        )

    share = border["test"]
    lo, hi = min(share, key=share.get), max(share, key=share.get)
    test, cases = lungs["test"]["all"], lungs["cases"]
    rows = [
        ["ROAD combined (MoRF / LeRF)", f"{road_cell('val')}, {road['val']['n_images']} images", "-", road_cell("cases")],
        [
            f"grey fill: top {fill['val']['top_percent']:.0f}% of the map vs as many random pixels "
            "(share of images where the map wins)",
            *map(fill_cell, ("val", "test", "cases")),
        ],
        [
            "map mass inside the predicted lungs / lungs' share of the image", "-",
            f"{in_lungs(test)} ({count(test['n'])} images)", in_lungs(cases),
        ],
        [
            f"border share (outer {100 * border['fraction']:.0f}%; a flat map {border['uniform_reference']:.2f})",
            "-", f"{share[lo]:.2f} ({lo}) to {share[hi]:.2f} ({hi})", f"{border['cases']:.2f}",
        ],
    ]  # fmt: skip
    per_class = ", ".join(
        f"{CLASS_NAMES[c]} {in_lungs(v)}" for c, v in lungs["test"]["by_predicted_class"].items()
    )
    (all_lift, all_hit), (some_lift, some_hit) = map(
        zones, (cases["all_cases"], cases["cases_naming_some_zones"])
    )
    n_all, n_some = (cases[k]["zone_lift"]["n"] for k in ("all_cases", "cases_naming_some_zones"))
    return [
        f"`metrics/gradcam.json` (`{g['method']}` on `{g['target_layer']}`):",
        "",
        *table(["measure", "validation", "test", "cases"], rows),
        "",
        f"By predicted class on test (map mass in the lungs / lung area): {per_class}. Spearman "
        f"correlation with a randomised twin's maps: {g['randomisation']['spearman']:.2f}.",
        "",
        f"Zone lift: {all_lift} over all {n_all} cases, {some_lift} over the {n_some} that name "
        f"only some zones. The map's maximum lies in a named zone in {all_hit}, and in {some_hit} "
        "naming only some zones.",
    ]  # fmt: skip


def oos(f: Files) -> list[str]:
    """Out-of-source validation (reports/oos/results.json) beside the same models' own val."""
    r, cfg = f.load("reports/oos/results.json"), f.load("params.yaml")["oos"]
    recipe = ("the committed models' recipe" if oos_is_committed_recipe(f)
              else "another recipe than the committed models' (reports/oos/results.md)")  # fmt: skip

    auc = ci3
    rows = [["**pooled, held out**", f"{r['pooled']['binary']['n_covid']} / "
             f"{r['pooled']['binary']['n_non_covid']}", auc(r["pooled"]["binary"]["roc_auc"]),
             auc(r["pooled"]["binary"]["sensitivity_at_90_specificity"])]]  # fmt: skip
    for name, fold in r["folds"].items():
        for label, part in (("held out", fold), ("own val", fold.get("internal_val"))):
            if part:
                b = part["binary"]
                rows.append([f"{name}, {label}", f"{b['n_covid']} / {b['n_non_covid']}",
                             auc(b["roc_auc"]), auc(b["sensitivity_at_90_specificity"])])  # fmt: skip
    intro = (
        f"Out-of-source validation ([docs/validation.md](docs/validation.md)): whole hospitals and "
        f"countries held out of training, binary adult films only, {recipe} "
        f"(tasks: {', '.join(cfg['tasks'])}; fold models, not the committed ones). "
        '"Own val": the same fold models on validation films from the sources they were '
        "trained on. Read the held-out rows as an upper estimate of a new hospital's: one "
        "hospital's films (the NIH Clinical Center's) sit on both sides of the two large folds "
        "([docs/validation.md](docs/validation.md#protocol))."
    )
    return [intro, "", *table(["films", "COVID-19 / adult non-COVID", "adult ROC AUC",
                               "sensitivity at 90% specificity"], rows)]  # fmt: skip


OOS_CANDIDATES = ("robust", "source_balanced")  # reports/oos/candidates/<name>/, in RULE.md order


def oos_candidates(f: Files) -> list[str]:
    """The rule's comparison: pooled out-of-source results of the default and each candidate."""
    # The candidates ran with the budget recipe (oos.epochs 2): compared with the default's
    # budget run (reports/oos/budget/), not with the default-recipe run of reports/oos/.
    runs = [("default (params.yaml)", "reports/oos/budget/results.json")]
    runs += [(name, f"reports/oos/candidates/{name}/results.json") for name in OOS_CANDIDATES
             if (f.root / f"reports/oos/candidates/{name}/results.json").exists()]  # fmt: skip
    base = f.load(runs[0][1])["pooled"]["binary"]["roc_auc"]["point"]
    rows = []
    for name, path in runs:
        b = f.load(path)["pooled"]["binary"]
        delta = b["roc_auc"]["point"] - base
        verdict = "-" if path == runs[0][1] else ("adopt" if delta >= 0.01 else "keep default")
        rows.append([name, ci3(b["roc_auc"]), f"{delta:+.3f}",
                     f"{b['sensitivity_at_90_specificity']['point']:.3f}", verdict])  # fmt: skip
    return table(["configuration", "pooled adult ROC AUC", "vs default",
                  "sensitivity at 90% specificity", "rule (AUC +0.01)"], rows)  # fmt: skip


# Candidates run with the committed default recipe (RULE.md fifth amendment), compared with the
# committed out-of-source run (reports/oos/results.json), fold by fold and pooled.
OOS_DEFAULT_RECIPE_CANDIDATES = ("robust_default",)


def oos_candidates_default_recipe(f: Files) -> list[str]:
    """docs/candidates.md: each default-recipe candidate beside the 112 px run it was measured
    against, per fold it finished (in the order it ran them) and pooled; the rule's verdict only
    with every fold."""
    committed = f.load(f"{OOS_ZEN1}/results.json")
    rows = []
    for name in OOS_DEFAULT_RECIPE_CANDIDATES:
        folder = f.root / f"reports/oos/candidates/{name}"
        if not (folder / "results.json").exists():
            continue
        r = f.load(f"reports/oos/candidates/{name}/results.json")
        done = list(r["folds"])
        for fold in done:
            ours, theirs = r["folds"][fold]["binary"], committed["folds"][fold]["binary"]
            rows.append(candidate_row(f"{name}: fold {fold}", ours, theirs, judge=False))
        if sorted(done) == sorted(committed["folds"]):
            ours, theirs = r["pooled"]["binary"], committed["pooled"]["binary"]
            rows.append(candidate_row(f"**{name}: pooled**", ours, theirs, judge=True))
    if not rows:
        return ["Not run yet: `oos/candidate.sh reports/oos/candidates/robust_default`."]
    return table(["candidate, held-out films", "adult ROC AUC", "default (Zen 1)",
                  "vs default", "sens. at 90% spec. (default)", "rule (AUC +0.01)"], rows)  # fmt: skip


def rank_auc(positives: list[float], negatives: list[float]) -> float:
    """ROC AUC as the Mann-Whitney statistic: the chance a positive outranks a negative, ties
    counting half (what sklearn's roc_auc_score gives; no bootstrap here)."""
    scores = sorted([(v, 1) for v in positives] + [(v, 0) for v in negatives])
    rank_sum, i = 0.0, 0
    while i < len(scores):
        j = i
        while j < len(scores) and scores[j][0] == scores[i][0]:
            j += 1
        mid = (i + j + 1) / 2  # mean 1-based rank of a run of ties
        rank_sum += mid * sum(label for _, label in scores[i:j])
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def pooled_auc(f: Files, fold_csvs: list[str]) -> float:
    """Pooled held-out adult AUC of fold prediction files (reports/oos/**/folds/<fold>.csv)."""
    folds = [held_out_adults(f, csv) for csv in fold_csvs]
    return rank_auc(
        [p for covid, _ in folds for p in covid], [p for _, other in folds for p in other]
    )


# Each configuration's runs by seed (RULE.md sixth and seventh amendments): the folder whose
# folds/<fold>.csv hold that seed's held-out predictions.
OOS_BUDGET = "reports/oos/budget"  # the default configuration with the budget recipe

# The committed run before the 128 px arrays (RULE.md twelfth amendment), trained on the AMD EPYC
# Zen 1 and kept as it was: the candidates and diagnoses run there were compared with it.
OOS_ZEN1 = "reports/oos/candidates/default_zen1"


# Every configuration run with two seeds through every fold (RULE.md names each amendment).
OOS_SEED_RUNS: dict[str, dict[int, str]] = {
    "default_zen1": {42: OOS_ZEN1, 43: "reports/oos/candidates/default_seed43"},
    "default_xeon": two_seeds("default_xeon"),  # the default recipe on the Xeon (13th)
    "robust_default": two_seeds("robust_default"),
    "crop_lungs": two_seeds("crop_lungs"),  # 8th
    "epochs4": two_seeds("epochs4"),  # 9th
    "size128": two_seeds("size128"),  # 12th, 13th (the 10th's run was 112 px)
    "robust_xeon": two_seeds("robust_xeon"),  # 16th: robust_default's augmentation
    "source_balanced_xeon": two_seeds("source_balanced_xeon"),  # 15th
    "tta_hflip_xeon": two_seeds("tta_hflip_xeon"),  # 18th: default_xeon + a flipped view
    "epochs12": two_seeds("epochs12"),  # 19th
    "input96": two_seeds("input96"),  # 20th
    "lr3e-3": two_seeds("lr3e-3"),  # 21st
    "lr3e-4": two_seeds("lr3e-4"),  # 22nd
    "group_dro": two_seeds("group_dro"),  # 23rd
    "wd5e-2": two_seeds("wd5e-2"),  # 24th
    "adversary": two_seeds("adversary"),  # 25th
    "adversary_place": two_seeds("adversary_place"),  # 27th
    "default_zen5": two_seeds("default_zen5"),  # 28th: the default on the AMD EPYC Zen 5
    "swa": two_seeds("swa"),  # 28th
    "mixstyle": two_seeds("mixstyle"),  # 29th
    "mixup": two_seeds("mixup"),  # 32nd
    "intensity_none": two_seeds("intensity_none"),  # 33rd: its own arrays
    "select_loss": two_seeds("select_loss"),  # 34th
    "balance_class": two_seeds("balance_class"),  # 36th
    "harmonise_off": two_seeds("harmonise_off"),  # 37th: its own arrays
    "jpeg": two_seeds("jpeg"),  # 38th
    "hflip_off": two_seeds("hflip_off"),  # 39th
    "balance_pneumonia": two_seeds("balance_pneumonia"),  # 43rd
    "cutout": two_seeds("cutout"),  # 45th
    "mask_lungs": two_seeds("mask_lungs"),  # 47th
    "mean_scores": two_seeds("mean_scores"),  # 48th: no training, fold files averaged
    "logit_penalty": two_seeds("logit_penalty"),  # 50th
    "jtt": two_seeds("jtt"),  # 52nd
    "resnet34": two_seeds("resnet34"),  # 53rd: a diagnosis, no seed 43 planned
    "sgd": two_seeds("sgd"),  # 56th: run on the Zen 4, which replays default_zen5
}

# The changes compared with the default over two seeds: what each is and its rule, "better"
# (sixth amendment: adopt on a gain) or "no_loss" (ninth: a cheaper recipe kept on no loss).
TWO_SEED_CANDIDATES: dict[str, tuple[str, str, str]] = {
    # config: (what it changes, its rule, the default run it is judged against: the same CPU
    # kind where one exists, RULE.md thirteenth amendment)
    "robust_default": ("acquisition-robust augmentation (tone, blur/sharpen, noise, cut-outs, zoom)",
                       "better", "default_zen1"),  # Zen 1 against Zen 1
    "robust_xeon": ("the same augmentation, run again on the Xeon", "better", "default_xeon"),
    "crop_lungs": ("crop to the predicted lungs (10% margin)", "better", "default_xeon"),
    "epochs4": ("4 binary epochs instead of 8 (half the training time)", "no_loss", "default_xeon"),
    "size128": ("128 px arrays and binary input instead of 112", "better", "default_xeon"),
    "source_balanced_xeon": ("source-balanced sampling (binary: class x age group x dataset)",
                             "better", "default_xeon"),
    "tta_hflip_xeon": ("a left-right flipped view at test time (the default's own models, no "
                       "training; one more forward pass)", "better", "default_xeon"),
    "epochs12": ("12 binary epochs instead of 8 (half as much training again)", "better",
                 "default_xeon"),
    "input96": ("a 96 px binary input instead of 112 (73% of the pixels)", "no_loss",
                "default_xeon"),
    "lr3e-3": ("a binary learning rate of 3e-3 instead of 1e-3 (AdamW, one-cycle peak)",
               "better", "default_xeon"),
    "lr3e-4": ("a binary learning rate of 3e-4 instead of 1e-3 (AdamW, one-cycle peak)",
               "better", "default_xeon"),
    "group_dro": ("online group DRO over the binary strata (class x age group; Sagawa et al. "
                  "2020)", "better", "default_xeon"),
    "wd5e-2": ("a binary AdamW weight decay of 0.05 instead of 1e-4", "better", "default_xeon"),
    "adversary": ("a class-conditional source-adversarial head (binary, weight 1; Ganin et al. "
                  "2016)", "better", "default_xeon"),
    "adversary_place": ("the same head asked only the place, within one finding and age group",
                        "better", "default_xeon"),
    "swa": ("binary weights averaged over every step of the last 4 of 8 epochs (SWA/SWAD; "
            "Izmailov et al. 2018, Cha et al. 2021)", "better", "default_zen5"),  # Zen 5 vs Zen 5
    "mixstyle": ("MixStyle in the binary network's first two stages, p 0.5 (Zhou et al. 2021)",
                 "better", "default_zen5"),
    "mixup": ("mixup: each binary batch blended with a shuffled copy, alpha 0.2 (Zhang et al. 2018)",
              "better", "default_zen5"),
    "intensity_none": ("no tone equalisation (split.intensity none; a default chosen on internal "
                       "validation)", "better", "default_zen5"),
    "select_loss": ("the binary epoch kept by validation loss instead of macro-F1 (same training)",
                    "better", "default_zen5"),
    "balance_class": ("binary draws balanced by class alone instead of class x age group",
                      "better", "default_zen5"),
    "harmonise_off": ("no harmonising (split.harmonise false: films at their own size and "
                      "compression, not Kermany's 224 px JPEG round trip)", "better", "default_zen5"),
    "jpeg": ("a JPEG round trip at a quality drawn in 20-95 for half the binary draws "
             "(augment.jpeg 0.5)", "better", "default_zen5"),
    "hflip_off": ("no left-right flips in the binary augmentation (the study's, kept until now)",
                  "better", "default_zen5"),
    "balance_pneumonia": ("binary draws balanced by class x age group x pneumonia (adult "
                          "non-COVID pneumonia drawn as often as adult normals)", "better",
                          "default_zen5"),
    "cutout": ("a box of random grey (5-20% of the side) in half of the binary draws "
               "(augment.cutout 0.5), alone", "better", "default_zen5"),
    "mask_lungs": ("every pixel farther than 11 px from the predicted lungs blanked (base.crop "
                   "mask)", "better", "default_zen5"),
    "mean_scores": ("the binary and four-class models' p(COVID-19) averaged (both are trained "
                    "anyway: no training, no extra forward pass)", "better", "default_zen5"),
    "logit_penalty": ("the binary logits held down: 0.1 x their mean square added to the loss "
                      "(spectral decoupling; Pezeshki et al. 2021)", "better", "default_zen5"),
    "jtt": ("just train twice: the binary films a 2-epoch first run called wrongly drawn 6x as "
            "often (Liu et al. 2021)", "better", "default_zen5"),
    "resnet34": ("a ResNet-34 binary network instead of ResNet-18 (1.9x the epoch time: a "
                 "diagnosis)", "better", "default_zen5"),
    "sgd": ("momentum SGD instead of AdamW for the binary network, one-cycle peak 0.0125 "
            "(Naganuma et al. 2023; run on a Zen 4, which replays the Zen 5's default)", "better",
            "default_zen5"),
}  # fmt: skip


def oos_fold_names(f: Files) -> list[str]:
    return [fold["name"] for fold in f.load("params.yaml")["oos"]["folds"]]


def oos_pooled_noise(f: Files) -> list[str]:
    """docs/candidates.md: how far one fold model's seed moves the pooled AUC, beside the
    default-recipe candidate's gain: the pooled AUC mixes fold models, so it also measures how
    well their scores line up, which a seed changes. One row per fold that has a seed-43 model
    of the default configuration (each swapped in alone)."""
    folds = oos_fold_names(f)
    committed = {fold: f"{OOS_SEED_RUNS['default_zen1'][42]}/folds/{fold}.csv" for fold in folds}
    runs = [("default run, Zen 1 (seed 42 in every fold)", committed)]
    for fold in folds:
        swap = f"{OOS_SEED_RUNS['default_zen1'][43]}/folds/{fold}.csv"
        if f.exists(swap):
            runs.append((f"the same, fold {fold}'s model trained with seed 43",
                         committed | {fold: swap}))  # fmt: skip
    for name in OOS_DEFAULT_RECIPE_CANDIDATES:
        folder = f"reports/oos/candidates/{name}/folds"
        if all(f.exists(f"{folder}/{fold}.csv") for fold in folds):
            runs.append((f"{name} (seed 42 in every fold)",
                         {fold: f"{folder}/{fold}.csv" for fold in folds}))  # fmt: skip
    base = pooled_auc(f, list(committed.values()))
    rows = []
    for label, csvs in runs:
        auc = pooled_auc(f, [csvs[fold] for fold in folds])
        rows.append([label, f"{auc:.3f}", f"{auc - base:+.3f}"])
    return table(["fold models pooled", "pooled adult ROC AUC", "vs the Zen 1 run"], rows)


def two_seed_verdict(candidate: dict[int, float], default: dict[int, float]) -> str:
    """RULE.md sixth amendment: adopt when the candidate's mean pooled AUC over seeds beats the
    default's by >= 0.01 and its pooled AUC is higher in every seed; undecided without two
    seeds of both, each with every fold pooled."""
    seeds = sorted(set(candidate) & set(default))
    # "higher in every seed" fails with the first seed that is not: decided without the rest
    # (RULE.md fourteenth amendment stopped 128 px's second seed so).
    lower = [s for s in seeds if not candidate[s] > default[s]]
    if lower and len(seeds) < 2:
        s = lower[0]
        return (f"keep default (not higher in seed {s}: {candidate[s]:.3f} vs {default[s]:.3f}; "
                "the rule needs it higher in every seed)")  # fmt: skip
    if len(seeds) < 2 or set(candidate) != set(default):
        return "not decided (needs every fold of two seeds of both)"
    mean_gain = sum(candidate[s] - default[s] for s in seeds) / len(seeds)
    every = all(candidate[s] > default[s] for s in seeds)
    adopt = mean_gain >= 0.01 and every
    return (f"{'adopt' if adopt else 'keep default'} (mean {mean_gain:+.3f}; "
            f"higher in {sum(candidate[s] > default[s] for s in seeds)} of {len(seeds)} seeds)")  # fmt: skip


def no_loss_verdict(candidate: dict[int, float], default: dict[int, float]) -> str:
    """RULE.md ninth amendment, for a cheaper recipe: adopt when its mean pooled AUC over seeds
    is at most 0.01 below the default's and no seed's is more than 0.02 below; undecided
    without two seeds of both, each with every fold pooled, unless one seed already fails."""
    seeds = sorted(set(candidate) & set(default))
    # "no seed more than 0.02 below" fails with the first seed that is: decided without the rest
    # (RULE.md twentieth amendment, as the fourteenth did for the sixth's rule).
    far = [s for s in seeds if candidate[s] - default[s] < -0.02]
    if far and len(seeds) < 2:
        s = far[0]
        return (f"keep default (seed {s}: {candidate[s]:.3f} vs {default[s]:.3f}, more than 0.02 "
                "below; the rule allows no seed that far)")  # fmt: skip
    if len(seeds) < 2 or set(candidate) != set(default):
        return "not decided (needs every fold of two seeds of both)"
    mean_gain = sum(candidate[s] - default[s] for s in seeds) / len(seeds)
    worst = min(candidate[s] - default[s] for s in seeds)
    adopt = mean_gain >= -0.01 and worst >= -0.02
    return (
        f"{'adopt (no loss)' if adopt else 'keep default'} (mean {mean_gain:+.3f}; "
        f"worst seed {worst:+.3f})"
    )


def candidate_verdict(config: str, pooled: dict[str, dict[int, float]]) -> str:
    """The verdict of TWO_SEED_CANDIDATES[config]'s rule on the pooled AUCs by seed, against
    its baseline (the default run on the candidate's CPU kind)."""
    _, kind, baseline = TWO_SEED_CANDIDATES[config]
    rule = two_seed_verdict if kind == "better" else no_loss_verdict
    return rule(pooled.get(config, {}), pooled.get(baseline, {}))


def two_seed_pooled(f: Files) -> tuple[list[list[str]], dict[str, dict[int, float]]]:
    """Each configuration and seed of OOS_SEED_RUNS fold by fold (a table row each, "not run"
    for a fold still to train) and, for the seeds with every fold, their pooled adult AUC."""
    folds = oos_fold_names(f)
    pooled: dict[str, dict[int, float]] = {}
    rows = []
    for config, seeds in OOS_SEED_RUNS.items():
        for seed, folder in seeds.items():
            csvs = [f"{folder}/folds/{fold}.csv" for fold in folds]
            have = [f.exists(csv) for csv in csvs]
            if not any(have):
                continue
            cells = [
                f"{pooled_auc(f, [csv]):.3f}" if ok else "not run"
                for csv, ok in zip(csvs, have, strict=True)
            ]
            if all(have):
                pooled.setdefault(config, {})[seed] = pooled_auc(f, csvs)
                cells.append(f"{pooled[config][seed]:.3f}")
            else:
                cells.append("-")
            rows.append([config, str(seed), *cells])
    return rows, pooled


def held_out_adults(f: Files, fold_csv: str) -> tuple[list[float], list[float]]:
    """p(COVID-19) of a fold's held-out adult COVID-19 films and of its adult non-COVID ones."""
    rows = [
        r for r in f.load(fold_csv) if r["scored_as"] == "held_out" and r["age_group"] == "adult"
    ]
    covid = [float(r["p_covid"]) for r in rows if r["label"] == "covid"]
    return covid, [float(r["p_covid"]) for r in rows if r["label"] != "covid"]


class PairSplit(NamedTuple):
    within: float  # AUC over the pairs held out in the same fold
    across: float  # AUC over the pairs from different folds
    n_within: int
    n_across: int
    pooled: float  # over every pair: the pair-weighted mean of the two


def pair_split(f: Files, fold_csvs: list[str]) -> PairSplit:
    """The pooled AUC's pairs split by place: AUC over the pairs of a COVID-19 and a non-COVID
    film held out in the same fold, AUC over the pairs from different folds, their counts, and
    the pooled AUC itself (pooled_auc's number, computed on the way). Same-fold pairs are one model ranking one
    place's films, what a site's own AUC measures; cross-fold pairs are two models' scores of
    two places set against each other, which only line up if the scores mean the same thing
    everywhere, what one threshold for every hospital needs."""
    folds = [held_out_adults(f, csv) for csv in fold_csvs]
    within_pairs = sum(len(c) * len(n) for c, n in folds)
    within = sum(rank_auc(c, n) * len(c) * len(n) for c, n in folds)
    covid = [p for c, _ in folds for p in c]
    other = [p for _, n in folds for p in n]
    all_pairs = len(covid) * len(other)
    pooled = rank_auc(covid, other)
    across = pooled * all_pairs - within
    return PairSplit(within / within_pairs, across / (all_pairs - within_pairs), within_pairs,
                     all_pairs - within_pairs, pooled)  # fmt: skip


def oos_pairs(f: Files) -> list[str]:
    """docs/candidates.md: each two-seed run's pooled AUC split into same-place and
    cross-place pairs (pair_split), to read a pooled gain by where it comes from."""
    folds = oos_fold_names(f)
    rows, counts = [], None
    for config, seeds in OOS_SEED_RUNS.items():
        for seed, folder in seeds.items():
            csvs = [f"{folder}/folds/{fold}.csv" for fold in folds]
            if not all(f.exists(csv) for csv in csvs):
                continue
            split = pair_split(f, csvs)
            counts = counts or (split.n_within, split.n_across)
            rows.append(
                [
                    config,
                    str(seed),
                    f"{split.within:.3f}",
                    f"{split.across:.3f}",
                    f"{split.pooled:.3f}",
                ]
            )
    if not rows:
        return ["No configuration has every fold of a seed yet."]
    return [*table(["configuration", "seed", "same-place pairs", "cross-place pairs", "pooled"], rows),
            "", f"Pairs (COVID-19 film, adult non-COVID film): {counts[0]:,} held out in the same "
            f"fold, {counts[1]:,} in different folds."]  # fmt: skip


# The fold whose held-out adult non-COVID films are mostly SARS (2003), a coronavirus pneumonia
# that looks like COVID-19 on a radiograph: every configuration ranks them above its COVID-19 films.
SARS_FOLD = "world"


def oos_without_sars_fold(f: Files) -> list[str]:
    """docs/results.md: each default-recipe run's pooled held-out adult AUC over every fold and
    without SARS_FOLD, with that fold's non-COVID films by finding (the committed run): where
    the pooled number is lost. A diagnosis; the target is over every held-out place."""
    folds = oos_fold_names(f)
    rest = [fold for fold in folds if fold != SARS_FOLD]
    rows = []
    for config, seeds in OOS_SEED_RUNS.items():
        for seed, folder in seeds.items() if config.startswith("default_") else ():
            csvs = {fold: f"{folder}/folds/{fold}.csv" for fold in folds}
            if all(f.exists(csv) for csv in csvs.values()):
                rows.append([config, str(seed), f"{pooled_auc(f, list(csvs.values())):.3f}",
                             f"{pooled_auc(f, [csvs[fold] for fold in rest]):.3f}"])  # fmt: skip
    findings = [r for r in f.load("reports/oos/results.json")["non_covid_by_finding"]
                if r["fold"] == SARS_FOLD]  # fmt: skip
    kinds = ", ".join(f"{r['n']} {r['finding']}" for r in findings)
    return [*table(["configuration", "seed", "every fold", "without " + SARS_FOLD], rows), "",
            f"Fold {SARS_FOLD}'s held-out adult non-COVID films (the committed run): {kinds}."]  # fmt: skip


def oos_two_seeds(f: Files) -> list[str]:
    """docs/candidates.md: the seventh amendment's comparison, each configuration and seed fold
    by fold and pooled over its own folds, then the rule's verdict (only with every fold)."""
    folds = oos_fold_names(f)
    rows, pooled = two_seed_pooled(f)
    for config, by_seed in pooled.items():
        if len(by_seed) >= 2:
            mean = sum(by_seed.values()) / len(by_seed)
            rows.append([f"**{config}**", "mean", *([""] * len(folds)), f"**{mean:.3f}**"])
    amendment = {"better": "sixth", "no_loss": "ninth"}
    verdicts = [f"Rule (RULE.md, {amendment[rule]} amendment), {config} against {baseline}: "
                f"{candidate_verdict(config, pooled)}."
                for config, (_, rule, baseline) in TWO_SEED_CANDIDATES.items()]  # fmt: skip
    return [
        *table(["configuration", "seed", *[f"fold {fold}" for fold in folds], "pooled"], rows),
        "",
        *[line for verdict in verdicts for line in (verdict, "")][:-1],
    ]


def two_seed_cells(f: Files, config: str, pooled: dict[str, dict[int, float]]) -> tuple[str, str]:
    """oos_choices' "measured on" and "AUC vs default" cells for a two-seed candidate: pooled
    per seed where every fold of both has run, else each finished fold beside the default's."""
    baseline = TWO_SEED_CANDIDATES[config][2]
    ours, default = pooled.get(config, {}), pooled.get(baseline, {})
    seeds = sorted(set(ours) & set(default))
    if seeds:
        return (f"{len(oos_fold_names(f))} folds pooled, seed{'s' * (len(seeds) > 1)} "
                f"{', '.join(map(str, seeds))}; "
                f"against {baseline}",
                "; ".join(f"{ours[s]:.3f} vs {default[s]:.3f} (seed {s})" for s in seeds))  # fmt: skip
    done = []
    for seed, folder in OOS_SEED_RUNS[config].items():
        theirs = OOS_SEED_RUNS[baseline][seed]
        for fold in oos_fold_names(f):
            if f.exists(f"{folder}/folds/{fold}.csv") and f.exists(f"{theirs}/folds/{fold}.csv"):
                done.append((fold, seed, pooled_auc(f, [f"{folder}/folds/{fold}.csv"]),
                             pooled_auc(f, [f"{theirs}/folds/{fold}.csv"])))  # fmt: skip
    if not done:
        return "not run yet", "-"
    return (
        f"{len(done)} of {2 * len(oos_fold_names(f))} fold runs",
        "; ".join(f"{a:.3f} vs {b:.3f} ({fold}, seed {seed})" for fold, seed, a, b in done),
    )


def oos_choices(f: Files) -> list[str]:
    """README: each change tried against the hospital shortcut, its held-out adult AUC beside
    the default's on the same held-out films, and what was decided (docs/validation.md)."""
    _, pooled = two_seed_pooled(f)
    rows = []
    for config, (change, _, _) in TWO_SEED_CANDIDATES.items():
        measured, cell = two_seed_cells(f, config, pooled)
        rows.append([change, measured, cell, candidate_verdict(config, pooled)])
    # Budget-recipe candidates (2 epochs) against the default's budget run, as RULE.md's
    # first rule compared them.
    budget = f.load("reports/oos/budget/results.json")["pooled"]["binary"]["roc_auc"]["point"]
    robust2 = f.load("reports/oos/candidates/robust/results.json")["pooled"]["binary"]
    delta = robust2["roc_auc"]["point"] - budget
    rows.append(["acquisition-robust augmentation, budget recipe", "3 folds pooled, 2 epochs",
                 f"{robust2['roc_auc']['point']:.3f} vs {budget:.3f}",
                 "adopt by the rule" if delta >= 0.01 else "keep default"])  # fmt: skip
    folder = "reports/oos/candidates/source_balanced/folds"
    done = f.fold_names(folder)
    pairs = [(pooled_auc(f, [f"{folder}/{fold}.csv"]), pooled_auc(f, [f"{OOS_BUDGET}/folds/{fold}.csv"]))
             for fold in done]  # fmt: skip
    below = all(ours < theirs for ours, theirs in pairs)
    rows.append(["source-balanced sampling (class x age group x dataset)",
                 f"folds {', '.join(done)}, 2 epochs",
                 "; ".join(f"{ours:.3f} vs {theirs:.3f}" for ours, theirs in pairs),
                 f"stopped after {len(done)} of 3 folds; "
                 + ("below the default in each: keep default" if below else "not decided")])  # fmt: skip
    europe = f.load(f"{OOS_ZEN1}/results.json")["folds"]["europe"]["binary"]["roc_auc"]["point"]
    for label, path in seed_runs(f):
        if label.startswith("ensemble") or "TTA" in label:
            auc = f.load(path)["pooled"]["binary"]["roc_auc"]["point"]
            rows.append([label.replace("`", ""), "fold europe, 8 epochs", f"{auc:.3f} vs {europe:.3f}",
                         "one fold: a diagnosis, not a choice (RULE.md fourth amendment)"])  # fmt: skip
    zen5 = dict(pooled.get("default_zen5", {}))
    seed44 = [f"{OOS_ZEN5_SEED44}/folds/{fold}.csv" for fold in oos_fold_names(f)]
    if all(f.exists(csv) for csv in seed44):  # the third member, pooled as its siblings are
        zen5[44] = pooled_auc(f, seed44)
    objectives = {"default": pooled.get("default_zen5", {}).get(42),
                  "logit_penalty": pooled.get("logit_penalty", {}).get(42)}  # fmt: skip
    deeper = {"default": pooled.get("default_zen5", {}).get(42),
              "resnet34": pooled.get("resnet34", {}).get(42)}  # fmt: skip
    for folder, label, members in (
        (OOS_ENSEMBLE_XEON, "ensemble of the Xeon's seeds 42 + 43 (twice the binary training)",
         seed_members(pooled.get("default_xeon", {}))),
        (OOS_ENSEMBLE_ZEN5, "ensemble of the Zen 5's seeds 42 + 43 + 44 (three times the binary "
         "training)", seed_members(zen5)),
        (OOS_ENSEMBLE_OBJECTIVES, "ensemble of the default and the held-down logits, seed 42 "
         "(twice the binary training; thought of after their fold results: a diagnosis)",
         objectives),
        (OOS_ENSEMBLE_DEEPER, "ensemble of the default and a ResNet-34, seed 42 (three times the "
         "binary training; thought of after their fold results: a diagnosis)", deeper),
    ):  # fmt: skip
        if None not in members.values() and (row := ensemble_row(f, folder, label, members)):
            rows.append(row)
    return table(["change", "measured on held-out places", "held-out adult ROC AUC vs default",
                  "decision"], rows)  # fmt: skip


OOS_ENSEMBLE_XEON = "reports/oos/candidates/ensemble_xeon"  # RULE.md seventeenth amendment
OOS_ENSEMBLE_ZEN5 = "reports/oos/candidates/ensemble_zen5"  # RULE.md forty-sixth amendment
OOS_ZEN5_SEED44 = "reports/oos/candidates/default_zen5_seed44"  # its third member (fortieth)
# RULE.md fifty-first amendment: default_zen5 and logit_penalty (seed 42) averaged.
OOS_ENSEMBLE_OBJECTIVES = "reports/oos/candidates/ensemble_logit_penalty"
# RULE.md fifty-fifth amendment: default_zen5 and resnet34 (seed 42) averaged.
OOS_ENSEMBLE_DEEPER = "reports/oos/candidates/ensemble_resnet34"


def ensemble_verdict(ensemble: float, members: list[float]) -> str:
    """RULE.md seventeenth (and forty-sixth) amendment: a seed ensemble counts as better only
    above each of its members and above their mean by at least 0.01; even then it is reported,
    not adopted."""
    mean = sum(members) / len(members)
    if ensemble > max(members) and ensemble - mean >= 0.01:
        return f"better by the rule (+{ensemble - mean:.3f} over the members' mean): reported, not adopted"
    if ensemble - mean >= 0.01:  # the mean's bar met, one member not beaten
        return (f"keep one model ({ensemble - mean:+.3f} over the members' mean, but not above the "
                f"best member's {max(members):.3f}; the rule needs both)")  # fmt: skip
    return f"keep one model ({ensemble - mean:+.3f} over the members' mean; the rule needs +0.010 and above each)"


def seed_members(aucs: dict[int, float]) -> dict[str, float]:
    """Pooled AUCs by seed (as two_seed_pooled gives them) named as ensemble_row shows them."""
    return {f"seed {seed}": auc for seed, auc in aucs.items()}


def ensemble_row(f: Files, folder: str, label: str, members: dict[str, float]) -> list[str] | None:
    """Kept fold models scored as one ensemble (`folder`), every fold pooled, beside each member
    (`members`: pooled AUC by member, e.g. "seed 42"); None before that run."""
    folds = oos_fold_names(f)
    if not all(f.exists(f"{folder}/folds/{fold}.csv") for fold in folds):
        return None
    ens = pooled_auc(f, [f"{folder}/folds/{fold}.csv" for fold in folds])
    return [label, f"{len(folds)} folds pooled, no training (the kept fold models)",
            f"{ens:.3f} vs {' and '.join(f'{auc:.3f} ({m})' for m, auc in members.items())}",
            ensemble_verdict(ens, list(members.values()))]  # fmt: skip


def candidate_row(label: str, ours: dict, theirs: dict, judge: bool) -> list[str]:
    """A candidate's AUC beside the default's; the rule's verdict only when `judge` (pooled)."""
    delta = ours["roc_auc"]["point"] - theirs["roc_auc"]["point"]
    verdict = ("adopt" if delta >= 0.01 else "keep default") if judge else "-"
    sens = (ours["sensitivity_at_90_specificity"]["point"],
            theirs["sensitivity_at_90_specificity"]["point"])  # fmt: skip
    return [label, ci3(ours["roc_auc"]), ci3(theirs["roc_auc"]), f"{delta:+.3f}",
            f"{sens[0]:.3f} ({sens[1]:.3f})", verdict]  # fmt: skip


def oos_findings(f: Files) -> list[str]:
    """docs/validation.md: what each fold's held-out adult non-COVID films are, and how the
    fold's model scores them (reports/oos/results.json `non_covid_by_finding`)."""
    rows = f.load("reports/oos/results.json").get("non_covid_by_finding", [])
    order = {fold: i for i, fold in enumerate(dict.fromkeys(r["fold"] for r in rows))}
    rows = sorted(rows, key=lambda r: (order[r["fold"]], -r["n"]))
    return table(["fold", "held-out adult non-COVID finding", "films", "called COVID-19",
                  "AUC vs the fold's COVID-19 films"],
                 [[r["fold"], r["finding"], str(r["n"]), pct(r["called_covid"]),
                   f3(r["roc_auc_vs_fold_covid"])] for r in rows])  # fmt: skip


OOS_TTA = ("gamma", "zoom")  # reports/oos/four_class/tta/<name>/ (oos/tta.sh), in RULE.md order


def oos_four_class_calls(f: Files) -> list[str]:
    """docs/validation.md: the four-class fold's calls on held-out adult films: the 112 px fold
    model (AMD EPYC Zen 1) alone and with each set of test-time views
    (reports/oos/four_class/[tta/<name>/]results.json), and the same recipe trained on the Intel
    Xeon (OOS_FOUR_CLASS_XEON), without and with the adversarial head (OOS_FOUR_CLASS_ADVERSARY),
    and on the AMD EPYC Zen 5: with class x age group balancing, and in two seeds without the
    NIH pneumonia films."""
    runs = [("plain film, Zen 1", f"{OOS_FOUR_CLASS}/results.json")]
    runs += [(f"+ TTA `{name}`, Zen 1", f"{OOS_FOUR_CLASS}/tta/{name}/results.json")
             for name in OOS_TTA
             if (f.root / OOS_FOUR_CLASS / "tta" / name / "results.json").exists()]  # fmt: skip
    if (f.root / OOS_FOUR_CLASS_XEON / "results.json").exists():
        runs.append(("plain film, Xeon (RULE.md eleventh, thirteenth amendments)",
                     f"{OOS_FOUR_CLASS_XEON}/results.json"))  # fmt: skip
    if (f.root / OOS_FOUR_CLASS_ADVERSARY / "results.json").exists():
        runs.append(("+ source-adversarial head, Xeon (twenty-sixth amendment)",
                     f"{OOS_FOUR_CLASS_ADVERSARY}/results.json"))  # fmt: skip
    for label, folder in (("plain film, Zen 5 (thirty-first amendment)", OOS_FOUR_CLASS_ZEN5),
                          ("balanced by class x age group, Zen 5 (thirty-first)",
                           OOS_FOUR_CLASS_AGE),
                          ("plain film, Zen 5, seed 43 (forty-first)", OOS_FOUR_CLASS_ZEN5_SEED43),
                          *((f"{what}, Zen 5 ({amendment})" if seed == 42
                             else f"the same, seed 43 ({amendment})", folder)
                            for what, amendment, seeds in FOUR_CLASS_TWO_SEED_RUNS
                            for seed, folder in seeds.items())):  # fmt: skip
        if (f.root / folder / "results.json").exists():
            runs.append((label, f"{folder}/results.json"))
    rows = []
    for label, path in runs:
        for key, r in f.load(path)["pooled"]["four_class"].items():
            rows.append([label, f"{key.replace('_', ' ')} ({r['n']})",
                         *(pct(r[k]) for k in ("normal", "viral", "bacterial", "covid"))])  # fmt: skip
    return table(["model", "held-out films", "called normal", "viral", "bacterial", "COVID-19"],
                 rows)  # fmt: skip


# Shares of the held-out adult normals a p(normal) cut-off is set to call normal (the issue's
# target is the last), for the table of what each would cost on the held-out COVID-19 films.
NORMAL_SHARES = (0.3, 0.5, 0.7)


def oos_normal_cutoff(f: Files) -> list[str]:
    """docs/validation.md: what calling more held-out adult normals "normal" by a cut-off on
    p(normal) would cost, on the four-class fold's own held-out adult films
    (reports/oos/four_class/folds/*.csv). The cut-off calling a share q of the normals normal is
    the ceil(q n)-th largest p(normal) among them; set on the films it is scored on, so it draws
    the trade-off and chooses nothing."""
    folder = f"{OOS_FOUR_CLASS}/folds"
    rows = [r for fold in f.fold_names(folder) for r in f.load(f"{folder}/{fold}.csv")
            if r["scored_as"] == "held_out" and r["age_group"] == "adult"]  # fmt: skip
    groups = {
        "normal": [r for r in rows if r["label"] == "normal"],
        "covid": [r for r in rows if r["label"] == "covid"],
        "pneumonia": [r for r in rows if r["label"] not in ("normal", "covid")],
    }

    def share(films: list[dict], called: Callable[[dict], bool]) -> str:
        return pct(sum(map(called, films)) / len(films)) if films else "-"

    def row(label: str, called: Callable[[dict], bool]) -> list[str]:
        return [label, *(share(films, called) for films in groups.values())]

    out = [row("as called now (the largest probability)", lambda r: r["call4"] == "normal")]
    normal_p = sorted((float(r["p4_normal"]) for r in groups["normal"]), reverse=True)
    for q in NORMAL_SHARES if normal_p else ():
        cut = normal_p[math.ceil(q * len(normal_p)) - 1]
        out.append(row(f"p(normal) >= {cut:.4f} (calls {q:.0%} of the normals)",
                       lambda r, c=cut: float(r["p4_normal"]) >= c))  # fmt: skip
    n = {k: len(v) for k, v in groups.items()}
    return table(["rule for \"normal\"", f"adult normal ({n['normal']})",
                  f"adult COVID-19 ({n['covid']})", f"adult pneumonia ({n['pneumonia']})"],
                 out)  # fmt: skip


# The default's fold runs traced epoch by epoch (stages/oos_trajectory.py, RULE.md 35th).
OOS_TRAJECTORY = "reports/oos/candidates/default_zen5/trajectory/trajectory.json"


def oos_trajectory(f: Files) -> list[str]:
    """docs/candidates.md: each fold's held-out adult AUC after every epoch of the default's
    training, pooled per epoch, and the pooled AUC of the epochs each rule keeps."""
    from cxr.oos_trajectory import RULES
    from cxr.oos_trajectory import auc_cell as cell

    t = f.load(OOS_TRAJECTORY)
    folds = list(t["kept"])
    epochs = [[str(r["epoch"]), *(cell(r["folds"][k]) for k in folds), cell(r["pooled"])]
              for r in t["per_epoch"]]  # fmt: skip
    rules = [[RULES[name], *(f"{cell(r['folds'][k])} ({r['epochs'][k]})" for k in folds),
              cell(r["pooled"])] for name, r in t["rules"].items()]  # fmt: skip
    header = [*(f"fold {k}" for k in folds), "pooled"]
    return [*table(["epoch", *header], epochs), "",
            "Each fold's epoch as a rule keeps it (in brackets):", "",
            *table(["kept by", *header], rules)]  # fmt: skip


OOS_SEEDS = "reports/oos/seeds"  # binary seed ensembles on held-out places (oos/seeds.sh)


def seed_runs(f: Files) -> list[tuple[str, str]]:
    """(label, results.json) of the seeds run: each seed alone (the folders seed<S>, in seed
    order), the seeds as one ensemble, and the first seed with each set of test-time views."""
    root = f.root / OOS_SEEDS
    seeds = sorted(int(d.name[4:]) for d in root.glob("seed*") if d.name[4:].isdigit()
                   and (d / "results.json").exists())  # fmt: skip
    runs = [(f"seed {seed}", f"{OOS_SEEDS}/seed{seed}/results.json") for seed in seeds]
    if (root / "ensemble" / "results.json").exists():
        runs.append((f"ensemble of seeds {' + '.join(map(str, seeds))}",
                     f"{OOS_SEEDS}/ensemble/results.json"))  # fmt: skip
    for name in OOS_TTA:
        if seeds and (root / f"seed{seeds[0]}" / "tta" / name / "results.json").exists():
            runs.append((f"seed {seeds[0]} + TTA `{name}`",
                         f"{OOS_SEEDS}/seed{seeds[0]}/tta/{name}/results.json"))  # fmt: skip
    return runs


def oos_seeds(f: Files) -> list[str]:
    """docs/validation.md: binary fold models of several seeds, alone and as one ensemble, on
    the same held-out films (reports/oos/seeds/, 112 px), beside the 112 px run's numbers for
    the same folds (OOS_ZEN1)."""
    runs = seed_runs(f)
    if not runs:
        return ["Not run yet: `oos/seeds.sh reports/oos/seeds 42 43`."]
    folds = list(f.load(runs[0][1])["folds"])
    committed = f.load(f"{OOS_ZEN1}/results.json")
    rows = []
    if sorted(folds) == sorted(committed["folds"]):
        rows.append(("default run, Zen 1", committed["pooled"]["binary"]))
    elif len(folds) == 1:
        rows.append((f"default run, Zen 1 (fold {folds[0]})",
                     committed["folds"][folds[0]]["binary"]))  # fmt: skip
    rows += [(label, f.load(path)["pooled"]["binary"]) for label, path in runs]
    return table(
        ["binary model", "held-out COVID-19 / non-COVID", "adult ROC AUC",
         "sens. at 90% spec.", "spec. at 90% sens."],
        [[label, f"{b['n_covid']} / {b['n_non_covid']}", ci3(b["roc_auc"]),
          ci3(b["sensitivity_at_90_specificity"]), ci3(b["specificity_at_90_sensitivity"])]
         for label, b in rows],
    )  # fmt: skip


def growth(f: Files) -> list[str]:
    """The growth benchmark's tables, as `python -m cxr growth` wrote them (reports/growth.json)."""
    from cxr.growth import markdown

    return markdown(f.load("reports/growth.json"))


def ood_gate(f: Files) -> list[str]:
    """The out-of-distribution gate with the committed models: false flags on the real test
    films by source (metrics/ood.json) and detection per probe kind (reports/ood.json)."""
    real, rep = f.load("metrics/ood.json")["test"], f.load("reports/ood.json")
    sources = [k for k, v in real.items() if k != "all" and "flagged_rate" in v]
    flags = ", ".join(f"{k} {pct(real[k]['flagged_rate'])}" for k in sources)
    probes = {k: v for k, v in rep["probes"].items() if k != "identity"}
    control = rep["probes"].get("identity")
    lines = [
        f"Out-of-distribution gate ([docs/ood.md](docs/ood.md)), committed models: "
        f"{pct(real['all']['flagged_rate'])} of the {count(real['all']['n'])} real test films "
        f"flagged ({flags}). Probes built from {count(rep['probed_films'])} test films:",
        "",
    ]
    lines += table(["probe", *(k.replace("_", " ") for k in probes)],
                   [["flagged", *(pct(v["flagged_rate"]) for v in probes.values())]])  # fmt: skip
    if control:
        lines += ["", f"The same films preprocessed a second time (control): "
                      f"{pct(control['flagged_rate'])} flagged."]  # fmt: skip
    return lines


def _reasons(by_reason: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason.removeprefix('not a frontal chest radiograph: ')}"
                     for reason, n in by_reason.items())  # fmt: skip


def _probe_rates(probes: dict[str, dict], order: bool = False) -> str:
    items = [(k, v) for k, v in probes.items() if k != "identity"]
    if order:  # highest first, as prose reads
        items.sort(key=lambda kv: -kv[1]["flagged_rate"])
    return ", ".join(f"{k.replace('_', ' ')} {pct(v['flagged_rate'])}" for k, v in items)


def ood_lung_limits(f: Files) -> list[str]:
    """docs/ood.md: what the lung-shape rules alone flag on val films and probes
    (reports/ood_lung_shape_val.json, `ood-report --lungs-only`)."""
    r = f.load("reports/ood_lung_shape_val.json")
    real, control = r["real_films"]["all"], r["probes"]["identity"]
    return [
        f"Together the rules flag {real['flagged']} of the {count(real['n'])} validation films "
        f"({pct(real['flagged_rate'])}; `real_films` in that file: {_reasons(real['by_reason'])}), "
        f"{'under' if real['flagged_rate'] < 0.01 else '**above**'} the 1% asked for. With the "
        "lung rules alone, on the first "
        f"{r['probed_films']} validation films, the probes are flagged at these rates "
        f"(`probes`): {_probe_rates(r['probes'], order=True)}; the control "
        f"{pct(control['flagged_rate'])} ({control['flagged']} of {control['n']}: a second "
        "preprocessing round trip moves a few films over a limit)."
    ]


def ood_committed(f: Files) -> list[str]:
    """docs/ood.md: both checks with the committed models (metrics/ood.json, reports/ood.json)."""
    m, r = f.load("metrics/ood.json"), f.load("reports/ood.json")
    val, test = m["val"], m["test"]
    probes = r["probes"]

    def k_of_n(part: dict, name: str) -> str:
        flagged = round(part[name]["flagged_rate"] * part[name]["n"])
        return f"{flagged} of {part[name]['n']}"

    others = [k for k in test if k not in ("all", "hannover") and "flagged_rate" in test[k]]
    return [
        f"With the committed binary model the feature threshold is {m['threshold']:.2f} "
        f"({m['threshold_from']}); together the checks flag {pct(val['all']['flagged_rate'])} of "
        f"the validation and {pct(test['all']['flagged_rate'])} of the test films "
        f"(`metrics/ood.json`), and unevenly: {k_of_n(test, 'hannover')} of the Hannover "
        f"hospital's test films ({k_of_n(val, 'hannover')} in validation) against "
        + ", ".join(f"{pct(test[k]['flagged_rate'])} of {k}'s" for k in others)
        + f". On {r['probed_films']} test films' probes (`python -m cxr ood-report`, "
        f"`reports/ood.json`): {_probe_rates(probes)}; the control "
        f"{pct(probes['identity']['flagged_rate'])}."
    ]


OOD_SPLITS = {  # metrics/ood.json keys, in order, with what each split's films are to the gate
    "train": "train (the Gaussian's own films: in-sample)",
    "val": "val (the threshold's films)",
    "test": "test",
    "adult_check": "adult_check",
    "cases": "cases",
    "external": "external",
}


def ood_every_film(f: Files) -> list[str]:
    """docs/ood.md: the gate's false flags on every real film of the split, by dataset
    (metrics/ood.json: train, val, test, adult_check, cases, external when not empty)."""
    m = f.load("metrics/ood.json")
    splits = [k for k in OOD_SPLITS if k in m]
    datasets = sorted({d for k in splits for d in m[k] if d != "all" and "flagged_rate" in m[k][d]})

    def cell(part: dict | None) -> str:
        if not part:
            return "-"
        return f"{pct(part['flagged_rate'])} ({part['flagged']}/{part['n']})"

    rows = [[OOD_SPLITS[k], cell(m[k]["all"]), *(cell(m[k].get(d)) for d in datasets)]
            for k in splits]  # fmt: skip

    def median(part: dict | None) -> str:
        return (
            "-" if not part or "median_distance" not in part else f"{part['median_distance']:.1f}"
        )

    distances = [[OOD_SPLITS[k], median(m[k]["all"]), *(median(m[k].get(d)) for d in datasets)]
                 for k in splits]  # fmt: skip
    return [*table(["films flagged", "all", *datasets], rows), "",
            f"Median feature distance (the flag threshold is {m['threshold']:.2f}):", "",
            *table(["films", "all", *datasets], distances)]  # fmt: skip


BLOCKS: dict[str, Callable[[Files], list[str]]] = {
    "oos": oos,
    "oos-candidates": oos_candidates,
    "oos-candidates-default-recipe": oos_candidates_default_recipe,
    "oos-pooled-noise": oos_pooled_noise,
    "oos-two-seeds": oos_two_seeds,
    "oos-pairs": oos_pairs,
    "oos-without-sars-fold": oos_without_sars_fold,
    "oos-choices": oos_choices,
    "oos-findings": oos_findings,
    "oos-four-class": oos_four_class_calls,
    "oos-seeds": oos_seeds,
    "oos-normal-cutoff": oos_normal_cutoff,
    "oos-trajectory": oos_trajectory,
    "headline": headline,
    "targets": targets,
    "new-hospital-targets": new_hospital_targets,
    "adult-check-calls": adult_check_calls,
    "per-class-f1": per_class_f1,
    "seed-spread": seed_spread,
    "adult-controls": adult_controls,
    "hannover": hannover,
    "resnet152": resnet152,
    "balance-seeds": balance_seeds,
    "crop": crop,
    "segment": segment,
    "gradcam": gradcam,
    "growth": growth,
    "ood-gate": ood_gate,
    "ood-lung-limits": ood_lung_limits,
    "ood-committed": ood_committed,
    "ood-every-film": ood_every_film,
}


# --- finding and replacing blocks ----------------------------------------------------------


class BlockError(ValueError):
    """A block marker without its end, or a name BLOCKS does not know."""


@dataclass(frozen=True)
class Block:
    name: str
    indent: str
    start: int  # index of the start marker line
    end: int  # index of the end marker line


def find_blocks(lines: list[str], where: str) -> Iterator[Block]:
    i = 0
    while i < len(lines):
        match = START.match(lines[i])
        if match:
            name, end_marker = match["name"], END.format(name=match["name"])
            if name not in BLOCKS:
                raise BlockError(f"{where}:{i + 1}: unknown metrics block {name!r}")
            for j in range(i + 1, len(lines)):
                if lines[j].strip() == end_marker:
                    break
                if START.match(lines[j]):
                    raise BlockError(f"{where}:{i + 1}: block {name!r} opens another one")
            else:
                raise BlockError(f"{where}:{i + 1}: block {name!r} has no {end_marker}")
            yield Block(name, " " * len(match["lead"]), i, j)
            i = j
        i += 1


def wrap(line: str, indent: str) -> list[str]:
    """A rendered line as it is written: table rows whole, prose wrapped to WIDTH."""
    if not line or line.startswith("|"):
        return [(indent + line).rstrip()]
    return textwrap.wrap(
        line, WIDTH, initial_indent=indent, subsequent_indent=indent,
        break_long_words=False, break_on_hyphens=False,
    )  # fmt: skip


def render(text: str, files: Files, where: str = "<text>") -> str:
    """`text` with every block's content rendered anew (the markers stay as they are)."""
    lines = text.split("\n")
    out: list[str] = []
    last = 0
    for block in find_blocks(lines, where):
        out += lines[last : block.start + 1]
        for line in BLOCKS[block.name](files):
            out += wrap(line, block.indent)
        last = block.end
    return "\n".join(out + lines[last:])


def stale(root: Path = ROOT, files: Files | None = None) -> dict[str, str]:
    """Each document whose blocks differ from a fresh rendering -> a unified diff."""
    files = files or Files(root)
    found: dict[str, str] = {}
    for path in documents(root):
        where = path.relative_to(root).as_posix()
        text = path.read_text()
        fresh = render(text, files, where)
        if fresh != text:
            diff = difflib.unified_diff(
                text.splitlines(), fresh.splitlines(), f"{where} (as written)",
                f"{where} (rendered from metrics/ and reports/)", lineterm="", n=0,
            )  # fmt: skip
            found[where] = "\n".join(diff)
    return found


def used_blocks(root: Path = ROOT) -> dict[str, list[str]]:
    """Block name -> the documents it appears in."""
    used: dict[str, list[str]] = {name: [] for name in BLOCKS}
    for path in documents(root):
        where = path.relative_to(root).as_posix()
        for block in find_blocks(path.read_text().split("\n"), where):
            used[block.name].append(where)
    return used


def write(root: Path = ROOT, files: Files | None = None) -> list[str]:
    """Re-render every block in place; returns the documents that changed."""
    files = files or Files(root)
    changed = []
    for path in documents(root):
        text = path.read_text()
        fresh = render(text, files, path.relative_to(root).as_posix())
        if fresh != text:
            path.write_text(fresh)
            changed.append(path.relative_to(root).as_posix())
    return changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cxr.readme_numbers", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--write", action="store_true", help="re-render the blocks in place")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root")
    args = parser.parse_args(argv)
    if args.write:
        print("\n".join(f"rewrote {c}" for c in write(args.root)) or "every block is up to date")
        return
    found = stale(args.root)
    for diff in found.values():
        print(diff)
    if found:
        print(
            f"stale: {', '.join(found)}; run `python -m cxr.readme_numbers --write`",
            file=sys.stderr,
        )
        sys.exit(1)
    print("every block is up to date")


if __name__ == "__main__":
    main()
