"""Predict new radiographs with the trained four-class and binary models.

    python -m cxr predict scans/ extra.png --four-class models/four_class.pt \
        --binary models/binary.pt --threshold-from metrics/binary.json \
        --out predictions.csv [--cam plots/predict] [--batch-size 16]

Files (PNG, JPEG, ... decoded by content; DICOM by its "DICM" magic or .dcm/.dicom suffix) and
folders (searched recursively) go through the same preprocessing as the training images, the
spec read from the checkpoints. Every new image is harmonised, as the split stage does for all
sources but the already-harmonised Kermany set. A file that cannot be read gets an error row;
the others are still predicted.

Exit status: 0 all images predicted, 1 some failed, 2 bad usage, checkpoint or threshold.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from cxr.cli import setup_logging
from cxr.dicom import DICOM_SUFFIXES, has_dicom_magic, is_dicom, read_dicom
from cxr.images import ImageError, Preprocessing, load_image, preprocess, preprocess_gray
from cxr.models import CheckpointError, CXRNet, load_checkpoint
from cxr.train import configure_cpu, predict_proba

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
OUT_FORMATS = (".json", ".csv")
EXIT_OK, EXIT_IMAGE_ERRORS, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """Bad arguments, checkpoints or threshold: nothing can be predicted (exit status 2)."""


@dataclass(frozen=True)
class Models:
    """Both networks and what is needed to feed them and read their outputs."""

    four_class: CXRNet
    binary: CXRNet
    class_names: list[str]  # the four-class model's, in output order
    covid_index: int  # the binary model's COVID-19 output
    spec: Preprocessing


@dataclass(frozen=True)
class Input:
    """One file to predict, or a path that yielded none (`error` says why)."""

    path: Path
    error: str | None = None


# --- arguments, threshold, checkpoints --------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cxr predict", description=__doc__.split("\n")[0]
    )
    parser.add_argument("paths", nargs="+", type=Path, help="image/DICOM files or folders")
    parser.add_argument("--four-class", type=Path, default=Path("models/four_class.pt"))
    parser.add_argument("--binary", type=Path, default=Path("models/binary.pt"))
    parser.add_argument(
        "--threshold-from", type=Path, default=Path("metrics/binary.json"),
        help="evaluate stage metrics holding the validation-chosen threshold (threshold.value)",
    )  # fmt: skip
    parser.add_argument(
        "--threshold", type=float, default=None,
        help="COVID-19 decision threshold instead of --threshold-from (e.g. 0.5)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="predictions .json or .csv")
    parser.add_argument("--cam", type=Path, default=None, help="folder for Grad-CAM overlays")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = cores)")
    args = parser.parse_args(argv)
    if args.out is not None and args.out.suffix.lower() not in OUT_FORMATS:
        parser.error(f"--out must end in {' or '.join(OUT_FORMATS)}, got {args.out}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    return args


def read_threshold(path: Path) -> float:
    """The COVID-19 threshold the evaluate stage chose on validation data: threshold.value."""
    hint = "run the evaluate stage, or pass --threshold explicitly (e.g. --threshold 0.5)"
    try:
        blob = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} not found: {hint}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: not readable JSON ({exc}); {hint}") from exc
    value = blob.get("threshold") if isinstance(blob, dict) else None
    value = value.get("value") if isinstance(value, dict) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise UsageError(f"{path}: no threshold.value in [0, 1] (found {value!r}); {hint}")
    return float(value)


def checkpoint_spec(meta: dict[str, Any], path: Path) -> Preprocessing:
    """The preprocessing a checkpoint was trained with (the same dataclass the split uses)."""
    try:
        spec = Preprocessing(**meta["preprocessing"])
    except (KeyError, TypeError) as exc:
        raise UsageError(f"{path}: no usable preprocessing in its metadata ({exc})") from exc
    if meta.get("image_size", spec.image_size) != spec.image_size:
        raise UsageError(
            f"{path}: image_size {meta['image_size']} differs from its preprocessing "
            f"image_size {spec.image_size}"
        )
    return spec


def load_models(four_class_path: Path, binary_path: Path) -> Models:
    """Load both checkpoints and check they agree on how images are prepared."""
    loaded = {}
    for task, path in (("four_class", four_class_path), ("binary", binary_path)):
        try:
            model, meta = load_checkpoint(path, task)
        except KeyError as exc:
            raise UsageError(f"{path}: checkpoint metadata lacks {exc}") from exc
        loaded[task] = (model, meta, checkpoint_spec(meta, path))
    (four, four_meta, spec), (binary, binary_meta, binary_spec) = loaded.values()
    if spec != binary_spec:
        raise UsageError(
            f"the checkpoints disagree on preprocessing: {four_class_path} {spec.to_dict()} vs "
            f"{binary_path} {binary_spec.to_dict()}; train both from the same params.yaml"
        )
    if "covid" not in binary_meta["class_names"]:
        raise UsageError(f"{binary_path}: no 'covid' class in {binary_meta['class_names']}")
    return Models(
        four_class=four,
        binary=binary,
        class_names=list(four_meta["class_names"]),
        covid_index=binary_meta["class_names"].index("covid"),
        spec=spec,
    )


# --- inputs -----------------------------------------------------------------------------------


def _is_candidate(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES:
        return True
    return suffix == "" and has_dicom_magic(path)


def find_images(folder: Path) -> list[Path]:
    """Image and DICOM files under `folder`, recursively, in a stable (sorted) order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and _is_candidate(p))


def collect_inputs(paths: list[Path]) -> list[Input]:
    """Files as given, folders expanded; each duplicate once; missing or empty paths flagged."""
    inputs: list[Input] = []
    seen: set[Path] = set()
    for path in paths:
        if path.is_dir():
            found = find_images(path)
            if not found:
                kinds = ", ".join(IMAGE_SUFFIXES + DICOM_SUFFIXES)
                error = f"no images in folder (looked for {kinds} and DICOM files, recursively)"
                inputs.append(Input(path, error))
        elif path.exists():
            found = [path]
        else:
            inputs.append(Input(path, "no such file or folder"))
            found = []
        for file in found:
            if file.resolve() not in seen:
                seen.add(file.resolve())
                inputs.append(Input(file))
    if not any(item.error is None for item in inputs):
        problems = "; ".join(f"{item.path}: {item.error}" for item in inputs)
        raise UsageError(f"no images to predict ({problems})")
    return inputs


def load_input(path: Path, spec: Preprocessing) -> np.ndarray:
    """One file -> the model's uint8 input, through the shared preprocessing.

    New images are harmonised like every training source but Kermany's, whose publisher had
    already squashed them to 224 px JPEG (see cxr.images.Preprocessing).
    """
    if is_dicom(path):
        return preprocess_gray(read_dicom(path), spec, already_harmonised=False)
    return preprocess(load_image(path), spec, already_harmonised=False)


# --- prediction -------------------------------------------------------------------------------


def ok_record(
    path: Path, probs: np.ndarray, p_covid: float, threshold: float, names: list[str]
) -> dict[str, Any]:
    best = int(np.argmax(probs))
    return {
        "file": str(path),
        "status": "ok",
        "predicted": names[best],
        "p_predicted": float(probs[best]),
        **{f"p_{name}": float(p) for name, p in zip(names, probs, strict=True)},
        "binary_p_covid": float(p_covid),
        "threshold": threshold,
        "covid_positive": bool(p_covid >= threshold),
        "cam": None,
        "message": "",
    }


def error_record(path: Path, message: str, names: list[str]) -> dict[str, Any]:
    record = dict.fromkeys(columns(names))
    return record | {"file": str(path), "status": "error", "message": message}


def columns(names: list[str]) -> list[str]:
    """Output columns, the same for every row and for JSON and CSV."""
    probs = [f"p_{name}" for name in names]
    return ["file", "status", "predicted", "p_predicted", *probs, "binary_p_covid",
            "threshold", "covid_positive", "cam", "message"]  # fmt: skip


def read_inputs(
    items: list[Input], spec: Preprocessing
) -> tuple[list[np.ndarray], list[int], dict[int, str]]:
    """Preprocessed images, the positions in `items` they came from, and the errors by position."""
    images, where, errors = [], [], {}
    for i, item in enumerate(items):
        if item.error is not None:
            errors[i] = f"{item.path}: {item.error}"
            continue
        try:
            images.append(load_input(item.path, spec))
            where.append(i)
        except (ImageError, OSError, ValueError) as exc:  # PIL/NumPy on odd modes: still the file
            message = str(exc)
            errors[i] = message if message.startswith(str(item.path)) else f"{item.path}: {message}"
    return images, where, errors


def predict_chunk(
    items: list[Input], models: Models, threshold: float, batch_size: int
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Records for `items` in order (error rows for unreadable ones) and the images read."""
    names, size = models.class_names, models.spec.image_size
    images, where, errors = read_inputs(items, models.spec)
    batch = np.stack(images) if images else np.zeros((0, size, size), dtype=np.uint8)
    four = predict_proba(models.four_class, batch, batch_size=batch_size)
    covid = predict_proba(models.binary, batch, batch_size=batch_size)[:, models.covid_index]
    records = {i: error_record(items[i].path, message, names) for i, message in errors.items()}
    for row, i in enumerate(where):
        records[i] = ok_record(items[i].path, four[row], float(covid[row]), threshold, names)
    return [records[i] for i in range(len(items))], batch


def write_cams(
    records: list[dict[str, Any]], images: np.ndarray, models: Models, folder: Path,
    batch_size: int, used: set[str],
) -> None:  # fmt: skip
    """Grad-CAM overlays of the four-class model's predicted class, as <stem>_cam.png."""
    from PIL import Image

    from cxr.cam import compute_cams, overlay  # matplotlib & co., only needed for --cam

    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return
    targets = [models.class_names.index(r["predicted"]) for r in ok]
    cams = compute_cams(models.four_class, images, targets, batch_size=batch_size)
    folder.mkdir(parents=True, exist_ok=True)
    for record, image, cam in zip(ok, images, cams, strict=True):
        out = folder / _unique_name(Path(record["file"]).stem, used)
        Image.fromarray(overlay(image, cam)).save(out)
        record["cam"] = str(out)


def _unique_name(stem: str, used: set[str]) -> str:
    """<stem>_cam.png, numbered when two inputs share a stem (a/x.png, b/x.png)."""
    name, k = f"{stem}_cam.png", 1
    while name in used:
        k += 1
        name = f"{stem}-{k}_cam.png"
    used.add(name)
    return name


def predict_all(
    inputs: list[Input], models: Models, *, threshold: float, batch_size: int,
    cam_dir: Path | None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Predict in chunks of `batch_size` files, so memory stays flat for any number of files."""
    records: list[dict[str, Any]] = []
    used: set[str] = set()
    for start in range(0, len(inputs), batch_size):
        chunk, images = predict_chunk(
            inputs[start : start + batch_size], models, threshold, batch_size
        )
        if cam_dir is not None:
            write_cams(chunk, images, models, cam_dir, batch_size, used)
        records += chunk
    return records


# --- output -----------------------------------------------------------------------------------


def write_records(records: list[dict[str, Any]], path: Path, names: list[str]) -> None:
    """JSON (a list of records) or CSV by the suffix, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix.lower() == ".json":
        tmp.write_text(json.dumps(records, indent=2) + "\n")
    else:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns(names))
            writer.writeheader()
            writer.writerows(records)
    tmp.replace(path)


def format_table(records: list[dict[str, Any]]) -> str:
    """A readable summary: one line per file with its prediction and decision, or its error."""
    width = min(60, max(len("file"), *(len(r["file"]) for r in records)))
    lines = [f"{'file':<{width}}  {'predicted':<10} {'p(4cls)':>7} {'p(covid)':>8}  decision"]
    for r in records:
        name = r["file"] if len(r["file"]) <= width else "..." + r["file"][-(width - 3) :]
        if r["status"] == "ok":
            decision = "COVID-19 positive" if r["covid_positive"] else "negative"
            lines.append(
                f"{name:<{width}}  {r['predicted']:<10} {r['p_predicted']:>7.3f} "
                f"{r['binary_p_covid']:>8.3f}  {decision}"
            )
        else:
            lines.append(f"{name:<{width}}  ERROR: {r['message']}")
    return "\n".join(lines)


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    configure_cpu(args.threads)
    try:
        threshold = args.threshold
        if threshold is None:
            threshold = read_threshold(args.threshold_from)
        models = load_models(args.four_class, args.binary)
        inputs = collect_inputs(args.paths)
    except (UsageError, CheckpointError) as exc:
        fail(str(exc))
    start = time.perf_counter()
    records = predict_all(
        inputs, models, threshold=threshold, batch_size=args.batch_size, cam_dir=args.cam
    )
    seconds = time.perf_counter() - start
    if args.out is not None:
        write_records(records, args.out, models.class_names)
    print(format_table(records))
    n_ok = sum(r["status"] == "ok" for r in records)
    rate = n_ok / seconds if seconds > 0 else math.inf
    print(
        f"{n_ok} of {len(records)} images predicted in {seconds:.2f} s ({rate:.1f} images/s)"
        + (f"; predictions in {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    sys.exit(EXIT_OK if n_ok == len(records) else EXIT_IMAGE_ERRORS)


if __name__ == "__main__":
    main()
