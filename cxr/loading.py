"""Which models and which threshold: checkpoints from the model bundle (or given one by one),
the COVID-19 threshold that belongs to the binary one, and both classifiers (with the lung
segmenter) loaded and checked to agree on preprocessing.

Shared by the Python API (cxr.api.Predictor.load) and the commands (predict, calibrate,
validate), so every way in runs the same models with the same threshold. The sources are read
from any object with the attributes of `Sources` (an argparse Namespace of the commands'
model options has them all).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cxr.bundle import SITE_NAME, Bundle, load_bundle, sha256_of, site_threshold
from cxr.ensemble import Ensemble, load_model, member_paths
from cxr.images import Preprocessing
from cxr.inputs import UsageError
from cxr.models import CheckpointError, CXRNet

log = logging.getLogger(__name__)
OOD_NAME = "ood.pt"  # the ood stage's gate, beside the binary checkpoint it was fitted for


@dataclass(frozen=True)
class Models:
    """Both networks and what is needed to feed them and read their outputs."""

    four_class: CXRNet | Ensemble  # an ensemble manifest loads as one model (cxr.ensemble)
    binary: CXRNet | Ensemble
    class_names: list[str]  # the four-class model's, in output order
    covid_index: int  # the binary model's COVID-19 output
    spec: Preprocessing
    # The lung segmenter (model, metadata), when there is one: it checks for a plausible pair of
    # lungs and, for models trained with `crop: lungs`, gives the crop.
    segmenter: tuple[Any, dict[str, Any]] | None = None
    # The out-of-distribution gate (cxr.ood, the ood stage's models/ood.pt beside the binary
    # checkpoint and fitted for it), when there is one: "is this a frontal chest radiograph?"
    ood: Any = None


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


class Sources(Protocol):
    """Where the models and the threshold come from (predict's --models, --four-class, --binary,
    --segmenter, --site and --threshold; None where not given)."""

    models: Path
    four_class: Path | None
    binary: Path | None
    segmenter: Path | None
    site: Path | None
    threshold: float | None


@dataclass(frozen=True)
class Given:
    """`Sources` as plain values, for callers without an argparse Namespace (the API)."""

    models: Path
    four_class: Path | None = None
    binary: Path | None = None
    segmenter: Path | None = None
    site: Path | None = None
    threshold: float | None = None


def resolve(args: Sources) -> Resolved:
    """Checkpoints from the bundle unless given, and the threshold that belongs to the binary
    one. The bundle is not needed when both classifiers and --threshold are given."""
    files, bundle = model_files(args, need_bundle=args.threshold is None)
    return Resolved(
        four_class=files["four_class"],
        binary=files["binary"],
        segmenter=files["segmenter"],
        threshold=choose_threshold(args, bundle, files["binary"]),
    )


def model_files(args: Sources, need_bundle: bool) -> tuple[dict[str, Path | None], Bundle | None]:
    """The checkpoint of each role: --binary/--four-class/--segmenter, else the bundle's (only
    the checkpoints taken from the bundle are hashed and verified)."""
    given = {"binary": args.binary, "four_class": args.four_class, "segmenter": args.segmenter}
    bundle = None
    if need_bundle or args.binary is None or args.four_class is None:
        bundle = load_bundle(args.models, tuple(role for role, p in given.items() if p is None))
    files = {role: path if path is not None or bundle is None else bundle.files[role]
             for role, path in given.items()}  # fmt: skip
    return files, bundle


def choose_threshold(args: Sources, bundle: Bundle | None, binary: Path) -> Threshold:
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


def load_gate(binary_path: Path) -> Any:
    """The ood stage's gate beside the binary checkpoint (ood.pt), refused if it was fitted for
    another checkpoint; None, with a note, where there is none (predict still runs)."""
    path = Path(binary_path).parent / OOD_NAME
    if not path.exists():
        log.info("no out-of-distribution gate (%s does not exist: run the ood stage): films are "
                 "not checked for being frontal chest radiographs", path)  # fmt: skip
        return None
    from cxr.ood import load_state  # sklearn & co.: only where a gate exists

    try:
        return load_state(path, binary=binary_path)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from exc


def channels_last(model: CXRNet | Ensemble) -> CXRNet | Ensemble:
    """The weights in NHWC order, for inference: oneDNN's CPU convolutions then run without
    reordering every layer's input, ~20% faster for ResNet-18 at 112 px on the Zen 1 EPYC
    (docs/performance.md). The sums may run in another order, so probabilities can differ from
    the evaluate stage's in the last bits (tests allow 1e-5)."""
    import torch

    return model.to(memory_format=torch.channels_last)


def load_models(
    four_class_path: Path, binary_path: Path, segmenter_path: Path | None = None
) -> Models:
    """Load both checkpoints (and the lung segmenter) and check they agree on how images are
    prepared."""
    loaded = {}
    for task, path in (("four_class", four_class_path), ("binary", binary_path)):
        try:
            model, meta = load_model(path, task)  # a checkpoint or an ensemble manifest
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
        four_class=channels_last(four),
        binary=channels_last(binary),
        class_names=list(four_meta["class_names"]),
        covid_index=binary_meta["class_names"].index("covid"),
        spec=spec,
        segmenter=load_segmenter_for(spec, segmenter_path),
        ood=load_gate(member_paths(binary_path)[0]),  # an ensemble: its first member's gate
    )
