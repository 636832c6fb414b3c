"""The model bundle: which checkpoints belong together, and the COVID-19 threshold chosen for them.

`bundle.json`, written by the evaluate stage beside the checkpoints (models/), names each
checkpoint by file name and sha256 and carries the binary model's threshold with where it was
chosen. predict and calibrate take models, segmenter and threshold from it, so a threshold is
never paired with a model it was not chosen for (as a MONAI bundle carries its inference
settings), and a folder of models works from any working directory.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr.atomic import write_json
from cxr.errors import BundleError

BUNDLE_NAME = "bundle.json"
BUNDLE_FORMAT = "cxr-bundle/1"
ROLES = ("binary", "four_class", "segmenter")
OPTIONAL_ROLES = ("segmenter",)  # models trained without the lung crop need no segmenter
HOW_TO_POINT = (
    "run the evaluate stage (`dvc repro evaluate`, or `dvc pull` for a trained project), or pass "
    "--models DIR naming the folder that holds bundle.json and its checkpoints"
)


def default_models_dir() -> Path:
    """`models/` of the repository this package lives in, so predict finds it from anywhere."""
    return Path(__file__).resolve().parents[1] / "models"


def sha256_of(path: Path) -> str:
    """sha256 of a file, read in blocks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: the checkpoint paths (None for an absent optional one), their sha256s
    and the threshold chosen for the binary model."""

    path: Path  # the bundle.json itself
    files: dict[str, Path | None]
    sha256: dict[str, str | None]
    threshold: float
    threshold_source: str


def valid_threshold(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _entry(models_dir: Path, role: str, path: Path | None) -> dict[str, str] | None:
    """{file, sha256} for a checkpoint, its name relative to the bundle's folder."""
    if path is None:
        if role not in OPTIONAL_ROLES:
            raise BundleError(f"the bundle needs a {role} checkpoint")
        return None
    try:
        name = Path(path).resolve().relative_to(models_dir.resolve())
    except ValueError:
        raise BundleError(
            f"{path} lies outside {models_dir}: a bundle names checkpoints beside it, so that the "
            "folder can be moved whole"
        ) from None
    if not Path(path).is_file():
        raise BundleError(f"{path}: file not found, cannot be bundled")
    return {"file": name.as_posix(), "sha256": sha256_of(Path(path))}


def write_bundle(
    models_dir: Path,
    binary: Path,
    four_class: Path,
    segmenter: Path | None,
    threshold: float,
    threshold_source: str,
) -> Path:
    """Write `models_dir/bundle.json` for these checkpoints and the binary model's threshold."""
    if not valid_threshold(threshold) or math.isnan(threshold):
        raise BundleError(f"threshold must be in [0, 1], got {threshold!r}")
    blob: dict[str, Any] = {"format": BUNDLE_FORMAT}
    for role, path in zip(ROLES, (binary, four_class, segmenter), strict=True):
        blob[role] = _entry(models_dir, role, path)
    blob |= {"threshold": float(threshold), "threshold_source": str(threshold_source)}
    out = models_dir / BUNDLE_NAME
    write_json(out, blob)
    return out


def read_bundle_file(path: Path) -> dict[str, Any]:
    """The bundle's JSON, checked for shape (not yet against the files)."""
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"no model bundle at {path}: {HOW_TO_POINT}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not a readable model bundle ({exc}); {HOW_TO_POINT}") from exc
    if not isinstance(blob, dict) or blob.get("format") != BUNDLE_FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise BundleError(f"{path}: not a model bundle (format {found!r}, expected "
                          f"{BUNDLE_FORMAT!r}); {HOW_TO_POINT}")  # fmt: skip
    if not valid_threshold(blob.get("threshold")):
        raise BundleError(
            f"{path}: no threshold in [0, 1] (found {blob.get('threshold')!r}); {HOW_TO_POINT}"
        )
    for role in ROLES:
        entry = blob.get(role)
        if entry is None and role in OPTIONAL_ROLES:
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                and isinstance(entry.get("sha256"), str)):  # fmt: skip
            raise BundleError(
                f"{path}: no {role} entry with file and sha256 (found {entry!r}); {HOW_TO_POINT}"
            )
    return blob


def _verified(
    path: Path, role: str, entry: dict[str, str] | None
) -> tuple[Path | None, str | None]:
    """The checkpoint an entry names, refused when missing or not the file that was bundled."""
    if entry is None:
        return None, None
    file = path.parent / entry["file"]
    if not file.is_file():
        raise BundleError(
            f"{path} names {file} ({role}), which does not exist: `dvc checkout`/`dvc pull` the "
            f"models, or {HOW_TO_POINT}"
        )
    digest = sha256_of(file)
    if digest != entry["sha256"]:
        raise BundleError(
            f"{file} (sha256 {digest[:12]}...) is not the {role} checkpoint {path} was written for "
            f"(sha256 {entry['sha256'][:12]}...): the checkpoint changed since the evaluate stage "
            "ran; re-run it (`dvc repro evaluate`) or restore the matching models"
        )
    return file, digest


def load_bundle(models_dir: Path, roles: tuple[str, ...] = ROLES) -> Bundle:
    """Read `models_dir/bundle.json` and verify the sha256 of each checkpoint in `roles` (the
    ones the caller will use; the others are listed, unchecked)."""
    path = models_dir / BUNDLE_NAME
    blob = read_bundle_file(path)
    files: dict[str, Path | None] = {}
    digests: dict[str, str | None] = {}
    for role in ROLES:
        entry = blob.get(role)
        if role in roles:
            files[role], digests[role] = _verified(path, role, entry)
        else:
            files[role] = None if entry is None else path.parent / entry["file"]
            digests[role] = None if entry is None else entry["sha256"]
    return Bundle(
        path=path,
        files=files,
        sha256=digests,
        threshold=float(blob["threshold"]),
        threshold_source=str(blob.get("threshold_source", "")),
    )


# --- site calibration -------------------------------------------------------------------------

SITE_NAME = "site.json"
SITE_FORMAT = "cxr-site/1"


@dataclass(frozen=True)
class SiteThreshold:
    """A threshold `python -m cxr calibrate` set on a site's own COVID-19-negative films."""

    path: Path
    threshold: float
    binary_sha256: str


def read_site(path: Path) -> SiteThreshold:
    """A site calibration file, checked for shape (its model is checked by `site_threshold`)."""
    hint = "re-run `python -m cxr calibrate`, or move the file away"
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not a readable site calibration ({exc}); {hint}") from exc
    if not isinstance(blob, dict) or blob.get("format") != SITE_FORMAT:
        raise BundleError(f"{path}: not a site calibration (no format {SITE_FORMAT!r}); {hint}")
    binary, value = blob.get("binary"), blob.get("threshold")
    # The threshold may sit one float above 1.0 (every calibration film called negative).
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and 0 <= value <= math.nextafter(1.0, 2.0)):  # fmt: skip
        raise BundleError(f"{path}: no threshold in [0, 1] (found {value!r}); {hint}")
    if not (isinstance(binary, dict) and isinstance(binary.get("sha256"), str)):
        raise BundleError(f"{path}: no binary.sha256 naming the model it was set for; {hint}")
    return SiteThreshold(path, float(value), binary["sha256"])


def site_threshold(path: Path, binary: Path, binary_sha256: str) -> SiteThreshold:
    """The site calibration at `path`, refused unless it was set for this binary checkpoint."""
    site = read_site(path)
    if site.binary_sha256 != binary_sha256:
        raise BundleError(
            f"{path} was calibrated for another binary model (sha256 {site.binary_sha256[:12]}...), "
            f"not {binary} (sha256 {binary_sha256[:12]}...): re-run `python -m cxr calibrate` for "
            "this model, pass --threshold, or move the site file away"
        )
    return site
