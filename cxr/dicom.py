"""DICOM radiographs -> the uint8 grayscale array `cxr.images.preprocess_gray` takes.

Rescale (Modality LUT), then the VOI LUT or window the file asks for, then MONOCHROME1 inverted
so bone is bright in every image, as in the PNG/JPEG radiographs the models were trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxr.images import MAX_PIXELS, ImageError

if TYPE_CHECKING:  # pydicom itself is imported when a DICOM file is read: a 0.15 s import
    from pydicom.dataset import Dataset  # that a folder of PNGs and JPEGs never needs

DICOM_SUFFIXES = (".dcm", ".dicom")


def has_dicom_magic(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 preamble ("DICM" at byte 128), as
    pydicom.misc.is_dicom checks it; False for unreadable files too."""
    import pydicom.misc

    try:
        return pydicom.misc.is_dicom(path)
    except OSError:
        return False


def is_dicom(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES or has_dicom_magic(path)


def read_dicom(path: str | Path) -> np.ndarray:
    """Read a DICOM file as a 2-D uint8 display image (255 = bright); ImageError if unusable."""
    return read_dicom_frames(path)[0]


def read_dicom_frames(path: str | Path) -> tuple[np.ndarray, int]:
    """`read_dicom` (the first frame), and the number of frames the file holds."""
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(path, force=not has_dicom_magic(path))
        _check_size(ds, path)
        pixels = ds.pixel_array
    except ImageError:
        raise
    except Exception as exc:  # pydicom raises many types for malformed or unsupported files
        raise ImageError(
            f"{path}: not a readable DICOM image ({type(exc).__name__}: {exc})"
        ) from exc
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ImageError(
            f"{path}: colour DICOM ({ds.get('PhotometricInterpretation')}) not supported"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if pixels.ndim == 3:  # multi-frame: a radiograph has one; take the first
        pixels = pixels[0]
    try:
        return to_display(pixels, ds), frames
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise ImageError(f"{path}: cannot apply the DICOM LUTs ({exc})") from exc


def _check_size(ds: Dataset, path: Path) -> None:
    """Refuse huge images before decoding their (possibly compressed) pixel data."""
    pixels = int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * int(ds.get("NumberOfFrames", 1))
    if pixels > MAX_PIXELS:
        raise ImageError(f"{path}: image too large, refused as a possible decompression bomb")


def to_display(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> uint8 0..255 through Modality LUT, VOI LUT/window and MONOCHROME1."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(pixels, ds)
    if ds.get("VOILUTSequence"):  # a LUT is indexed by integer values
        values = np.rint(values).astype(np.int64)
    windowed = apply_voi_lut(values, ds).astype(np.float64)
    lo, hi = _voi_output_range(ds, windowed)
    scaled = np.clip((windowed - lo) / (hi - lo), 0.0, 1.0) if hi > lo else windowed * 0.0
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # low values are bright
        scaled = 1.0 - scaled
    return np.round(scaled * 255.0).astype(np.uint8)


def _voi_output_range(ds: Dataset, windowed: np.ndarray) -> tuple[float, float]:
    """The range the VOI transform maps onto; the image's own min..max when there is none.

    Pushing every input a LUT covers, or two extreme values through a window (which sends
    below-window values to its lowest output, above-window ones to its highest), yields the
    output range. Min-max on a windowed image would instead stretch an image that does not
    fill its window.
    """
    from pydicom.pixels import apply_voi_lut

    if ds.get("VOILUTSequence"):
        entries, first, _ = ds.VOILUTSequence[0].LUTDescriptor
        outputs = apply_voi_lut(np.arange(first, first + (entries or 2**16)), ds)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        with np.errstate(over="ignore"):  # SIGMOID's exp() overflows to a clean 0 or inf
            outputs = apply_voi_lut(np.array([-1.0e30, 1.0e30]), ds)
    else:
        outputs = windowed
    return float(np.min(outputs)), float(np.max(outputs))
