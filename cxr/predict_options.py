"""predict's command line, and the constants it shares with the API: importing this module
does not import torch, so `python -m cxr predict --server ...` (which only talks to a resident
`python -m cxr serve`) starts in a fraction of a second; without --server, cxr.predict runs the
models here."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from cxr.bundle import SITE_NAME, default_models_dir
from cxr.params import non_negative_int

DESCRIPTION = "Predict new radiographs with the trained four-class and binary models."

# The four-class model's viral vs bacterial split is validated on children only: the data hold
# 46 typed adult films in all splits, 27 in train (metrics/data.json; issue 18, point 5). A type
# called for an adult film, or a film of unknown age, is said to be unvalidated in its warning.
AGE_GROUPS = ("adult", "pediatric", "unknown")

# Threads reading the next chunk's files while the models run: predict's --read-threads default,
# and what calibrate and validate use (measured on 2 cores: docs/performance.md "predict's speed").
READ_THREADS = 2


def default_socket() -> Path:
    """Where `python -m cxr serve` listens and `predict --server` calls: one per user, in the
    user's runtime folder when there is one (private to the user), else the temp folder."""
    folder = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(folder) / f"cxr-serve-{os.getuid()}.sock"


def add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket", type=Path, default=default_socket(),
        help="the server's Unix socket (default: %(default)s)",
    )  # fmt: skip


# --- arguments, threshold, checkpoints --------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cxr predict", description=DESCRIPTION)
    parser.add_argument("paths", nargs="+", type=Path, help="image/DICOM files or folders")
    add_model_options(parser)
    add_threshold_options(
        parser,
        threshold_help="COVID-19 decision threshold instead of the site's or the bundle's "
        "(e.g. 0.5)",
    )
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
        help="exit 1 when any image gets a warning about the image (near-constant, odd shape, "
        "tiny, no lungs); the age-group caveat on a pneumonia type does not count",
    )  # fmt: skip
    parser.add_argument(
        "--read-threads", type=non_negative_int, default=READ_THREADS,
        help="threads reading the next files while the models run (0 = read in turn; "
        "default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--age-group", choices=AGE_GROUPS, default="unknown",
        help="the patients' age group: a viral/bacterial call for adult or unknown gets a "
        "warning (the type is validated on children only; default: %(default)s)",
    )  # fmt: skip
    add_server_options(parser)
    parser.add_argument(
        "--server", action="store_true",
        help="send the request to a resident `python -m cxr serve` (models already loaded: no "
        "start-up cost) instead of loading the models here",
    )  # fmt: skip
    args = parser.parse_args(argv)
    check_model_options(parser, args)
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


def add_threshold_options(parser: argparse.ArgumentParser, threshold_help: str) -> None:
    """--site and --threshold, shared with validate; `threshold_help` says what the command does
    with --threshold."""
    parser.add_argument(
        "--site", type=Path, default=None,
        help=f"site calibration (default: {SITE_NAME} in --models, when present)",
    )  # fmt: skip
    parser.add_argument("--threshold", type=float, default=None, help=threshold_help)


def check_model_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse does not check of add_model_options' and add_threshold_options' values."""
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    threshold = getattr(args, "threshold", None)  # calibrate has no --threshold
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        parser.error(f"--threshold must be in [0, 1], got {threshold}")


def main(argv: list[str] | None = None) -> None:
    """`python -m cxr predict`: here with --server (torch never imported), else cxr.predict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.server:
        from cxr.serve import ask

        sys.exit(ask(argv, args.socket))  # the server parses the same argv again
    from cxr.cli import interrupts_held

    with interrupts_held():  # torch's import: see interrupts_held
        from cxr.predict import run
    run(args)
