"""Inputs that are not a frontal chest radiograph, made from real ones: the test set of the
out-of-distribution gate (cxr/ood.py).

No public lateral film, CT slice or photograph sits in the mirror (sources.csv's `view` holds
PA, AP and AP Supine only), so each kind is built from a real film of the split, or drawn, and
then sent through the shared preprocessing (cxr.images.preprocess) as a file given to predict
would be: grey conversion, the harmonising JPEG round trip, tone equalisation, the squash to the
model's square. `identity` (the film itself, re-preprocessed) is the control: what the second
round trip alone does to the gate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from cxr.images import Preprocessing, preprocess

Builder = Callable[[np.ndarray, np.ndarray, np.random.Generator], Image.Image]


def _gray(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L")


def _texture(shape: tuple[int, int], rng: np.random.Generator, power: float = 2.0) -> np.ndarray:
    """Noise with a 1/f^(power/2) amplitude spectrum, scaled to 0..1: the statistics of natural
    images (power 2) rather than white noise."""
    h, w = shape
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=shape) + 1j * rng.normal(size=shape)) / radius ** (power / 2)
    field = np.real(np.fft.ifft2(spectrum))
    return (field - field.min()) / (np.ptp(field) or 1.0)


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """Boolean ellipse; centre and radii as fractions of the height / width."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    return ((y + 0.5) / h - cy) ** 2 / ry**2 + ((x + 0.5) / w - cx) ** 2 / rx**2 <= 1.0


def identity(film: np.ndarray, _other: np.ndarray, _rng: np.random.Generator) -> Image.Image:
    return _gray(film)


def rotated_90(film: np.ndarray, _other: np.ndarray, _rng: np.random.Generator) -> Image.Image:
    return _gray(np.rot90(film, 1))


def rotated_180(film: np.ndarray, _other: np.ndarray, _rng: np.random.Generator) -> Image.Image:
    return _gray(np.rot90(film, 2))


def upside_down(film: np.ndarray, _other: np.ndarray, _rng: np.random.Generator) -> Image.Image:
    """Flipped top to bottom (a film hung upside down; left and right stay)."""
    return _gray(film[::-1])


def inverted(film: np.ndarray, _other: np.ndarray, _rng: np.random.Generator) -> Image.Image:
    """Grey levels inverted (a MONOCHROME1 file read as MONOCHROME2: bone dark, lungs bright)."""
    return _gray(255 - np.asarray(film, dtype=np.uint8))


def one_lung(film: np.ndarray, _other: np.ndarray, _rng: np.random.Generator) -> Image.Image:
    """The image's left half (the patient's right lung); preprocessing squashes it square."""
    return _gray(film[:, : film.shape[1] // 2])


def side_by_side(film: np.ndarray, other: np.ndarray, _rng: np.random.Generator) -> Image.Image:
    """Two films next to each other in one picture (a comparison screenshot)."""
    return _gray(np.concatenate([film, other], axis=1))


def colour_photo(film: np.ndarray, _other: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A photograph-like colour picture: 1/f texture in three correlated channels under a few
    coloured blobs (objects) and a brightness gradient (light). Independent of the film."""
    size = max(film.shape) * 2
    shape = (size, size)
    base = _texture(shape, rng)
    rgb = np.stack([0.6 * base + 0.4 * _texture(shape, rng) for _ in range(3)], axis=-1)
    rgb *= rng.uniform(0.5, 1.0, size=3)  # a colour cast
    for _ in range(int(rng.integers(3, 7))):
        cy, cx, ry, rx = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), *rng.uniform(0.05, 0.3, 2)
        blob = _ellipse(shape, cy, cx, ry, rx)
        rgb[blob] = 0.5 * rgb[blob] + 0.5 * rng.uniform(0, 1, size=3)
    light = np.linspace(rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0), size)[:, None, None]
    image = np.clip(rgb * light, 0, 1)
    return Image.fromarray(np.round(image * 255).astype(np.uint8), mode="RGB")


def ct_slice(film: np.ndarray, _other: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """An axial CT-like slice: black air, an elliptic body of soft tissue wider than tall, a
    ring of bone (ribs), the spine behind, two dark lungs and the mediastinum between them."""
    size = max(film.shape) * 2
    shape = (size, size)
    wide = rng.uniform(0.38, 0.45)  # body half-width
    tall = wide * rng.uniform(0.6, 0.8)
    cy = rng.uniform(0.47, 0.53)
    out = np.zeros(shape)
    out[_ellipse(shape, cy, 0.5, tall, wide)] = 0.45
    ring = _ellipse(shape, cy, 0.5, tall * 0.93, wide * 0.93) & ~_ellipse(
        shape, cy, 0.5, tall * 0.86, wide * 0.86
    )
    y, x = np.mgrid[0:size, 0:size]
    ribs = np.sin(np.arctan2(y - cy * size, x - size / 2) * rng.integers(10, 16)) > 0.2
    out[ring & ribs] = 0.95
    for side in (-1, 1):
        lung = _ellipse(shape, cy - 0.02, 0.5 + side * wide * 0.45, tall * 0.7, wide * 0.36)
        out[lung] = 0.05
    out[_ellipse(shape, cy + tall * 0.72, 0.5, 0.05, 0.045)] = 1.0  # vertebral body
    out[_ellipse(shape, cy + 0.05, 0.5, tall * 0.35, wide * 0.16)] = 0.55  # heart
    out[int((cy + tall + 0.05) * size) : int((cy + tall + 0.07) * size), :] = 0.6  # the table
    out = ndimage.gaussian_filter(out, size / 300) + rng.normal(0, 0.03, shape)
    return _gray(np.round(np.clip(out, 0, 1) * 255))


def lateral_like(film: np.ndarray, _other: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A lateral-view-like film: one large lung field (both lungs superimposed) in the middle of
    a body taller than wide, the spine's bright column behind it, the heart's shadow in front
    and below, the diaphragm's dome at the bottom; the real film's fine texture on top."""
    size = film.shape[0]
    shape = (size, size)
    out = np.full(shape, 0.08)
    out[_ellipse(shape, 0.55, 0.5, 0.55, 0.36)] = 0.55  # the body in profile
    lung = _ellipse(shape, 0.45, rng.uniform(0.46, 0.52), 0.3, 0.24)
    out[lung] = 0.2
    spine_col = rng.uniform(0.7, 0.76)
    y, x = np.mgrid[0:size, 0:size] / size
    spine = (np.abs(x - spine_col) < 0.05) & (y > 0.15)
    out[spine] = 0.8 + 0.15 * (np.sin(y[spine] * 60) > 0)  # vertebrae
    out[_ellipse(shape, 0.62, 0.38, 0.15, 0.15) & lung] = 0.5  # heart in front, below
    out[(y > 0.72 - 0.12 * np.cos((x - 0.5) * 3)) & (out < 0.5)] = 0.6  # diaphragm's dome
    out = ndimage.gaussian_filter(out, size / 100) + rng.normal(0, 0.02, shape)
    detail = film.astype(np.float64) / 255.0 - ndimage.gaussian_filter(film / 255.0, 2.0)
    return _gray(np.round(np.clip(out + 0.5 * detail, 0, 1) * 255))


KINDS: dict[str, Builder] = {
    "identity": identity,  # the control: a real film through the round trip again
    "rotated_90": rotated_90,
    "rotated_180": rotated_180,
    "upside_down": upside_down,
    "inverted": inverted,
    "one_lung": one_lung,
    "side_by_side": side_by_side,
    "colour_photo": colour_photo,
    "ct_slice": ct_slice,
    "lateral_like": lateral_like,
}
CONTROL = "identity"


def build_probes(films: np.ndarray, kind: str, spec: Preprocessing, seed: int = 0) -> np.ndarray:
    """uint8 N x S x S model inputs (before any lung crop) of `kind`, one from each film; the
    second film of `side_by_side` is the next one in order."""
    if kind not in KINDS:
        raise ValueError(f"unknown probe kind {kind!r}; kinds: {list(KINDS)}")
    rng = np.random.default_rng(seed)
    films = np.asarray(films)
    n, size = len(films), spec.image_size
    out = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        out[i] = preprocess(KINDS[kind](films[i], films[(i + 1) % n], rng), spec)
    return out
