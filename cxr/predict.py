"""Predict new radiographs with the trained four-class and binary models.

    python -m cxr predict scans/ extra.png [--models DIR] [--threshold T] \
        --out predictions.csv [--force] [--cam plots/predict] [--batch-size 16] [--strict]

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
aspect ratio, tiny: see the limits below); what is odd goes in the `warning` column.

JPEG/PNG/TIFF files are turned upright by their EXIF orientation, as the split stage reads
them; of a multi-frame file (animated GIF, multi-page TIFF, multi-frame DICOM) only the first
frame is predicted, with a warning. --out replaces only an earlier output of predict (its
columns or records), anything else only with --force; the --out file, its temporary and the
overlays in --cam are never read as inputs.

Exit status: 0 all images predicted, 1 some failed (or, with --strict, some got a warning, or
--out could not be written), 2 bad usage, checkpoint, bundle, threshold or --out, 130
interrupted (Ctrl-C; the rows done so far are written to --out, nothing is left half-written).
"""

from __future__ import annotations

import argparse
import csv
import errno
import json
import logging
import math
import os
import secrets
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from cxr.atomic import atomic_open, is_temporary_of
from cxr.bundle import (
    SITE_NAME,
    Bundle,
    default_models_dir,
    load_bundle,
    sha256_of,
    site_threshold,
)
from cxr.cli import setup_logging
from cxr.dicom import DICOM_SUFFIXES, read_dicom_frames
from cxr.errors import BundleError
from cxr.images import ImageError, Preprocessing, decode_frames, preprocess_gray, to_grayscale
from cxr.infer import configure_cpu, predict_proba
from cxr.lungs import crop_inputs, implausible_lungs
from cxr.models import CheckpointError, CXRNet, load_checkpoint
from cxr.params import non_negative_int

log = logging.getLogger(__name__)

OUT_FORMATS = (".json", ".csv")
CAM_SUFFIX = "_cam.png"  # Grad-CAM overlays: <stem>_cam.png in --cam
EXIT_OK, EXIT_IMAGE_ERRORS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# A real radiograph is far smaller (a 4,300 x 3,500 px 16-bit DICOM is 30 MB uncompressed);
# 200 MB leaves room for uncompressed colour or multi-frame files while capping the memory and
# time one file can take. Larger files get an error row without being read.
MAX_FILE_BYTES = 200_000_000

# Sanity checks on what is classified. Across the 7,301 radiographs of the mirror the widest is
# 1.55:1 and the smallest short side 156 px; the flattest of the 518 sample images has a pixel
# std of 15.5 (at 32 and 112 px). The limits sit well outside that, to flag what is not a chest
# film rather than an unusual one.
# Std of the model-input pixels (0-255, after preprocessing: what the models see): below 5 gray
# levels a blank, constant or fully transparent image has no anatomy left to classify, yet the
# models still answer confidently.
MIN_PIXEL_STD = 5.0
# Long side / short side of the original: the squash-resize to a square would shrink one axis
# of a 3:1 image to a third, twice the distortion of the widest mirror image (real chest films
# are about 0.7-1.4); a strip, a screenshot or two films side by side lands beyond it.
MAX_ASPECT_RATIO = 3.0
# Short side of the original, px: below this, resizing up to the model input invents the
# detail the model reads (icons, thumbnails); the smallest mirror image is 156 px.
MIN_SIDE = 64

# Columns every output of predict has had, whatever the four-class model's class names: how an
# earlier output (which --out may replace without --force) is recognised.
OWN_COLUMNS = ("file", "status", "predicted", "binary_p_covid", "covid_positive", "warning",
               "message")  # fmt: skip


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
    # The lung segmenter (model, metadata), when there is one: it checks for a plausible pair of
    # lungs and, for models trained with `crop: lungs`, gives the crop.
    segmenter: tuple[Any, dict[str, Any]] | None = None


@dataclass(frozen=True)
class Input:
    """One file to predict, or a path that yielded none (`error` says why)."""

    path: Path
    error: str | None = None


@dataclass
class Inputs:
    """What the paths given expand to, and how many entries were skipped: hidden ones, and
    predict's own outputs (--out, its temporary, --cam overlays)."""

    items: list[Input] = field(default_factory=list)
    hidden: int = 0
    own: int = 0


@dataclass(frozen=True)
class Threshold:
    """The COVID-19 decision threshold on the binary model's p(covid), and where it came from:
    `argument` (--threshold), `site` (python -m cxr calibrate) or `bundle` (evaluate stage)."""

    value: float
    source: str


@dataclass(frozen=True)
class Resolved:
    """The checkpoints to load and the threshold to apply, each checked to belong together."""

    four_class: Path
    binary: Path
    segmenter: Path | None
    threshold: Threshold


@dataclass(frozen=True)
class Own:
    """predict's own outputs, never read back as inputs: a second run over a folder that holds
    them must not predict its own CSV or overlays."""

    out: Path | None = None
    cam: Path | None = None

    def owns(self, path: Path) -> bool:
        real = Path(os.path.realpath(path))
        if self.out is not None:
            out = Path(os.path.realpath(self.out))
            if real == out or is_temporary_of(real, out):
                return True
        # Overlays only (<stem>_cam.png): a --cam folder may hold the user's own images too.
        return (
            self.cam is not None
            and real.parent == Path(os.path.realpath(self.cam))
            and real.name.endswith(CAM_SUFFIX)
        )


# --- arguments, threshold, checkpoints --------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cxr predict", description=__doc__.split("\n")[0]
    )
    parser.add_argument("paths", nargs="+", type=Path, help="image/DICOM files or folders")
    add_model_options(parser)
    parser.add_argument(
        "--site", type=Path, default=None,
        help=f"site calibration (default: {SITE_NAME} in --models, when present)",
    )  # fmt: skip
    parser.add_argument(
        "--threshold", type=float, default=None,
        help="COVID-19 decision threshold instead of the site's or the bundle's (e.g. 0.5)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="predictions .json or .csv")
    parser.add_argument(
        "--force", action="store_true",
        help="let --out replace an existing file that is not an earlier output of predict",
    )  # fmt: skip
    parser.add_argument("--cam", type=Path, default=None, help="folder for Grad-CAM overlays")
    parser.add_argument(
        "--cam-layer", choices=["layer3", "layer4"], default="layer3",
        help="ResNet layer the overlays are computed at (the gradcam stage's default: layer3)",
    )  # fmt: skip
    parser.add_argument(
        "--strict", action="store_true",
        help="exit 1 when any image gets a sanity warning (near-constant, odd shape, tiny)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    return args


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Where the models come from, and how fast to run them: shared with calibrate, so both
    run the same models the same way."""
    parser.add_argument(
        "--models", type=Path, default=default_models_dir(),
        help="folder with bundle.json and the checkpoints it names (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--four-class", type=Path, default=None, help="instead of the bundle's")
    parser.add_argument(
        "--binary", type=Path, default=None,
        help="instead of the bundle's (whose threshold then does not apply: predict needs "
        "--threshold or a site calibration made for this checkpoint)",
    )  # fmt: skip
    parser.add_argument(
        "--segmenter", type=Path, default=None,
        help="lung segmenter instead of the bundle's: lung check, and the crop for crop: lungs",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--threads", type=non_negative_int, default=0, help="torch CPU threads (0 = one per core)"
    )


def check_out(path: Path, force: bool = False) -> None:
    """Refuse an --out that cannot be written, or that holds what predict did not write, before
    any image is read, so no work is lost and no one else's file is replaced."""
    if path.suffix.lower() not in OUT_FORMATS:
        raise UsageError(f"--out must end in {' or '.join(OUT_FORMATS)}, got {path}")
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; give a file, e.g. {path / 'predictions.csv'}")
    if path.exists() and not path.is_file():
        raise UsageError(f"--out {path} exists and is not a regular file; choose another name")
    if path.is_file() and not force and not written_by_predict(path):
        raise UsageError(
            f"--out {path} exists and is not an earlier output of predict (not its columns); "
            "refusing to replace it: choose another name, or pass --force"
        )
    check_writable_folder(path.parent, f"--out {path}")


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


def resolve(args: argparse.Namespace) -> Resolved:
    """Checkpoints from the bundle unless given, and the threshold that belongs to the binary
    one. The bundle is not needed when both classifiers and --threshold are given."""
    files, bundle = model_files(args, need_bundle=args.threshold is None)
    return Resolved(
        four_class=files["four_class"],
        binary=files["binary"],
        segmenter=files["segmenter"],
        threshold=choose_threshold(args, bundle, files["binary"]),
    )


def model_files(
    args: argparse.Namespace, need_bundle: bool
) -> tuple[dict[str, Path | None], Bundle | None]:
    """The checkpoint of each role: --binary/--four-class/--segmenter, else the bundle's (only
    the checkpoints taken from the bundle are hashed and verified)."""
    given = {"binary": args.binary, "four_class": args.four_class, "segmenter": args.segmenter}
    bundle = None
    if need_bundle or args.binary is None or args.four_class is None:
        bundle = load_bundle(args.models, tuple(role for role, p in given.items() if p is None))
    files = {role: path if path is not None or bundle is None else bundle.files[role]
             for role, path in given.items()}  # fmt: skip
    return files, bundle


def choose_threshold(args: argparse.Namespace, bundle: Bundle | None, binary: Path) -> Threshold:
    """--threshold; else a site calibration made for this binary checkpoint; else the bundle's,
    only for the checkpoint it was chosen for."""
    if args.threshold is not None:
        return Threshold(args.threshold, "argument")
    assert bundle is not None  # resolve loads it whenever no --threshold is given
    if args.binary is None:
        digest = bundle.sha256["binary"]  # verified by load_bundle
    elif args.binary.is_file():
        digest = sha256_of(args.binary)
    else:
        raise CheckpointError(f"{args.binary}: file not found")
    site = args.site or args.models / SITE_NAME
    if args.site is not None or site.exists():
        calibrated = site_threshold(site, binary, digest)
        log.info("COVID-19 threshold %.4f: the site's (%s)", calibrated.threshold, site)
        return Threshold(calibrated.threshold, "site")
    if digest != bundle.sha256["binary"]:
        raise UsageError(
            f"--binary {binary} (sha256 {digest[:12]}...) is not the binary model {bundle.path} "
            f"was written for (sha256 {str(bundle.sha256['binary'])[:12]}...), and its threshold "
            f"({bundle.threshold:.4f}, {bundle.threshold_source}) belongs to that model: pass "
            "--threshold, calibrate one for it (python -m cxr calibrate), or --models DIR with "
            "its own bundle"
        )
    log.info("COVID-19 threshold %.4f: the bundle's (%s, %s)", bundle.threshold,
             bundle.threshold_source, bundle.path)  # fmt: skip
    return Threshold(bundle.threshold, "bundle")


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


def load_segmenter_for(spec: Preprocessing, path: Path | None) -> tuple[Any, dict] | None:
    """The lung segmenter, required when the models crop to the lungs, else optional (without
    it the lung check is skipped, with a log line)."""
    from cxr.segmenter import load_segmenter  # torch model code only needed here

    if path is None or not path.exists():
        where = "none was given or bundled" if path is None else f"{path} does not exist"
        if spec.crop != "none":
            raise UsageError(
                f"these models crop to the lungs (crop: {spec.crop}) and need the lung segmenter, "
                f"but {where}: run `dvc repro segment` or pass --segmenter"
            )
        log.info("no lung segmenter (%s): the lung check is skipped", where)
        return None
    try:
        return load_segmenter(path)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from exc


def load_models(
    four_class_path: Path, binary_path: Path, segmenter_path: Path | None = None
) -> Models:
    """Load both checkpoints (and the lung segmenter) and check they agree on how images are
    prepared."""
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
        segmenter=load_segmenter_for(spec, segmenter_path),
    )


# --- inputs -----------------------------------------------------------------------------------


def stat_path(path: Path) -> tuple[os.stat_result | None, str | None]:
    """stat() following links, or why not: a dangling link or a loop is named as such."""
    try:
        return os.stat(path), None
    except FileNotFoundError:
        if not path.is_symlink():
            return None, "no such file or folder"
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return None, f"dangling symlink (its target {target} does not exist)"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, "symlink loop (following the links never ends); not followed"
        return None, f"cannot read ({exc.strerror or exc})"


def file_kind(mode: int) -> str:
    """A name for what a non-regular, non-folder stat mode is."""
    kinds = (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


def not_regular(mode: int) -> str:
    return f"not a regular file ({file_kind(mode)}); refused without reading it"


def walk(folder: Path, folder_stat: os.stat_result, own: Own) -> Inputs:
    """Every regular file under `folder`, and an error entry for each thing that cannot be one.

    Symlinked folders are followed, each folder searched once; a link back to a folder being
    searched (a loop) is reported instead of followed. Hidden entries and predict's own
    outputs are counted, not listed.
    """
    found = Inputs()
    searched: dict[tuple[int, int], Path] = {_key(folder_stat): folder}
    stack = [(folder, (_key(folder_stat),))]
    while stack:
        directory, ancestors = stack.pop()
        try:
            with os.scandir(directory) as scan:
                names = sorted(entry.name for entry in scan)
        except OSError as exc:
            found.items.append(Input(directory, f"cannot list folder ({exc.strerror or exc})"))
            continue
        for name in names:
            path = directory / name
            if own.owns(path):  # before the hidden check: the temporary of --out is hidden
                found.own += 1
                continue
            if name.startswith("."):
                found.hidden += 1
                continue
            st, problem = stat_path(path)
            if st is None:
                found.items.append(Input(path, problem))
            elif stat.S_ISDIR(st.st_mode):
                key = _key(st)
                if key in ancestors:
                    message = f"symlink loop (leads back to {searched[key]}); not followed"
                    found.items.append(Input(path, message))
                elif key not in searched:  # else: a second way into a folder already listed
                    searched[key] = path
                    stack.append((path, (*ancestors, key)))
            elif stat.S_ISREG(st.st_mode):
                found.items.append(Input(path))
            else:
                found.items.append(Input(path, not_regular(st.st_mode)))
    found.items.sort(key=lambda item: item.path)
    return found


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def expand(path: Path, own: Own) -> Inputs:
    """One command-line path: a folder walked, a file as it is, anything else an error entry."""
    if own.owns(path):  # even before it exists: the first run's --out
        return Inputs(own=1)
    st, problem = stat_path(path)
    if st is None:
        return Inputs([Input(path, problem)])
    if not stat.S_ISDIR(st.st_mode):
        return Inputs([Input(path)])  # devices and FIFOs are refused when read, with a row
    found = walk(path, st, own)
    if not found.items:
        skipped = f"; {found.hidden} hidden entries skipped" if found.hidden else ""
        found.items.append(Input(path, f"no files in folder (searched recursively{skipped})"))
    return found


def collect_inputs(paths: list[Path], own: Own | None = None) -> Inputs:
    """Files as given, folders expanded, predict's own outputs left out; each file once;
    missing or empty paths flagged."""
    inputs, own = Inputs(), own or Own()
    seen: set[str] = set()
    for path in paths:
        found = expand(path, own)
        inputs.hidden += found.hidden
        inputs.own += found.own
        for item in found.items:
            key = str(item.path) if item.error else os.path.realpath(item.path)
            if key not in seen:
                seen.add(key)
                inputs.items.append(item)
    if not any(item.error is None for item in inputs.items):
        problems = [f"{item.path}: {item.error}" for item in inputs.items]
        problems += ["only predict's own outputs (--out, --cam) were given"] if inputs.own else []
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise UsageError(f"no images to predict ({'; '.join(problems[:3])}{more})")
    return inputs


def read_capped(path: Path) -> bytes:
    """The file's bytes; devices and FIFOs refused unread, files over MAX_FILE_BYTES too.

    stat() first, so a device is never opened (opening some has effects, a FIFO blocks); the
    open is non-blocking and checked again, in case the path changed in between.
    """
    try:
        if not stat.S_ISREG(mode := os.stat(path).st_mode):
            raise ImageError(f"{path}: {not_regular(mode)}")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    with open(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{path}: {not_regular(st.st_mode)}")
        data = b"" if st.st_size > MAX_FILE_BYTES else fh.read(MAX_FILE_BYTES + 1)
    if st.st_size > MAX_FILE_BYTES or len(data) > MAX_FILE_BYTES:
        raise ImageError(
            f"{path}: file larger than {MAX_FILE_BYTES / 1e6:.0f} MB, refused "
            "(no radiograph is that large)"
        )
    return data


def read_gray(path: Path) -> tuple[np.ndarray, int]:
    """One file -> its first frame as a 2-D uint8 grayscale image at the original size (DICOM
    windowed, others upright by their EXIF orientation), and how many frames the file holds."""
    data = read_capped(path)
    if path.suffix.lower() in DICOM_SUFFIXES or data[128:132] == b"DICM":
        return read_dicom_frames(path)  # within the cap: read_capped just measured it
    image, frames = decode_frames(data, str(path))
    return to_grayscale(image), frames


def frame_warnings(frames: int) -> list[str]:
    """A radiograph is one picture; the other frames of an animation or a multi-page file are
    not looked at, and the user should know."""
    if frames <= 1:
        return []
    return [f"multi-frame file ({frames} frames): only the first frame was predicted"]


def sanity_warnings(original: np.ndarray, pixels: np.ndarray) -> list[str]:
    """What makes this image an unlikely chest radiograph, judged on the original and the
    model input; the models answer for anything, so this is the only hint that they guessed."""
    height, width = original.shape
    warnings = []
    spread = float(pixels.std(dtype=np.float64))
    if spread < MIN_PIXEL_STD:
        warnings.append(
            f"near-constant image (pixel std {spread:.1f} < {MIN_PIXEL_STD:g}): blank, "
            "transparent or not a radiograph"
        )
    ratio = max(height, width) / max(min(height, width), 1)
    if ratio > MAX_ASPECT_RATIO:
        warnings.append(
            f"extreme aspect ratio ({width}x{height} px, {ratio:.1f}:1 > "
            f"{MAX_ASPECT_RATIO:g}:1): not a single chest film"
        )
    if min(height, width) < MIN_SIDE:
        warnings.append(
            f"tiny image ({width}x{height} px, short side < {MIN_SIDE}): too little detail"
        )
    return warnings


def load_input(path: Path, spec: Preprocessing) -> tuple[np.ndarray, str]:
    """One file -> the model's uint8 input through the shared preprocessing, and its warnings.

    New images are harmonised like every training source but Kermany's, whose publisher had
    already squashed them to 224 px JPEG (see cxr.images.Preprocessing).
    """
    original, frames = read_gray(path)
    pixels = preprocess_gray(original, spec, already_harmonised=False)
    return pixels, "; ".join(frame_warnings(frames) + sanity_warnings(original, pixels))


# --- prediction -------------------------------------------------------------------------------


def printable(text: str) -> str:
    """`text` as valid UTF-8: bytes of a file name that are not UTF-8 become \\xNN escapes.

    Linux allows any bytes in a name; Python keeps the bad ones as lone surrogates, which no
    UTF-8 writer (CSV, stdout) accepts, so one odd name used to lose every result.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decodes to: escape it as it is
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def ok_record(
    path: Path,
    probs: np.ndarray,
    p_covid: float,
    threshold: Threshold,
    names: list[str],
    warning: str,
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
            "threshold", "threshold_source", "covid_positive", "cam", "warning",
            "message"]  # fmt: skip


def read_inputs(
    items: list[Input], spec: Preprocessing
) -> tuple[list[np.ndarray], list[int], dict[int, str], dict[int, str]]:
    """Preprocessed images, the positions in `items` they came from, and the warnings and
    errors by position."""
    images, where, warnings, errors = [], [], {}, {}
    for i, item in enumerate(items):
        if item.error is not None:
            errors[i] = f"{item.path}: {item.error}"
            continue
        try:
            pixels, warnings[i] = load_input(item.path, spec)
            images.append(pixels)
            where.append(i)
        except (ImageError, OSError, ValueError) as exc:  # PIL/NumPy on odd modes: still the file
            message = str(exc)
            errors[i] = message if message.startswith(str(item.path)) else f"{item.path}: {message}"
    return images, where, warnings, errors


@dataclass(frozen=True)
class Batch:
    """What the models see for the readable files of a chunk, and what became of each file."""

    images: np.ndarray  # N x S x S uint8: preprocessed, and cropped as the models were trained
    where: list[int]  # the position in the chunk of each image
    warnings: dict[int, str]  # by position, for the images
    errors: dict[int, str]  # by position, for the files that could not be read


def model_inputs(items: list[Input], models: Models) -> Batch:
    """Files -> the models' input: the one path predict and calibrate share (shared
    preprocessing, lung check and crop by the segmenter)."""
    size = models.spec.image_size
    images, where, warnings, errors = read_inputs(items, models.spec)
    batch = np.stack(images) if images else np.zeros((0, size, size), dtype=np.uint8)
    if models.segmenter is not None and len(batch):
        masks = segment(models.segmenter, batch)
        for row, i in enumerate(where):
            warnings[i] = "; ".join(w for w in (warnings[i], implausible_lungs(masks[row])) if w)
        batch = crop_inputs(batch, masks, models.spec.to_dict())
    return Batch(batch, where, warnings, errors)


def covid_probability(models: Models, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The binary model's p(covid), the score the threshold applies to."""
    return predict_proba(models.binary, images, batch_size=batch_size)[:, models.covid_index]


def predict_chunk(
    items: list[Input], models: Models, threshold: Threshold, batch_size: int
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Records for `items` in order (error rows for unreadable ones) and the images read."""
    names = models.class_names
    batch = model_inputs(items, models)
    four = predict_proba(models.four_class, batch.images, batch_size=batch_size)
    covid = covid_probability(models, batch.images, batch_size)
    records = {
        i: error_record(items[i].path, message, names) for i, message in batch.errors.items()
    }
    for row, i in enumerate(batch.where):
        records[i] = ok_record(
            items[i].path, four[row], float(covid[row]), threshold, names, batch.warnings[i]
        )
    return [records[i] for i in range(len(items))], batch.images


def segment(segmenter: tuple[Any, dict[str, Any]], images: np.ndarray) -> np.ndarray:
    """Boolean lung masks, post-processed as the segment stage does."""
    from cxr.segmenter import binarise, predict_prob

    model, meta = segmenter
    prob = predict_prob(model, images, size=int(meta["input_size"]))
    return binarise(
        prob, threshold=float(meta["threshold"]), min_fraction=float(meta["min_component"])
    )


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


def predict_all(
    inputs: list[Input], models: Models, *, threshold: Threshold, batch_size: int,
    cam_dir: Path | None, cam_layer: str = "layer3",
) -> Iterator[list[dict[str, Any]]]:  # fmt: skip
    """Records chunk by chunk of `batch_size` files, so memory stays flat for any number of
    files and an interruption keeps every chunk finished before it."""
    used: set[str] = set()
    for start in range(0, len(inputs), batch_size):
        chunk, images = predict_chunk(
            inputs[start : start + batch_size], models, threshold, batch_size
        )
        if cam_dir is not None:
            write_cams(chunk, images, models, cam_dir, batch_size, used, cam_layer)
        yield chunk


# --- output -----------------------------------------------------------------------------------


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


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def prepare(args: argparse.Namespace) -> tuple[Threshold, Models, Inputs]:
    """Everything checked before the first image is read: outputs, bundle, threshold, models,
    inputs."""
    if args.out is not None:
        check_out(args.out, args.force)
    if args.cam is not None:
        check_cam(args.cam)
    resolved = resolve(args)
    models = load_models(resolved.four_class, resolved.binary, resolved.segmenter)
    return resolved.threshold, models, collect_inputs(args.paths, Own(args.out, args.cam))


def exit_code(records: list[dict[str, Any]], strict: bool) -> int:
    if any(r["status"] != "ok" for r in records):
        return EXIT_IMAGE_ERRORS
    return EXIT_IMAGE_ERRORS if strict and any(r["warning"] for r in records) else EXIT_OK


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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    configure_cpu(args.threads)
    try:
        threshold, models, inputs = prepare(args)
    except (UsageError, CheckpointError, BundleError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted before any image was predicted; nothing written", EXIT_INTERRUPTED)
    chunks = predict_all(
        inputs.items, models, threshold=threshold, batch_size=args.batch_size,
        cam_dir=args.cam, cam_layer=args.cam_layer,
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
