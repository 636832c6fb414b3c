"""predict's outputs: the record (one row per file, the same columns for JSON, CSV and the
API's DataFrame), the checks on --out and --cam before any work, writing them, the table
printed, and the Grad-CAM overlays. The --out file check (check_out_file) and `fail` (an error
on stderr and the exit status) serve calibrate and validate too.

--out replaces only an earlier output of predict (recognised by OWN_COLUMNS), anything else
only with --force; files are written atomically, so an interruption never leaves half a file.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from cxr.atomic import atomic_open
from cxr.inputs import CAM_SUFFIX, MAX_FILE_BYTES, UsageError, printable
from cxr.loading import Models, Threshold

OUT_FORMATS = (".json", ".csv")

# Columns every output of predict has had, whatever the four-class model's class names: how an
# earlier output (which --out may replace without --force) is recognised.
OWN_COLUMNS = ("file", "status", "predicted", "binary_p_covid", "covid_positive", "warning",
               "message")  # fmt: skip
EXIT_USAGE = 2  # bad usage: every command's exit status for it


# --- records ------------------------------------------------------------------------------------


def ok_record(
    path: Path,
    probs: np.ndarray,
    p_covid: float,
    threshold: Threshold,
    names: list[str],
    warning: str,
    age_group: str = "unknown",
) -> dict[str, Any]:
    best = int(np.argmax(probs))
    return {
        "file": printable(str(path)),
        "status": "ok",
        "predicted": names[best],
        "p_predicted": float(probs[best]),
        **{f"p_{name}": float(p) for name, p in zip(names, probs, strict=True)},
        "binary_p_covid": float(p_covid),
        "threshold": threshold.value,
        "threshold_source": threshold.source,
        "covid_positive": bool(p_covid >= threshold.value),
        "cam": None,
        "age_group": age_group,
        "warning": warning,
        "message": "",
    }


def error_record(path: Path, message: str, names: list[str]) -> dict[str, Any]:
    record = dict.fromkeys(columns(names))
    return record | {"file": printable(str(path)), "status": "error", "message": printable(message)}


def columns(names: list[str]) -> list[str]:
    """Output columns, the same for every row and for JSON and CSV."""
    probs = [f"p_{name}" for name in names]
    return ["file", "status", "predicted", "p_predicted", *probs, "binary_p_covid",
            "threshold", "threshold_source", "covid_positive", "cam", "age_group",
            "warning", "message"]  # fmt: skip


# --- --out and --cam, checked before any work ----------------------------------------------


def check_out(path: Path, force: bool = False) -> None:
    """Refuse an --out that cannot be written, or that holds what predict did not write, before
    any image is read, so no work is lost and no one else's file is replaced."""
    owner = "an earlier output of predict (not its columns)"
    check_out_file(path, OUT_FORMATS, force, written_by_predict, owner, example="predictions.csv")
    check_writable_folder(path.parent, f"--out {path}")


def check_out_file(
    path: Path, suffixes: tuple[str, ...], force: bool, owned: Callable[[Path], bool], what: str,
    example: str | None = None,
) -> None:  # fmt: skip
    """Refuse an --out file without one of `suffixes`, one that exists and is not a regular file,
    or one that `owned` does not recognise as `what` the command writes, unless `force`. With
    `example`, a folder is refused with a file name to give in it."""
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"--out must end in {' or '.join(suffixes)}, got {path}")
    if example is not None and path.is_dir():
        raise UsageError(f"--out {path} is a folder; give a file, e.g. {path / example}")
    if path.exists() and not path.is_file():
        raise UsageError(f"--out {path} exists and is not a regular file; choose another name")
    if path.is_file() and not force and not owned(path):
        raise UsageError(
            f"--out {path} exists and is not {what}; refusing to replace it: choose another "
            "name, or pass --force"
        )


def written_by_predict(path: Path) -> bool:
    """Whether `path` is an earlier output of predict: a CSV whose header is predict's (first
    `file`, `status`, and OWN_COLUMNS), or a JSON list of records with OWN_COLUMNS."""
    try:
        if path.suffix.lower() == ".csv":
            with open(path, encoding="utf-8", newline="") as fh:
                header = next(csv.reader([fh.readline(65536)]), [])
            return header[:2] == ["file", "status"] and set(OWN_COLUMNS) <= set(header)
        if path.stat().st_size > MAX_FILE_BYTES:  # no output of predict is that large
            return False
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, csv.Error):
        return False
    return isinstance(records, list) and all(
        isinstance(r, dict) and set(OWN_COLUMNS) <= r.keys() for r in records
    )


def check_cam(folder: Path) -> None:
    """Refuse a --cam that is a file or lies in a read-only place, before any work."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--cam {folder} exists and is not a folder; choose another path")
    check_writable_folder(folder, f"--cam {folder}")


def check_writable_folder(folder: Path, what: str) -> None:
    """`folder` exists or can be created, and files can be created in it.

    Checked on the nearest existing ancestor, by creating and removing a probe file: permission
    bits say nothing about read-only mounts or ACLs. Nothing is created for good here.
    """
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            raise UsageError(f"{what}: {existing} is a dangling symlink")
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what}: {existing} is not a folder, so {folder} cannot be created")
    probe = existing / f".predict-probe-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(
            f"{what}: cannot write in {existing} ({exc.strerror or exc}); choose a writable folder"
        ) from exc


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """`error: message` on stderr, and exit with `code` (predict's, calibrate's and validate's)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


# --- writing ------------------------------------------------------------------------------------


def write_records(records: list[dict[str, Any]], path: Path, names: list[str]) -> None:
    """JSON (a list of records) or CSV by the suffix, written atomically."""
    with atomic_open(path) as fh:
        if path.suffix.lower() == ".json":
            fh.write(json.dumps(records, indent=2) + "\n")
        else:
            writer = csv.DictWriter(fh, fieldnames=columns(names))
            writer.writeheader()
            writer.writerows(records)


def format_table(records: list[dict[str, Any]]) -> str:
    """A readable summary: one line per file with its prediction and decision, or its error."""
    width = min(60, max(len("file"), *(len(r["file"]) for r in records)))
    lines = [f"{'file':<{width}}  {'predicted':<10} {'p(4cls)':>7} {'p(covid)':>8}  decision"]
    for r in records:
        name = r["file"] if len(r["file"]) <= width else "..." + r["file"][-(width - 3) :]
        if r["status"] == "ok":
            decision = "COVID-19 positive" if r["covid_positive"] else "negative"
            warning = f"  WARNING: {r['warning']}" if r["warning"] else ""
            lines.append(
                f"{name:<{width}}  {r['predicted']:<10} {r['p_predicted']:>7.3f} "
                f"{r['binary_p_covid']:>8.3f}  {decision}{warning}"
            )
        else:
            lines.append(f"{name:<{width}}  ERROR: {r['message']}")
    return "\n".join(lines)


def save(records: list[dict[str, Any]], out: Path | None, names: list[str]) -> str | None:
    """Write --out if given; the reason it failed, or None."""
    if out is None:
        return None
    try:
        write_records(records, out, names)
    except OSError as exc:
        return f"could not write {out} ({exc.strerror or exc})"
    return None


def write_cams(
    records: list[dict[str, Any]], images: np.ndarray, models: Models, folder: Path,
    batch_size: int, used: set[str], layer: str = "layer3",
) -> None:  # fmt: skip
    """Grad-CAM overlays of the four-class model's predicted class, as <stem>_cam.png."""
    from PIL import Image

    from cxr.cam import compute_cams, overlay  # matplotlib & co., only needed for --cam

    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return
    targets = [models.class_names.index(r["predicted"]) for r in ok]
    cams = compute_cams(models.four_class, images, targets, batch_size=batch_size, layer=layer)
    folder.mkdir(parents=True, exist_ok=True)
    for record, image, cam in zip(ok, images, cams, strict=True):
        out = folder / _unique_name(Path(record["file"]).stem, used)
        with atomic_open(out, binary=True) as fh:  # Ctrl-C never leaves half an overlay
            Image.fromarray(overlay(image, cam)).save(fh, format="PNG")
        record["cam"] = printable(str(out))


def _unique_name(stem: str, used: set[str]) -> str:
    """<stem>_cam.png, numbered when two inputs share a stem (a/x.png, b/x.png)."""
    name, k = f"{stem}{CAM_SUFFIX}", 1
    while name in used:
        k += 1
        name = f"{stem}-{k}{CAM_SUFFIX}"
    used.add(name)
    return name
