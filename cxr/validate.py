"""Validate the models on a site's own labelled films: what evaluate reports for test, for them.

    python -m cxr validate labels.csv [--out DIR] [--force] [--models DIR] [--threshold T] \
        [--site FILE] [--bootstrap 1000] [--batch-size 16] [--threads N]

labels.csv has a header with the columns `file` and `label` (any order, more columns allowed):
`file` is a film's path, relative ones against the CSV's folder; `label` is one of covid, viral,
bacterial, normal, pneumonia (viral or bacterial, type unknown) or non_covid (COVID-19 or not,
nothing more known). Optional columns: `patient` (films of one patient are resampled together
by the bootstrap) and `age_group` (adult, pediatric or unknown: call rates are also given per
group, and predict's caveat on a viral/bacterial call is given as for --age-group).

Every film goes through predict's own path: cxr.predict resolves the models and the threshold
(bundle, site calibration, --threshold) and predict_chunk reads, checks, crops and scores the
films, so a validated number is a number predict gives. The binary model's p(covid) is
scored as ROC AUC, and as sensitivity and specificity at each threshold that applies: the
committed one (the bundle's), the site's (`site.json`, `python -m cxr calibrate`) and
--threshold, each with its counts and a bootstrap 95% CI (films resampled, or patients when a
`patient` column is given). The four-class model's argmax is scored on the rows with a
four-class label; a `pneumonia` row counts as right when called viral or bacterial.

Written to --out (default: `validation/` beside the CSV): validation.json, validation.md,
predictions.csv (predict's columns for every row of the CSV, with `line`, `label` and the
optional columns) and PNGs: roc.png, calibration.png, confusion_binary_<source>.png,
confusion_four_class.png. A row that cannot be scored (a label that is not one of the six, a
missing, unreadable or repeated file) is named with its line on stderr, listed in the report
and left out; the rest is scored. --out is only replaced when it is empty or an earlier output
of validate (else --force); all files are made in a hidden folder inside it and moved in place
at the end, so an interruption leaves the earlier report as it was.

Exit status: 0 every row scored (a class absent is not an error: what it leaves undefined
is said), 1 some rows left out or with an unknown age_group (the report lists them) or the
report could not be written, 2 bad usage (no such CSV, no `file`/`label` column, no rows,
models, bundle, threshold, --out), 130 interrupted (Ctrl-C; --out left as it was).

This module is the command line; the labels are read and checked by cxr.validate_labels, the
numbers computed by cxr.validate_results and the report written by cxr.validate_report.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from cxr.api import predict_chunk, read_ahead
from cxr.bundle import BUNDLE_NAME, SITE_NAME, Bundle, sha256_of, site_threshold
from cxr.cli import setup_logging
from cxr.errors import BundleError
from cxr.infer import configure_cpu
from cxr.inputs import Input, UsageError
from cxr.loading import Threshold, choose_threshold, load_models, model_files
from cxr.models import CheckpointError
from cxr.outputs import check_writable_folder, error_record, fail
from cxr.params import non_negative_int
from cxr.predict_options import (
    READ_THREADS,
    add_model_options,
    add_threshold_options,
    check_model_options,
)
from cxr.validate_labels import Labels, Row, read_labels
from cxr.validate_report import (
    JSON_NAME,
    InterruptedAfterWriting,
    summary,
    write_report,
    written_by_validate,
)
from cxr.validate_results import FORMAT, SOURCES, Setup, problems, results

log = logging.getLogger(__name__)

EXIT_OK, EXIT_LEFT_OUT, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MAX_PRINTED_PROBLEMS = 20


# --- arguments, --out ------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cxr validate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("labels", type=Path, help="CSV with the columns file,label")
    parser.add_argument(
        "--out", type=Path, default=None, help="report folder (default: validation/ beside the CSV)"
    )
    parser.add_argument(
        "--force", action="store_true", help="write into an --out that validate did not write"
    )
    add_model_options(parser)
    add_threshold_options(
        parser,
        threshold_help="a COVID-19 threshold to report besides the bundle's and the site's "
        "(predict's rule)",
    )
    parser.add_argument(
        "--bootstrap", type=non_negative_int, default=1000,
        help="bootstrap resamples for the 95%% CIs (0: no CIs; default: %(default)s)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    check_model_options(parser, args)
    args.out = args.out or args.labels.parent / "validation"
    return args


def check_out(out: Path, force: bool) -> None:
    """Refuse an --out that is a file, or a folder holding what validate did not write."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force and not written_by_validate(out):
        raise UsageError(
            f"--out {out} holds files that validate did not write (no {JSON_NAME} of "
            f"{FORMAT}); refusing to write into it: choose another folder, or pass --force"
        )
    check_writable_folder(out, f"--out {out}")


# --- models and thresholds --------------------------------------------------------------------


def load_setup(args: argparse.Namespace) -> Setup:
    """predict's models and threshold, and the other thresholds that apply to this binary model.

    The bundle is read whenever there is one, so the committed threshold is reported even when
    --threshold is given."""
    need_bundle = args.threshold is None or (args.models / BUNDLE_NAME).exists()
    files, bundle = model_files(args, need_bundle=need_bundle)
    threshold = choose_threshold(args, bundle, files["binary"])
    models = load_models(files["four_class"], files["binary"], files["segmenter"])
    digest = sha256_of(files["binary"])
    points, notes = other_thresholds(args, bundle, files["binary"], digest, threshold)
    info = {
        "binary": {"file": str(files["binary"]), "sha256": digest},
        "four_class": {"file": str(files["four_class"]), "sha256": sha256_of(files["four_class"])},
        "segmenter": None if models.segmenter is None else str(files["segmenter"]),
        "class_names": models.class_names,
        "preprocessing": models.spec.to_dict(),
        "bundle": None if bundle is None else str(bundle.path),
        "thresholds": [{"source": p.source, "value": p.value} for p in points],
        "predictions_threshold": {"source": threshold.source, "value": threshold.value},
    }
    if bundle is not None and any(p.source == "bundle" for p in points):
        info["bundle_threshold_chosen_on"] = bundle.threshold_source
    return Setup(models, threshold, points, info, notes)


def other_thresholds(
    args: argparse.Namespace, bundle: Bundle | None, binary: Path, digest: str, chosen: Threshold
) -> tuple[list[Threshold], list[str]]:
    """predict's threshold, plus the bundle's and the site's where they belong to `binary`."""
    points, notes = {chosen.source: chosen}, []
    if bundle is not None and "bundle" not in points:
        if bundle.sha256["binary"] == digest:
            points["bundle"] = Threshold(bundle.threshold, "bundle")
        else:
            notes.append(f"the bundle's threshold is not reported: {bundle.path} was written for "
                         "another binary model")  # fmt: skip
    site = args.site or args.models / SITE_NAME
    if "site" not in points and (args.site is not None or site.exists()):
        try:  # only with --threshold: predict itself would have taken the site's otherwise
            points["site"] = Threshold(site_threshold(site, binary, digest).threshold, "site")
        except BundleError as exc:
            notes.append(f"the site threshold is not reported: {exc}")
    return [points[s] for s in SOURCES if s in points], notes


# --- scoring ----------------------------------------------------------------------------------


def score(rows: list[Row], setup: Setup, batch_size: int) -> list[dict[str, Any]]:
    """predict's record for every row, in order: the films through predict_chunk, the rows
    left out as error records that say why."""
    from tqdm import tqdm

    names = setup.models.class_names
    records: dict[int, dict[str, Any]] = {
        i: error_record(row.path, f"{row.path}: {row.problem}", names)
        for i, row in enumerate(rows) if row.problem is not None
    }  # fmt: skip
    todo = [i for i, row in enumerate(rows) if row.problem is None]
    with tqdm(total=len(todo), desc="validate", unit="film", disable=None, leave=False) as bar:
        films = [Input(rows[i].path) for i in todo]
        reads = read_ahead(films, setup.models.spec, batch_size, READ_THREADS)
        for start, (items, decoded) in zip(range(0, len(todo), batch_size), reads, strict=True):
            chunk = todo[start : start + batch_size]
            done, _ = predict_chunk(
                items,
                setup.models,
                setup.threshold,
                batch_size,
                age_group=[rows[i].age_group or "unknown" for i in chunk],
                decoded=decoded,
            )
            records.update(zip(chunk, done, strict=True))
            bar.update(len(chunk))
    return [with_label(records[i], row) for i, row in enumerate(rows)]


def with_label(record: dict[str, Any], row: Row) -> dict[str, Any]:
    label = row.label if row.label is not None else row.written_label
    return {"line": row.line, **record, "label": label, "patient": row.patient,
            "age_group": row.age_group or "unknown"}  # fmt: skip


# --- output -----------------------------------------------------------------------------------


def print_problems(labels: Labels, records: list[dict[str, Any]]) -> None:
    found = problems(labels.rows, records)
    for p in found[:MAX_PRINTED_PROBLEMS]:
        where = f"{labels.path} line {p['line']} ({p['file'] or 'no file'})"
        fate = "scored" if p["scored"] else "left out"
        print(f"problem: {where}, {fate}: {p['message']}", file=sys.stderr)
    if len(found) > MAX_PRINTED_PROBLEMS:
        print(f"problem: ... and {len(found) - MAX_PRINTED_PROBLEMS} more, all listed in the "
              "report", file=sys.stderr)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    configure_cpu(args.threads)
    try:
        labels = read_labels(args.labels)
        check_out(args.out, args.force)
        setup = load_setup(args)
        records = score(labels.rows, setup, args.batch_size)
        result = results(labels, records, setup, args.bootstrap)
        print_problems(labels, records)
        try:
            write_report(args.out, result, records, labels, setup.models.class_names)
        except OSError as exc:
            fail(f"could not write the report in {args.out} ({exc.strerror or exc}); nothing "
                 "was written", EXIT_LEFT_OUT)  # fmt: skip
    except (UsageError, CheckpointError, BundleError) as exc:
        fail(str(exc))
    except InterruptedAfterWriting:
        fail(f"interrupted (Ctrl-C) after the report was written in full to {args.out}", 130)
    except KeyboardInterrupt:
        fail(f"interrupted (Ctrl-C); {args.out} was left as it was", EXIT_INTERRUPTED)
    for line in result["binary"]["undefined"]:
        print(f"note: {line}", file=sys.stderr)
    print(summary(result, args.out))
    sys.exit(EXIT_LEFT_OUT if result["problems"] else EXIT_OK)


if __name__ == "__main__":
    main()
