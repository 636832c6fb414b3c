"""THE one preprocessing definition: decode, grayscale, harmonise, tone-normalise, resize.

Every stage that turns a radiograph into model input (split, gradcam, predict) goes through
`preprocess`, so the training, evaluation and inference images are made the same way.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# A 30k x 30k image is ~900 MP; real radiographs are < 50 MP. Refuse larger ones outright
# instead of letting PIL merely warn (decompression-bomb protection).
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageError(ValueError):
    """An image that cannot be decoded or converted; the message names the file."""


@dataclass(frozen=True)
class Preprocessing:
    """How a raw radiograph becomes a square uint8 grayscale array.

    The Kermany images (every pediatric image, i.e. every non-COVID class but a few) were
    squashed to 224x224 and saved as JPEG q75 by their publisher. If only the other images kept
    their native size and compression, resolution and JPEG artefacts would tell a model the
    source, and the source tells it the class. So `harmonise` sends every image that has not
    been through that round trip through the same one.

    `intensity` removes a second source fingerprint, the tone curve: one redistributor of the
    RSNA adult normals re-windowed them (darker lungs, more contrast) while the NIH images of
    the same hospital pool kept theirs, so brightness alone told "rsna normal" from "NIH". With
    `equalize` every image's grey levels are spread evenly over 0..255 (histogram
    equalisation, PIL's ImageOps.equalize), whatever window its source chose. The default here
    stays `none` so that checkpoints written before the field existed keep their meaning;
    params.yaml sets the pipeline's choice.
    """

    image_size: int = 112
    harmonise: bool = True
    harmonise_size: int = 224
    jpeg_quality: int = 75
    intensity: str = "none"  # none | equalize
    # none | lungs | mask: crop the preprocessed image to its predicted lungs, or blank it
    # outside them (cxr.lungs.crop_inputs; the masks come from the segment stage, or from the
    # segmenter in `predict`).
    crop: str = "none"
    crop_margin: float = 0.1  # of the lungs' box height/width, on each side

    def to_dict(self) -> dict:
        return asdict(self)


def decode(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decode image bytes by content (some `.jpg` files are PNG), upright by their EXIF
    orientation; raise ImageError if unreadable. Of a multi-frame file, the first frame."""
    return decode_frames(data, name)[0]


def decode_frames(data: bytes, name: str = "<bytes>") -> tuple[Image.Image, int]:
    """`decode`, and the number of frames the file holds (an animated GIF, a multi-page TIFF),
    so that a caller can say that only the first was used."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()  # force a full decode so truncated files fail here, not later
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a readable image (unknown or unsupported format)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: not a readable image ({exc})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"{name}: image too large, refused as a possible decompression bomb"
        ) from exc
    return upright(img, name), int(getattr(img, "n_frames", 1))


# EXIF Orientation (tag 274): 1 is upright as stored; 2-8 are mirrored and/or rotated.
ORIENTATION_TAG = 0x0112


def upright(img: Image.Image, name: str = "<image>") -> Image.Image:
    """The image as a viewer shows it: rotated/mirrored by its EXIF orientation (phones and
    some scanners store a film sideways and set the tag instead). No mirror image carries a
    tag other than 1, so the training arrays are the same with or without this step."""
    try:
        orientation = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception as exc:  # PIL raises assorted types on malformed EXIF; pixels are fine
        log.warning("%s: unreadable EXIF (%s); orientation taken as stored", name, exc)
        return img
    if orientation not in range(2, 9):
        return img
    return ImageOps.exif_transpose(img)


def load_image(path: str | Path) -> Image.Image:
    """Read and decode an image file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    return decode(data, str(path))


def to_grayscale(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> 2-D uint8 array.

    16-bit and 32-bit images are stretched from their own min..max: their bit depth (12, 14, 16)
    varies by scanner, so a fixed divisor would make some images nearly black. Transparent
    pixels are composited onto black, the background of a radiograph.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return np.round(scaled).astype(np.uint8)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    gray = img.convert("L")
    return np.asarray(gray, dtype=np.uint8)


def jpeg_round_trip(gray: np.ndarray, quality: int) -> np.ndarray:
    """Save a uint8 grayscale image as JPEG at `quality` and read it back."""
    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("L"), dtype=np.uint8)


def harmonise(gray: np.ndarray, size: int = 224, quality: int = 75) -> np.ndarray:
    """Squash-resize to size x size and round-trip through JPEG at `quality`, as Kermany's were."""
    img = Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BILINEAR)
    return jpeg_round_trip(np.asarray(img), quality)


INTENSITY = ("none", "equalize")


def normalise_intensity(gray: np.ndarray, method: str) -> np.ndarray:
    """Apply the tone normalisation `method` (one of INTENSITY) to a 2-D uint8 array."""
    if method == "none":
        return gray
    if method == "equalize":
        return np.asarray(ImageOps.equalize(Image.fromarray(gray, mode="L")), dtype=np.uint8)
    raise ValueError(f"unknown intensity normalisation {method!r}; choose one of {INTENSITY}")


def resize(gray: np.ndarray, size: int) -> np.ndarray:
    """Squash-resize to the model's square input (antialiased, so downscaling does not alias)."""
    if gray.shape == (size, size):
        return gray
    img = Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def preprocess(
    img: Image.Image, spec: Preprocessing, already_harmonised: bool = False
) -> np.ndarray:
    """Decoded image -> image_size x image_size uint8 array: the model's input contract."""
    return preprocess_gray(to_grayscale(img), spec, already_harmonised)


def preprocess_gray(
    gray: np.ndarray, spec: Preprocessing, already_harmonised: bool = False
) -> np.ndarray:
    """2-D uint8 grayscale array (e.g. a windowed DICOM) -> the model's input array."""
    if spec.harmonise and not already_harmonised:
        gray = harmonise(gray, spec.harmonise_size, spec.jpeg_quality)
    # After the harmonising round trip, so every source reaches it with the same history.
    gray = normalise_intensity(gray, spec.intensity)
    return resize(gray, spec.image_size)


def preprocess_file(
    path: str | Path, spec: Preprocessing, already_harmonised: bool = False
) -> np.ndarray:
    """Read, decode and preprocess one file."""
    return preprocess(load_image(path), spec, already_harmonised)
