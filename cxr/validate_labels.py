"""validate's labels.csv: reading it, and checking each row (label, file, age group) before
anything is scored. A row that cannot be scored keeps its line and says why (`Row.problem`).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr.inputs import UsageError, stat_path

LABELS = ("covid", "viral", "bacterial", "normal", "pneumonia", "non_covid")
AGE_GROUPS = {"adult": "adult", "pediatric": "pediatric", "paediatric": "pediatric",
              "unknown": "unknown"}  # fmt: skip


@dataclass(frozen=True)
class Row:
    """One data row of labels.csv; `problem` says why it cannot be scored (label, path)."""

    line: int
    file: str  # as written in the CSV
    path: Path  # resolved against the CSV's folder
    label: str | None  # one of LABELS, else None
    written_label: str  # as written in the CSV
    patient: str
    age_group: str | None
    problem: str | None = None
    note: str | None = None  # a problem that does not stop scoring (an unknown age group)


@dataclass(frozen=True)
class Labels:
    path: Path
    rows: list[Row]
    has_patient: bool
    has_age_group: bool


def normalise_label(text: str) -> str:
    return re.sub(r"[\s-]+", "_", text.strip().lower())


def label_problem(raw: str) -> str:
    """Why a label is not one of LABELS, with the nearest one when there is one."""
    if not raw.strip():
        return f"no label (one of {', '.join(LABELS)} expected)"
    near = difflib.get_close_matches(normalise_label(raw), LABELS, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"label {raw!r} is not one of {', '.join(LABELS)}{hint}"


def read_labels(path: Path) -> Labels:
    """The rows of labels.csv, each checked; a CSV without its columns or rows is refused."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            header = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
            missing = [c for c in ("file", "label") if c not in header]
            if not header:
                raise UsageError(
                    f"{path} is empty: expected a header line `file,label` and a row per film"
                )
            if missing:
                found = ", ".join(repr(n) for n in reader.fieldnames or [])
                hint = " (columns separated by ';'? use commas)" if ";" in found else ""
                raise UsageError(
                    f"{path} has no {' or '.join(repr(m) for m in missing)} column (found {found})"
                    f"{hint}: the header must name the columns file,label"
                )
            rows = [parse_row(record, header, reader.line_num, path.parent)
                    for record in reader if any((v or "").strip() for v in record.values()
                                                if isinstance(v, str))]  # fmt: skip
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"{path}: not a readable CSV ({exc})") from exc
    if not rows:
        raise UsageError(f"{path} has a header but no rows: add a row file,label per film")
    return Labels(path, mark_repeats(rows), "patient" in header, "age_group" in header)


def parse_row(record: dict[str, Any], header: dict[str, str], line: int, folder: Path) -> Row:
    def cell(name: str) -> str:
        value = record.get(header[name]) if name in header else None
        return value.strip() if isinstance(value, str) else ""

    file, raw_label = cell("file"), cell("label")
    label = normalise_label(raw_label)
    path = folder / file
    problem = None
    if not file:
        problem = "no file named"
    elif label not in LABELS:
        problem = label_problem(raw_label)
    else:
        st, why = stat_path(path)
        if st is None:
            problem = why
        elif os.path.isdir(path):
            problem = "a folder, not a film: name one file per row"
    age, note = cell("age_group"), None
    age_group = AGE_GROUPS.get(age.lower()) if age else None
    if age and age_group is None:
        note = f"age_group {age!r} is not adult, pediatric or unknown; scored as unknown"
    return Row(line, file, path, label if label in LABELS else None, raw_label,
               cell("patient") or f"line {line}", age_group, problem, note)  # fmt: skip


def mark_repeats(rows: list[Row]) -> list[Row]:
    """A film named twice is scored once, under its first row: twice would weigh it double."""
    first: dict[str, int] = {}
    marked = []
    for row in rows:
        if row.problem is None:
            key = os.path.realpath(row.path)
            if key in first:
                row = dataclasses.replace(row, problem=f"the same film as line {first[key]}")
            else:
                first[key] = row.line
        marked.append(row)
    return marked
