"""The Python API, and the one model path that predict, validate and calibrate take too.

(Just over 400 lines: the model path is one piece, so that predict, validate, calibrate and a
notebook cannot drift apart; file walking and output writing live in inputs.py and outputs.py.)

    from cxr import Predictor

    predictor = Predictor.load("models/")           # bundle: checkpoints, segmenter, threshold
    table = predictor.predict([array, pil_image, "film.dcm"])  # a pandas DataFrame
    heat = predictor.explain(array)                  # Grad-CAM of the COVID-19 class, in [0, 1]

An image is a numpy array (2-D grey: uint8, uint16, any integer or float; or colour H x W x 3
RGB / x 4 RGBA uint8), a PIL image or a file path. An array or PIL image is read as a file
holding the same pixels is: colour to grey as PIL does, 16-bit and float stretched from their
own min..max (cxr.images.to_grayscale), so predicting an array gives the probabilities predict
gives for the same pixels saved as PNG. Then every image takes the same steps as every file
predict reads: the shared preprocessing (the spec read from the checkpoints, harmonised like
the training images), the sanity checks, the lung check and crop by the segmenter, both
classifiers, and the warnings, assembled in one place (`image_warnings`).

An array of the wrong shape or type raises InputError (the caller's mistake); a file that
cannot be read gets an error row, as in predict's CSV.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from cxr.ensemble import Ensemble
from cxr.errors import InputError
from cxr.images import ImageError, Preprocessing, preprocess_gray
from cxr.infer import predict_proba
from cxr.inputs import ImageLike, Input, UsageError, as_gray, frame_warnings, read_gray
from cxr.loading import Given, Models, Threshold, load_models, resolve
from cxr.lungs import crop_inputs, implausible_lungs
from cxr.outputs import columns, error_record, ok_record
from cxr.predict_options import AGE_GROUPS

if TYPE_CHECKING:
    import pandas as pd

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

# AGE_GROUPS (cxr.predict_options): a viral/bacterial call on an adult or unknown-age film is
# said to be unvalidated in its warning.
PNEUMONIA_TYPES = ("viral", "bacterial")
ADULT_TYPE_WARNING = "pneumonia type (viral/bacterial) validated on children only"
UNKNOWN_AGE_TYPE_WARNING = (
    "age group unknown: pneumonia type (viral/bacterial) validated on children only"
)
# The out-of-distribution gate's warnings start with this (cxr.ood.NOT_FRONTAL, kept in step
# by a test): validate counts the films it flagged by it.
NOT_FRONTAL = "not a frontal chest radiograph"

# The class explain() maps: COVID-19, as the gradcam stage's case maps do.
EXPLAINED = "covid"
# Caveats on reading a call, not findings about the image: --strict does not fail on them.
CAVEATS = (ADULT_TYPE_WARNING, UNKNOWN_AGE_TYPE_WARNING)


# --- one image, as predict reads a file -------------------------------------------------------


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


def model_pixels(
    original: np.ndarray, notes: list[str], spec: Preprocessing
) -> tuple[np.ndarray, list[str]]:
    """A grey original -> the model's uint8 input through the shared preprocessing, and its
    warnings so far (`notes`, then the sanity checks).

    New images are harmonised like every training source but Kermany's, whose publisher had
    already squashed them to 224 px JPEG (see cxr.images.Preprocessing).
    """
    pixels = preprocess_gray(original, spec, already_harmonised=False)
    return pixels, [*notes, *sanity_warnings(original, pixels)]


# --- the model path ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """Model inputs of a batch and what was found on the way."""

    images: np.ndarray  # N x S x S uint8: preprocessed, and cropped as the models were trained
    warnings: list[list[str]]  # per image: notes, sanity checks, lung check
    masks: np.ndarray | None  # the predicted lungs (before the crop), when there is a segmenter


def segment(segmenter: tuple[Any, dict[str, Any]], images: np.ndarray) -> np.ndarray:
    """Boolean lung masks, post-processed as the segment stage does."""
    from cxr.segmenter import binarise, predict_prob

    model, meta = segmenter
    prob = predict_prob(model, images, size=int(meta["input_size"]))
    return binarise(
        prob, threshold=float(meta["threshold"]), min_fraction=float(meta["min_component"])
    )


def with_lungs(models: Models, pixels: list[np.ndarray], warnings: list[list[str]]) -> Prepared:
    """Preprocessed images -> the models' input: the lung check and, for `crop: lungs`, the
    crop, both by the segmenter."""
    size = models.spec.image_size
    batch = np.stack(pixels) if pixels else np.zeros((0, size, size), dtype=np.uint8)
    warnings = [list(w) for w in warnings]
    masks = None
    if models.segmenter is not None and len(batch):
        masks = segment(models.segmenter, batch)
        for row, mask in enumerate(masks):
            warnings[row] += [w for w in (implausible_lungs(mask),) if w]
        batch = crop_inputs(batch, masks, models.spec.to_dict())
    return Prepared(batch, warnings, masks)


def covid_probability(models: Models, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The binary model's p(covid), the score the threshold applies to."""
    return predict_proba(models.binary, images, batch_size=batch_size)[:, models.covid_index]


def covid_and_gate(
    models: Models, prepared: Prepared, batch_size: int
) -> tuple[np.ndarray, list[list[str]]]:
    """p(covid) and, per image, the out-of-distribution gate's reasons (cxr.ood): the features
    come from the same forward pass as the probabilities (a hook), the lung shape from the
    masks the lung check made. No gate: no reasons."""
    n = len(prepared.images)
    if models.ood is None:
        return covid_probability(models, prepared.images, batch_size), [[] for _ in range(n)]
    from cxr.ood import captured_features, gate_batch, penultimate_features

    if isinstance(models.binary, Ensemble):  # the gate knows its first member's features only
        covid = covid_probability(models, prepared.images, batch_size)
        first = models.binary.members[0]
        features = penultimate_features(first, prepared.images, batch_size) if n else None
    else:
        with captured_features(models.binary) as found:
            covid = covid_probability(models, prepared.images, batch_size)
        features = np.concatenate([f.numpy() for f in found]).astype(np.float64) if n else None
    reasons = gate_batch(models.ood, features, prepared.masks)
    return covid, [[as_not_frontal(r) for r in rows] for rows in reasons]


def as_not_frontal(reason: str) -> str:
    """Every gate reason says what it means for the film (the lung rules say only what they
    measured), so a reader, --strict and validate's count all see one kind of warning."""
    return reason if reason.startswith(NOT_FRONTAL) else f"{NOT_FRONTAL}: {reason}"


def check_age_group(age_group: str) -> str:
    if age_group not in AGE_GROUPS:
        raise InputError(f"age_group {age_group!r} is not one of {', '.join(AGE_GROUPS)}")
    return age_group


def age_warning(call: str, age_group: str) -> str:
    """The caveat on a viral/bacterial call for a film not known to be a child's ("" if none)."""
    if call not in PNEUMONIA_TYPES or age_group == "pediatric":
        return ""
    return ADULT_TYPE_WARNING if age_group == "adult" else UNKNOWN_AGE_TYPE_WARNING


def image_warnings(found: list[str], call: str | None = None, age_group: str = "unknown") -> str:
    """THE place where an image's warnings are put together for its row: what reading,
    preprocessing and the lung check found, then the caveat on the four-class call for its
    age group. Checks added later (an out-of-distribution gate) add their findings here, so
    every way in (CLI, API, validate) reports them alike."""
    caveat = age_warning(call, age_group) if call is not None else ""
    return "; ".join(w for w in (*found, caveat) if w)


def image_problems(warning: str) -> list[str]:
    """The warnings of a row that are about the image, without the caveats on its call."""
    return [w for w in warning.split("; ") if w and w not in CAVEATS]


def score(
    models: Models, threshold: Threshold, prepared: Prepared, files: Sequence[str | Path],
    batch_size: int, age_groups: Sequence[str],
) -> list[dict[str, Any]]:  # fmt: skip
    """One ok record per prepared image: both classifiers, the threshold, the warnings."""
    names = models.class_names
    four = predict_proba(models.four_class, prepared.images, batch_size=batch_size)
    covid, gate = covid_and_gate(models, prepared, batch_size)
    records = []
    for row, (file, age) in enumerate(zip(files, age_groups, strict=True)):
        call = names[int(np.argmax(four[row]))]
        warning = image_warnings(prepared.warnings[row] + gate[row], call, age)
        records.append(
            ok_record(file, four[row], float(covid[row]), threshold, names, warning, age)
        )
    return records


# --- files: predict's, calibrate's and validate's way in ---------------------------------------


@dataclass(frozen=True)
class Batch:
    """What the models see for the readable files of a chunk, and what became of each file."""

    images: np.ndarray  # N x S x S uint8: preprocessed, and cropped as the models were trained
    where: list[int]  # the position in the chunk of each image
    found: dict[int, list[str]]  # by position, for the images: their warnings so far
    errors: dict[int, str]  # by position, for the files that could not be read
    masks: np.ndarray | None = None  # the predicted lungs of the images, when segmented

    @property
    def warnings(self) -> dict[int, str]:
        return {i: image_warnings(w) for i, w in self.found.items()}


@dataclass(frozen=True)
class Decoded:
    """A chunk's files read and preprocessed, before the models: what `read_inputs` returns."""

    pixels: list[np.ndarray]  # the model input of each readable file, in order
    where: list[int]  # the position in the chunk of each of them
    found: dict[int, list[str]]  # by position, for the readable files: their warnings so far
    errors: dict[int, str]  # by position, for the files that could not be read


def read_one(item: Input, spec: Preprocessing) -> tuple[np.ndarray | None, list[str] | str]:
    """One file decoded (cxr.inputs.read_gray) and preprocessed: (pixels, warnings), or
    (None, the error message naming the file)."""
    if item.error is not None:
        return None, f"{item.path}: {item.error}"
    try:
        original, frames = read_gray(item.path)
        return model_pixels(original, frame_warnings(frames), spec)
    except (ImageError, OSError, ValueError) as exc:  # PIL/NumPy on odd modes: still the file
        message = str(exc)
        return None, message if message.startswith(str(item.path)) else f"{item.path}: {message}"


def collect(done: list[tuple[np.ndarray | None, list[str] | str]]) -> Decoded:
    """read_one's results for a chunk, in order -> Decoded."""
    decoded = Decoded([], [], {}, {})
    for i, (pixels, found) in enumerate(done):
        if pixels is None:
            decoded.errors[i] = str(found)
        else:
            decoded.pixels.append(pixels)
            decoded.where.append(i)
            decoded.found[i] = list(found)
    return decoded


def read_inputs(items: list[Input], spec: Preprocessing) -> Decoded:
    """Each file of a chunk read (read_one), one after another."""
    return collect([read_one(item, spec) for item in items])


def read_ahead(
    items: list[Input], spec: Preprocessing, batch_size: int, workers: int
) -> Iterator[tuple[list[Input], Decoded]]:
    """`items` chunk by chunk of `batch_size` with their files read, the next chunk's files
    read by `workers` threads while the caller runs the models on this one (PIL and NumPy
    release the GIL while decoding and resizing). Decoding a large PNG costs about as much as
    the models (docs/performance.md), so the overlap is most of predict's speed on big files.
    At most two chunks are held at a time. workers=0: read in the caller's thread."""
    chunks = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    if workers < 1:
        yield from ((chunk, read_inputs(chunk, spec)) for chunk in chunks)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cxr-read")

    def submit(chunk: list[Input]) -> list[Future]:
        return [pool.submit(read_one, item, spec) for item in chunk]

    # cxr.images.decode_frames turns PIL's DecompressionBombWarning into an error inside
    # warnings.catch_warnings, which swaps the process-wide filter list and is not thread-safe:
    # two threads interleaving could each restore the other's list and decode a bomb with the
    # rule missing. With the same rule already first in the list, every save and restore sees
    # the same filters. The pool is drained before the rule is lifted.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            ahead = submit(chunks[0]) if chunks else []
            for k, chunk in enumerate(chunks):
                done = [future.result() for future in ahead]
                ahead = submit(chunks[k + 1]) if k + 1 < len(chunks) else []
                yield chunk, collect(done)
        finally:  # Ctrl-C or an error: nothing more is read; files being read finish
            pool.shutdown(wait=True, cancel_futures=True)


def model_inputs(items: list[Input], models: Models, decoded: Decoded | None = None) -> Batch:
    """Files -> the models' input: decoding (or `decoded`, read ahead by read_ahead), then the
    API's own path (shared preprocessing, lung check and crop by the segmenter)."""
    decoded = read_inputs(items, models.spec) if decoded is None else decoded
    prepared = with_lungs(models, decoded.pixels, [decoded.found[i] for i in decoded.where])
    found_by_position = dict(zip(decoded.where, prepared.warnings, strict=True))
    return Batch(prepared.images, decoded.where, found_by_position, decoded.errors, prepared.masks)


def predict_chunk(
    items: list[Input], models: Models, threshold: Threshold, batch_size: int,
    age_group: str | Sequence[str] = "unknown", decoded: Decoded | None = None,
) -> tuple[list[dict[str, Any]], np.ndarray]:  # fmt: skip
    """Records for `items` in order (error rows for unreadable ones) and the images read;
    `age_group` for all of them, or one per item; `decoded`: the files already read."""
    ages = [age_group] * len(items) if isinstance(age_group, str) else list(age_group)
    ages = [check_age_group(a) for a in ages]
    batch = model_inputs(items, models, decoded)
    prepared = Prepared(batch.images, [batch.found[i] for i in batch.where], batch.masks)
    done = score(models, threshold, prepared, [items[i].path for i in batch.where], batch_size,
                 [ages[i] for i in batch.where])  # fmt: skip
    records = {
        i: error_record(items[i].path, message, models.class_names)
        for i, message in batch.errors.items()
    }
    records.update(zip(batch.where, done, strict=True))
    return [records[i] for i in range(len(items))], batch.images


# --- the API ----------------------------------------------------------------------------------


class Predictor:
    """Both classifiers, the segmenter and the COVID-19 threshold, for use from Python."""

    def __init__(self, models: Models, threshold: Threshold, *, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        self.models, self.threshold, self.batch_size = models, threshold, batch_size

    @classmethod
    def load(
        cls, models: str | os.PathLike = "models", *, threshold: float | None = None,
        four_class: str | os.PathLike | None = None, binary: str | os.PathLike | None = None,
        segmenter: str | os.PathLike | None = None, site: str | os.PathLike | None = None,
        batch_size: int = 16,
    ) -> Predictor:  # fmt: skip
        """The models of the bundle in `models` (bundle.json, written by evaluate), with the
        threshold predict would use: `threshold`, else the site's (site.json there, or
        `site`, when made for this binary model), else the bundle's. Single checkpoints can be
        given instead, as with predict's --four-class/--binary/--segmenter."""
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise UsageError(f"threshold must be in [0, 1], got {threshold}")
        paths = [None if p is None else Path(p) for p in (four_class, binary, segmenter, site)]
        resolved = resolve(Given(Path(models), *paths, threshold=threshold))
        loaded = load_models(resolved.four_class, resolved.binary, resolved.segmenter)
        return cls(loaded, resolved.threshold, batch_size=batch_size)

    @property
    def class_names(self) -> list[str]:
        return list(self.models.class_names)

    def _prepare(
        self, images: Sequence[ImageLike], labels: Sequence[str]
    ) -> tuple[list[Any], dict[int, str]]:
        """(pixels, warnings) per readable image, or its error by position."""
        done: list[Any] = []
        errors: dict[int, str] = {}
        for i, (image, name) in enumerate(zip(images, labels, strict=True)):
            try:
                done.append(model_pixels(*as_gray(image, name), self.models.spec))
            except (ImageError, OSError, ValueError) as exc:  # a file: an error row, as predict's
                if not isinstance(image, str | os.PathLike):
                    raise
                message = str(exc)
                errors[i] = message if message.startswith(name) else f"{name}: {message}"
                done.append(None)
        return done, errors

    def predict(
        self, images: ImageLike | Sequence[ImageLike], *, names: Sequence[str] | None = None,
        age_group: str | Sequence[str] = "unknown",
    ) -> pd.DataFrame:  # fmt: skip
        """One row per image, with predict's CSV columns (`file`: the path, `names[i]`, or
        "image i"), in batches of `batch_size` as predict runs them. `age_group` (adult,
        pediatric or unknown; one for all, or one per image): a viral/bacterial call on a
        film not known to be a child's gets a warning (the type is validated on children)."""
        import pandas as pd

        images = list(images) if isinstance(images, list | tuple) else [images]
        if names is not None and len(names) != len(images):
            raise InputError(f"{len(names)} names for {len(images)} images")
        ages = [age_group] * len(images) if isinstance(age_group, str) else list(age_group)
        if len(ages) != len(images):
            raise InputError(f"{len(ages)} age groups for {len(images)} images")
        ages = [check_age_group(a) for a in ages]
        labels = [
            names[i] if names is not None
            else str(im) if isinstance(im, str | os.PathLike) else f"image {i}"
            for i, im in enumerate(images)
        ]  # fmt: skip
        records: list[dict[str, Any]] = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            records += self._predict_batch(images[start:stop], labels[start:stop], ages[start:stop])
        return pd.DataFrame.from_records(records, columns=columns(self.class_names))

    def _predict_batch(
        self, images: list[ImageLike], labels: list[str], ages: list[str]
    ) -> list[dict[str, Any]]:
        done, errors = self._prepare(images, labels)
        ok = [i for i in range(len(images)) if i not in errors]
        prepared = with_lungs(self.models, [done[i][0] for i in ok], [done[i][1] for i in ok])
        scored = score(self.models, self.threshold, prepared, [labels[i] for i in ok],
                       self.batch_size, [ages[i] for i in ok])  # fmt: skip
        records = {i: error_record(labels[i], m, self.class_names) for i, m in errors.items()}
        records.update(zip(ok, scored, strict=True))
        return [records[i] for i in range(len(images))]

    def explain(self, image: ImageLike, *, layer: str = "layer3") -> np.ndarray:
        """Grad-CAM of the four-class model's COVID-19 class for one image: an S x S float32
        map in [0, 1] over the model's input (S = the checkpoints' image_size; the lung crop,
        for models trained on it), through cxr.cam.compute_cams as the gradcam stage and
        predict --cam compute it. Min-max scaled: it shows where, not how much."""
        from cxr.cam import compute_cams  # matplotlib & co., only needed here

        if EXPLAINED not in self.models.class_names:
            raise InputError(f"explain needs a {EXPLAINED!r} class; the four-class model has "
                             f"{self.models.class_names}")  # fmt: skip
        pixels, found = model_pixels(*as_gray(image, "image"), self.models.spec)
        prepared = with_lungs(self.models, [pixels], [found])
        target = self.models.class_names.index(EXPLAINED)
        maps = compute_cams(self.models.four_class, prepared.images, [target], batch_size=1,
                            layer=layer)  # fmt: skip
        return maps[0]
