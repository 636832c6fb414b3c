"""Predict new radiographs with the trained four-class and binary models.

    python -m cxr predict scans/ extra.png [--models DIR] [--threshold T] \
        --out predictions.csv [--force] [--cam plots/predict] [--batch-size 16] [--read-threads 2] \
        [--strict] \
        [--age-group adult|pediatric|unknown] [--server [--socket PATH]]

The command-line face of cxr.api (the Python API): files are walked (cxr.inputs), read, and
sent through the API's model path; rows are written by cxr.outputs.

Models, lung segmenter and COVID-19 threshold come from the model bundle, `bundle.json` in
--models (default: the `models/` folder of the repository this package lives in, so predict
works from any working directory), which the evaluate stage writes beside the checkpoints with
each one's sha256. --binary, --four-class and --segmenter override single checkpoints. The
threshold is, in order: --threshold; a site calibration (`site.json` in --models, or --site,
written by `python -m cxr calibrate` for this very binary checkpoint); the bundle's, which is
refused for a --binary checkpoint the bundle was not written for. The `threshold_source`
column says which (argument, site or bundle).

Every file given, and every regular file under a folder given (searched recursively, symlinked
folders followed once), gets one row: a prediction or an error. Whether a file is an image is
decided by its content, not its name: DICOM by its "DICM" magic or .dcm/.dicom suffix, anything
else by trying to decode it (PNG, JPEG, WebP, TIFF, BMP, ...), as the split stage does. Hidden
entries (names starting with "."), such as .DS_Store or .git, are skipped inside folders and
counted in the summary; a hidden file named on the command line is predicted. Symlink loops,
dangling links, devices and FIFOs get error rows and are never read.

Images go through the same preprocessing as the training images, the spec read from the
checkpoints; every new image is harmonised, as the split stage does for all sources but the
already-harmonised Kermany set. Each prediction is sanity-checked first (near-constant, extreme
aspect ratio, tiny: see the limits in cxr.api); what is odd goes in the `warning` column.
The four-class model's viral vs bacterial split is validated on children only: a viral or
bacterial call gets a warning unless --age-group pediatric (the `age_group` column).

JPEG/PNG/TIFF files are turned upright by their EXIF orientation, as the split stage reads
them; of a multi-frame file (animated GIF, multi-page TIFF, multi-frame DICOM) only the first
frame is predicted, with a warning. --out replaces only an earlier output of predict (its
columns or records), anything else only with --force; the --out file, its temporary and the
overlays in --cam are never read as inputs.

With --server the request goes to a resident `python -m cxr serve` (cxr.serve), which keeps
the models loaded and runs this same code on it, in the caller's working directory: the rows,
--out, the table and the exit status are the same, without paying for importing torch and
loading the checkpoints on every call.

Exit status: 0 all images predicted, 1 some failed (or, with --strict, some got a warning
about the image, or --out could not be written), 2 bad usage, checkpoint, bundle, threshold or --out, 130
interrupted (Ctrl-C; the rows done so far are written to --out, nothing is left half-written).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from cxr.api import image_problems, predict_chunk, read_ahead
from cxr.cli import setup_logging
from cxr.errors import BundleError
from cxr.infer import configure_cpu
from cxr.inputs import Input, Inputs, Own, UsageError, collect_inputs
from cxr.loading import Models, Threshold, load_models, resolve
from cxr.models import CheckpointError
from cxr.outputs import check_cam, check_out, fail, format_table, save, write_cams
from cxr.predict_options import parse_args

log = logging.getLogger(__name__)

# load_models' signature: four-class, binary and (optional) segmenter checkpoints -> Models.
LoadModels = Callable[[Path, Path, "Path | None"], Models]

EXIT_OK, EXIT_IMAGE_ERRORS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def predict_all(
    inputs: list[Input], models: Models, *, threshold: Threshold, batch_size: int,
    cam_dir: Path | None, cam_layer: str = "layer3", age_group: str = "unknown",
    read_threads: int = 0,
) -> Iterator[list[dict[str, Any]]]:  # fmt: skip
    """Records chunk by chunk of `batch_size` files, so memory stays flat for any number of
    files and an interruption keeps every chunk finished before it; the next chunk's files are
    read by `read_threads` threads while the models run (0: read in turn)."""
    used: set[str] = set()
    for items, decoded in read_ahead(inputs, models.spec, batch_size, read_threads):
        chunk, images = predict_chunk(
            items, models, threshold, batch_size, age_group=age_group, decoded=decoded
        )
        if cam_dir is not None:
            write_cams(chunk, images, models, cam_dir, batch_size, used, cam_layer)
        yield chunk


# --- output -----------------------------------------------------------------------------------


def summary(
    records: list[dict[str, Any]], total: int, seconds: float, skipped: Inputs, saved: Path | None
) -> str:
    """One line for stderr that counts every file seen, so none can go missing unnoticed."""
    n_ok = sum(r["status"] == "ok" for r in records)
    n_warned = sum(bool(r["warning"]) for r in records)
    rate = n_ok / seconds if seconds > 0 else math.inf
    line = f"{n_ok} of {total} files predicted in {seconds:.2f} s ({rate:.1f} images/s)"
    line += f"; {n_warned} with warnings" if n_warned else ""
    line += f"; {skipped.hidden} hidden entries skipped" if skipped.hidden else ""
    line += f"; {skipped.own} of predict's own outputs skipped" if skipped.own else ""
    return line + (f"; predictions in {saved}" if saved else "")


def interrupted_outcome(done: int, saved: Path | None, problem: str | None) -> str:
    """What became of the rows finished before Ctrl-C."""
    if done == 0:
        return "nothing was finished, nothing written"
    if saved is not None:
        return f"the {done} rows done are saved in {saved} (re-run for the rest)"
    return f"the {done} rows done are only in the table above ({problem or 'no --out given'})"


def prepare(args: argparse.Namespace, load: LoadModels) -> tuple[Threshold, Models, Inputs]:
    """Everything checked before the first image is read: outputs, bundle, threshold, models,
    inputs."""
    if args.out is not None:
        check_out(args.out, args.force)
    if args.cam is not None:
        check_cam(args.cam)
    resolved = resolve(args)
    models = load(resolved.four_class, resolved.binary, resolved.segmenter)
    return resolved.threshold, models, collect_inputs(args.paths, Own(args.out, args.cam))


def exit_code(records: list[dict[str, Any]], strict: bool) -> int:
    if any(r["status"] != "ok" for r in records):
        return EXIT_IMAGE_ERRORS
    warned = any(image_problems(r["warning"]) for r in records)
    return EXIT_IMAGE_ERRORS if strict and warned else EXIT_OK


def finish(
    records: list[dict[str, Any]],
    inputs: Inputs,
    args: argparse.Namespace,
    names: list[str],
    seconds: float,
    interrupted: bool,
) -> NoReturn:
    """Print the table, write --out, say what happened and exit with the matching status."""
    try:
        if records:
            print(format_table(records))
        out = args.out if records or not interrupted else None  # keep an earlier --out
        problem = save(records, out, names)
    except KeyboardInterrupt:
        fail(f"interrupted while writing {args.out}; it was left as it was", EXIT_INTERRUPTED)
    saved = out if out is not None and problem is None else None
    print(summary(records, len(inputs.items), seconds, inputs, saved), file=sys.stderr)
    if interrupted:
        fail(
            f"interrupted (Ctrl-C) after {len(records)} of {len(inputs.items)} files; "
            + interrupted_outcome(len(records), saved, problem),
            EXIT_INTERRUPTED,
        )
    if problem:
        fail(f"{problem}; the predictions are only in the table above", EXIT_IMAGE_ERRORS)
    sys.exit(exit_code(records, args.strict))


def main(argv: list[str] | None = None, load: LoadModels = load_models) -> None:
    run(parse_args(argv), load)


def run(args: argparse.Namespace, load: LoadModels = load_models) -> None:
    """Predict what `args` (predict_options.parse_args) asks for and exit with predict's status;
    `load` loads the checkpoints (the server's keeps them loaded between requests)."""
    setup_logging()
    configure_cpu(args.threads)
    try:
        threshold, models, inputs = prepare(args, load)
    except (UsageError, CheckpointError, BundleError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted before any image was predicted; nothing written", EXIT_INTERRUPTED)
    chunks = predict_all(
        inputs.items, models, threshold=threshold, batch_size=args.batch_size,
        cam_dir=args.cam, cam_layer=args.cam_layer, age_group=args.age_group,
        read_threads=args.read_threads,
    )  # fmt: skip
    start, records, interrupted = time.perf_counter(), [], False
    try:
        for chunk in chunks:
            records += chunk
    except KeyboardInterrupt:  # keep the chunks finished; the one in progress is lost
        interrupted = True
    finish(records, inputs, args, models.class_names, time.perf_counter() - start, interrupted)


if __name__ == "__main__":
    main()
