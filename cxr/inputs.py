"""Input walking for predict, calibrate and validate: what the paths given expand to, and one
file's bytes (or an image the API is given: an array, a PIL image) read into a 2-D grey image.

Every file given, and every regular file under a folder given (searched recursively, symlinked
folders followed once), is an Input: a file to read, or a path with the reason it yields none.
Hidden entries and predict's own outputs are counted, not listed. Devices, FIFOs and files over
MAX_FILE_BYTES are refused without being read; symlink loops and dangling links are named.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from cxr.atomic import is_temporary_of
from cxr.dicom import DICOM_SUFFIXES, read_dicom_frames
from cxr.errors import InputError
from cxr.images import ImageError, decode_frames, to_grayscale, upright

# What the API takes as an image: an array, a PIL image or a file path.
ImageLike = Union[np.ndarray, Image.Image, str, os.PathLike]  # noqa: UP007 (a runtime alias)

CAM_SUFFIX = "_cam.png"  # Grad-CAM overlays: <stem>_cam.png in --cam


# A real radiograph is far smaller (a 4,300 x 3,500 px 16-bit DICOM is 30 MB uncompressed);
# 200 MB leaves room for uncompressed colour or multi-frame files while capping the memory and
# time one file can take. Larger files get an error row without being read.
MAX_FILE_BYTES = 200_000_000


class UsageError(ValueError):
    """Bad arguments, checkpoints or threshold: nothing can be predicted (exit status 2)."""


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


# --- an image given in memory (the API), read as a file of the same pixels is ---------------


def array_gray(array: np.ndarray, name: str) -> np.ndarray:
    """A 2-D uint8 grey image from an array, as a PNG/TIFF of the same pixels is read."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    colour = a.ndim == 3 and a.shape[2] in (3, 4)
    if not (a.ndim == 2 or colour) or 0 in a.shape:
        raise InputError(
            f"{name}: an array of shape {a.shape} is not an image: expected 2-D grey (H x W) or "
            "colour (H x W x 3 RGB, H x W x 4 RGBA); for several images pass a list"
        )
    if colour:
        if a.dtype != np.uint8:
            raise InputError(f"{name}: a colour array must be uint8 (0-255), got {a.dtype}")
        return to_grayscale(Image.fromarray(np.ascontiguousarray(a)))
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype.kind in "ui":
        lo, hi = int(a.min()), int(a.max())
        # The stretch of to_grayscale, through the mode a file of these values opens in.
        if lo >= 0 and hi <= 65535:
            return to_grayscale(Image.fromarray(a.astype(np.uint16)))
        if lo >= -(2**31) and hi < 2**31:
            return to_grayscale(Image.fromarray(a.astype(np.int32)))
        raise InputError(f"{name}: integer values {lo}..{hi} do not fit an image (32-bit)")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise InputError(f"{name}: the array holds NaN or infinite values")
        return to_grayscale(Image.fromarray(a.astype(np.float32)))
    raise InputError(f"{name}: an array of {a.dtype} is not an image (uint8, uint16, float)")


def as_gray(image: ImageLike, name: str) -> tuple[np.ndarray, list[str]]:
    """Any image the API takes -> its 2-D uint8 grey original and its notes (multi-frame).
    A path is read as predict reads it; errors reading it are ImageError/OSError."""
    if isinstance(image, str | os.PathLike):
        gray, frames = read_gray(Path(image))
        return gray, frame_warnings(frames)
    if isinstance(image, Image.Image):
        frames = int(getattr(image, "n_frames", 1))
        return to_grayscale(upright(image, name)), frame_warnings(frames)
    if isinstance(image, np.ndarray):
        return array_gray(image, name), []
    raise InputError(
        f"{name}: a {type(image).__name__} is not an image: pass a numpy array, a PIL image or "
        "a file path"
    )
