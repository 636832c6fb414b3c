"""The schema of params.yaml: one dataclass per section, checked when a stage starts.

(Over 400 lines: it mirrors params.yaml, one dataclass per section with its checks beside its
fields, about 40 lines a section; split by section, a rule shared by two sections would have two
homes.)

The dataclasses hold no default values: params.yaml is the one place a value is set, and a key
missing from it is an error (cxr.params.from_section), never a silent second default in code."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from cxr.images import INTENSITY, Preprocessing
from cxr.params import ParamsError, from_section, load_params, section

FOUR_CLASSES = ["covid", "viral", "bacterial", "normal"]
# Labels a manifest row may carry: the four classes, plus `pneumonia` (NIH report-mined, type
# unknown): non-COVID for the binary task, "viral or bacterial" for the four-class task.
PARTIAL_LABELS = {"pneumonia": ("viral", "bacterial")}
LABELS = [*FOUR_CLASSES, *PARTIAL_LABELS]
BINARY_CLASSES = ["non_covid", "covid"]
# Columns `train_*.balance_by` may combine into balancing strata (see cxr.data.strata_for);
# `pneumonia` is whether the film shows one (any label but normal), not a column.
BALANCE_BY = ("class", "age_group", "dataset", "pneumonia")
# What the adversarial head conditions on: `label` is sources.csv's finding (covid, normal,
# pneumonia, viral, bacterial), finer than the binary task's class.
ADVERSARY_WITHIN = ("class", "age_group", "label")
# Train keys that a run records (checkpoint, resume file) only when they are switched on: added
# after the committed default models were trained, they leave a run that does not use them what
# it was, its checkpoint's bytes included. A dotted key is one inside a mapping (augment).
RECORDED_WHEN_ON = {
    "average_epochs": 0,
    "mixstyle": 0.0,
    "mixup": 0.0,
    "logit_penalty": 0.0,
    "jtt_epochs": 0,
    "augment.jpeg": 0.0,
}
# Train keys added after recipes were first recorded (reports/oos), with what a recorded
# recipe without them meant: the network saw the arrays' size; no adversarial head, weight
# average, MixStyle, mixup, logit penalty, first run (just train twice) or JPEG round trip.
LATER_TRAIN_KEYS = {
    "input_size": None,
    "adversary": 0.0,
    "adversary_by": "dataset",
    "adversary_within": ["class"],
    **RECORDED_WHEN_ON,
}


def _parent(values: dict[str, Any], key: str) -> tuple[dict[str, Any] | None, str]:
    """The mapping that holds dotted `key` in `values` (None if there is none) and its last part."""
    *path, last = key.split(".")
    for part in path:
        values = values.get(part)
        if not isinstance(values, dict):
            return None, last
    return values, last


def recorded_params(p: Any) -> dict[str, Any]:
    """A TrainParams as a run records it: its fields, less those of RECORDED_WHEN_ON left off."""
    values = asdict(p)  # a deep copy: the mappings inside are the record's own
    for key, off in RECORDED_WHEN_ON.items():
        parent, last = _parent(values, key)
        if parent is not None and last in parent and parent[last] == off:
            del parent[last]
    return values


def as_recipe(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """A recorded params section made comparable with today's: a train section gains the keys
    it predates, with the values their absence meant (LATER_TRAIN_KEYS)."""
    part = copy.deepcopy(dict(values or {}))
    if section.startswith("train_"):
        for key, value in LATER_TRAIN_KEYS.items():
            parent, last = _parent(part, key)
            if parent is not None:
                parent.setdefault(last, value)
    return part


ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    """Raise the one-line ParamsError `<key> must be <rule>, got <value>` unless `ok`.

    Write `ok` as the condition a good value meets (`0 < x < 1`), never as the bad case: every
    comparison with nan is false, so a YAML `.nan` fails the check instead of slipping through.
    """
    if not ok:
        raise ParamsError(f"{key} must be {rule}, got {value!r}")


def finite(x: float) -> bool:
    """True for a real number that is not inf, -inf or nan (YAML `.inf`, `.nan`)."""
    return math.isfinite(x)


@dataclass(frozen=True)
class BaseParams:
    """Values several stages read."""

    seed: int
    image_size: int
    # Model input: the whole preprocessed image (none), its predicted lungs' box (lungs), or the
    # whole image blanked outside the predicted lungs (mask).
    crop: Literal["none", "lungs", "mask"]
    crop_margin: float

    def validate(self) -> None:
        require(
            finite(self.crop_margin) and 0 <= self.crop_margin <= 0.5,
            "base.crop_margin",
            "a fraction in 0..0.5",
            self.crop_margin,
        )
        # NumPy's legacy seeding (np.random.seed, cxr.data.seed_everything) takes 0..2**32-1.
        require(0 <= self.seed < 2**32, "base.seed", "an integer in 0..2**32-1", self.seed)
        if not 16 <= self.image_size <= 1024:
            raise ParamsError(f"base.image_size must be in 16..1024, got {self.image_size}")


@dataclass(frozen=True)
class SplitParams:
    group_by: Literal["patient", "image"]
    val_fraction: float
    test_fraction: float
    harmonise: bool
    harmonise_size: int
    jpeg_quality: int
    # Datasets whose publisher already squashed images to 224 px JPEG q75 (see cxr.images).
    pre_harmonised: list[str]
    # Tone normalisation after harmonising: none | equalize (see cxr.images.Preprocessing).
    intensity: str
    # false: no rsna/nih adult non-COVID rows in train/val (the study's data); test unchanged.
    adult_controls: bool
    # Whole datasets moved out of train/val/test into the `external` evaluation cohort.
    external: list[str]
    # Places (a `location` or a `country` of sources.csv) held out the same way, whole groups.
    external_places: list[str]
    near_duplicate_threshold: float  # thumbnail correlation (see cxr.duplicates)

    def validate(self) -> None:
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            require(0 < value < 1, f"split.{key}", "a fraction in (0, 1)", value)
        total = self.val_fraction + self.test_fraction
        require(
            total < 1,
            "split.val_fraction + split.test_fraction",
            "below 1 (train needs the rest)",
            total,
        )
        require(
            self.harmonise_size >= 16,
            "split.harmonise_size",
            "an integer >= 16 (pixels)",
            self.harmonise_size,
        )
        require(
            1 <= self.jpeg_quality <= 100,
            "split.jpeg_quality",
            "an integer in 1..100",
            self.jpeg_quality,
        )
        if self.intensity not in INTENSITY:
            raise ParamsError(
                f"split.intensity must be one of {list(INTENSITY)}, got {self.intensity!r}"
            )
        if not 0.5 <= self.near_duplicate_threshold <= 1.0:
            raise ParamsError(
                "split.near_duplicate_threshold must be in 0.5..1.0 (a correlation), "
                f"got {self.near_duplicate_threshold}"
            )


@dataclass(frozen=True)
class AugmentParams:
    hflip: bool
    degrees: float
    translate: float
    scale: list[float]
    # Acquisition-robust augmentation (cxr.data.draw_photometric): what differs between hospitals'
    # films (tone curve, sharpness, noise, burned-in text) drawn per image; 0 turns one off.
    gamma: float  # log-gamma drawn in [-gamma, gamma]
    contrast: float  # contrast factor in [1 - contrast, 1 + contrast]
    brightness: float  # offset in [-brightness, brightness]
    sharpen: float  # unsharp-mask amount in [-sharpen, sharpen] (negative blurs)
    noise: float  # Gaussian noise sd drawn in [0, noise]
    cutout: float  # probability of one random box (5-20% of the side) of random grey
    # Probability of a JPEG round trip of the film, quality drawn in JPEG_QUALITY (cxr.data.
    # draw_jpeg): another source's compression, before any other augmentation.
    jpeg: float

    def check(self, where: str = "augment") -> None:
        """Range checks, naming keys `<where>.<key>` (TrainParams.augmentation passes
        `train_<task>.augment`). Not called `validate`, so from_section leaves it to the caller,
        which knows the section's full name."""
        require(
            finite(self.degrees) and 0 <= self.degrees <= 180,
            f"{where}.degrees",
            "a rotation in 0..180 (degrees)",
            self.degrees,
        )
        # A fraction of the image: 1 or more would shift it out of the frame entirely.
        require(
            finite(self.translate) and 0 <= self.translate < 1,
            f"{where}.translate",
            "a fraction in [0, 1)",
            self.translate,
        )
        # cxr.data.augment_batch divides by the drawn scale: 0 or below is no image at all.
        low, high = [*self.scale, math.nan, math.nan][:2]
        require(
            len(self.scale) == 2 and finite(high) and 0 < low <= high,
            f"{where}.scale",
            "a list [low, high] with 0 < low <= high (finite)",
            self.scale,
        )
        for key, high in (("gamma", 2.0), ("contrast", 0.9), ("brightness", 0.5),
                          ("sharpen", 2.0), ("noise", 0.5), ("cutout", 1.0),
                          ("jpeg", 1.0)):  # fmt: skip
            value = getattr(self, key)
            require(finite(value) and 0 <= value <= high, f"{where}.{key}",
                    f"a number in [0, {high}]", value)  # fmt: skip

    @property
    def photometric(self) -> bool:
        return any((self.gamma, self.contrast, self.brightness, self.sharpen, self.noise,
                    self.cutout))  # fmt: skip


@dataclass(frozen=True)
class TrainParams:
    """One training task; train_binary and train_four_class share these keys."""

    task: Literal["binary", "four_class"]
    arch: str
    weights: str  # none | imagenet | path to a state_dict
    zero_init_residual: bool
    epochs: int
    batch_size: int
    optimizer: Literal["sgd", "adamw"]
    lr: float
    momentum: float
    weight_decay: float
    schedule: Literal["onecycle", "multistep", "constant"]
    milestones: list[int]
    gamma: float
    # group_dro: oversample, and weigh each stratum's mean loss by online group DRO (cxr.train).
    balance: Literal["none", "oversample", "weighted_loss", "group_dro"]
    # What `balance` evens out: class, or class x age_group (adult and pediatric separately).
    balance_by: list[str]
    # Images of unknown type (`pneumonia`): true = partial-label loss on {viral, bacterial};
    # false = leave them out of training. Binary: they are non-COVID either way.
    partial_labels: bool
    select_metric: Literal["macro_f1", "loss"]
    patience: int  # epochs without improvement before stopping; 0 = never stop early
    augment: dict
    # Deterministic torch kernels: same bits on a GPU too; on the CPU same bits either way.
    deterministic: bool
    threads: int  # torch CPU threads; 0 = one per core
    # Processes torchrun starts on this node (dvc.yaml's cmd); batch_size is their global batch.
    processes: int
    sync_batchnorm: bool  # BatchNorm statistics over the global batch (GPUs only)
    compile: bool  # torch.compile the training forward/backward
    # The network's input side in px; None = base.image_size (the arrays'). Smaller: the model
    # resizes the arrays itself (cxr.models.CXRNet), so both tasks share one split.
    input_size: int | None
    # Weight of a conditional source-adversarial head (cxr.adversary; 0 = none): within each
    # `adversary_within` stratum, the features are trained not to tell the `adversary_by`
    # sources apart.
    adversary: float
    adversary_by: Literal["dataset", "location", "country"]
    adversary_within: list[str]  # the strata it conditions on: some of ADVERSARY_WITHIN
    # Weights averaged over every step of the last this-many epochs (cxr.train; SWA, Izmailov et
    # al. 2018, densely as SWAD, Cha et al. 2021); those epochs are scored and kept averaged.
    average_epochs: int
    # Probability per early stage and batch of mixing two films' feature statistics (cxr.mixstyle;
    # Zhou et al. 2021); 0 = off.
    mixstyle: float
    # Beta(alpha, alpha) of mixup's weight (cxr.train.mix_batch; Zhang et al. 2018): each batch
    # trained on a blend of its films and their labels with a shuffled copy; 0 = off.
    mixup: float
    # Weight of the penalty on the squared logits added to the loss (spectral decoupling,
    # Pezeshki et al., NeurIPS 2021; cxr.train.train_epoch): once a film is classified with some
    # margin the easy feature stops being pushed, leaving gradient for others; 0 = off.
    logit_penalty: float
    # Just train twice (Liu et al., ICML 2021; cxr.train.jtt_errors): epochs of a first run whose
    # wrongly called training films the final run draws JTT_UPWEIGHT times as often; 0 = off.
    jtt_epochs: int

    def validate(self) -> None:
        name = f"train_{self.task}"
        require(0 <= self.average_epochs <= self.epochs, f"{name}.average_epochs",
                f"an integer in 0..epochs ({self.epochs}; 0 = no weight averaging)",
                self.average_epochs)  # fmt: skip
        require(finite(self.mixstyle) and 0 <= self.mixstyle <= 1, f"{name}.mixstyle",
                "a probability in [0, 1] (0 = no MixStyle)", self.mixstyle)  # fmt: skip
        require(finite(self.mixup) and self.mixup >= 0, f"{name}.mixup",
                "a finite number >= 0, the Beta(alpha, alpha) of its weights (0 = no mixup)",
                self.mixup)  # fmt: skip
        require(finite(self.logit_penalty) and self.logit_penalty >= 0, f"{name}.logit_penalty",
                "a finite number >= 0, the weight of the squared logits' mean (0 = off)",
                self.logit_penalty)  # fmt: skip
        require(0 <= self.jtt_epochs <= self.epochs, f"{name}.jtt_epochs",
                f"an integer in 0..epochs ({self.epochs}; 0 = train once)",
                self.jtt_epochs)  # fmt: skip
        require(finite(self.adversary) and self.adversary >= 0, f"{name}.adversary",
                "a finite number >= 0 (0 = no source-adversarial head)", self.adversary)  # fmt: skip
        require(
            self.input_size is None or 16 <= self.input_size <= 1024,
            f"{name}.input_size",
            "null (= base.image_size) or an integer in 16..1024",
            self.input_size,
        )
        if self.arch not in ARCHS:
            raise ParamsError(
                f"{name}.arch: unknown arch {self.arch!r}; choose one of {list(ARCHS)}"
            )
        require(self.epochs >= 1, f"{name}.epochs", "an integer >= 1", self.epochs)
        require(self.batch_size >= 1, f"{name}.batch_size", "an integer >= 1", self.batch_size)
        require(finite(self.lr) and self.lr > 0, f"{name}.lr", "a finite number > 0", self.lr)
        require(
            finite(self.momentum) and 0 <= self.momentum < 1,
            f"{name}.momentum",
            "in [0, 1)",
            self.momentum,
        )
        require(
            finite(self.weight_decay) and self.weight_decay >= 0,
            f"{name}.weight_decay",
            "a finite number >= 0",
            self.weight_decay,
        )
        # MultiStepLR multiplies the rate by gamma at each milestone: 1 keeps it, above grows it.
        require(0 < self.gamma <= 1, f"{name}.gamma", "in (0, 1]", self.gamma)
        ms = self.milestones
        require(
            all(m >= 1 for m in ms) and all(a < b for a, b in zip(ms, ms[1:], strict=False)),
            f"{name}.milestones",
            "positive, strictly increasing epochs",
            ms,
        )
        require(
            self.patience >= 0,
            f"{name}.patience",
            "an integer >= 0 (0 = no early stopping)",
            self.patience,
        )
        require(
            self.threads >= 0, f"{name}.threads", "an integer >= 0 (0 = one per core)", self.threads
        )
        require(self.processes >= 1, f"{name}.processes", "an integer >= 1", self.processes)
        require(
            self.batch_size % self.processes == 0,
            f"{name}.batch_size",
            f"divisible by processes ({self.processes}): it is the global batch",
            self.batch_size,
        )
        # Each of these keeps state of its own or works on the whole batch in this process's
        # forward, so several processes would each run it on their part: not one process's run.
        one_process = (
            ("balance", self.balance == "group_dro", "group_dro"),  # each rank's group weights
            ("adversary", self.adversary > 0, "the source-adversarial head"),  # a forward hook
            ("mixstyle", self.mixstyle > 0, "MixStyle"),  # mixes within the part of the batch
            ("mixup", self.mixup > 0, "mixup"),  # blends within the part of the batch
            ("logit_penalty", self.logit_penalty > 0, "the logit penalty"),  # the part's mean
            ("jtt_epochs", self.jtt_epochs > 0, "just train twice"),  # scores on one process
        )
        for key, on, what in one_process:
            if on and self.processes > 1:
                raise ParamsError(
                    f"{name}.{key}: {what} runs in one process; set {name}.processes to 1 "
                    f"(got {self.processes})"
                )
        if not self.adversary_within or set(self.adversary_within) - set(ADVERSARY_WITHIN):
            raise ParamsError(
                f"{name}.adversary_within must list some of {list(ADVERSARY_WITHIN)}, "
                f"got {self.adversary_within}"
            )
        if not self.balance_by or set(self.balance_by) - set(BALANCE_BY):
            raise ParamsError(
                f"train_{self.task}.balance_by must list some of {list(BALANCE_BY)}, "
                f"got {self.balance_by}"
            )
        self.augmentation()  # validates the augment mapping

    @property
    def oversamples(self) -> bool:
        """Whether epochs are stratum-balanced draws (group DRO draws them too: every group in
        nearly every batch, so each step sees each group's loss)."""
        return self.balance in ("oversample", "group_dro")

    def augmentation(self) -> AugmentParams:
        where = f"train_{self.task}.augment"
        aug = from_section(AugmentParams, self.augment, where)
        aug.check(where)
        return aug

    @property
    def class_names(self) -> list[str]:
        return list(BINARY_CLASSES) if self.task == "binary" else list(FOUR_CLASSES)


@dataclass(frozen=True)
class EvaluateParams:
    bootstrap: int
    ci_level: float
    threshold: Literal["youden", "sensitivity"]
    threshold_on: Literal["all", "adult"]  # which validation images choose it
    target_sensitivity: float
    calibration_bins: int
    # The binary model's COVID-19 threshold (the one predict uses): "val" chooses it like the
    # four-class model's (threshold, threshold_on); "oos" takes the out-of-source operating
    # point of reports/oos/operating_point.json, measured on held-out hospitals with this recipe.
    operating_point: Literal["val", "oos"]

    def validate(self) -> None:
        # 0 resamples is allowed: point estimates only, every CI null (`n/a` in the report).
        require(
            self.bootstrap >= 0,
            "evaluate.bootstrap",
            "an integer >= 0 (0 = no CIs)",
            self.bootstrap,
        )
        require(0 < self.ci_level < 1, "evaluate.ci_level", "in (0, 1)", self.ci_level)
        require(
            0 < self.target_sensitivity <= 1,
            "evaluate.target_sensitivity",
            "in (0, 1]",
            self.target_sensitivity,
        )
        # One bin is a single point, not a reliability curve.
        require(
            self.calibration_bins >= 2,
            "evaluate.calibration_bins",
            "an integer >= 2",
            self.calibration_bins,
        )


@dataclass(frozen=True)
class GradcamParams:
    method: Literal["gradcam", "gradcam++", "hirescam", "scorecam", "xgradcam", "eigencam"]
    gallery_per_group: int
    border_fraction: float
    faithfulness_top_percent: float
    batch_size: int
    # Grad-CAM's layer: layer4 (4 x 4 grid at 112 px) or layer3 (7 x 7); chosen on validation.
    target_layer: Literal["layer4", "layer3"]
    # ROAD (Rong et al. 2022) removal percentiles: MoRF and LeRF averaged over these.
    road_percentiles: list[int]
    bootstrap: int  # resamples for the CIs of the case means (zone lift, pointing)

    def validate(self) -> None:
        # The ranges cxr.cam.border_mask and cxr.cam.confidence_drop accept: checked here so a bad
        # value stops the stage before the maps are computed, not after.
        require(
            0 < self.border_fraction < 0.5,
            "gradcam.border_fraction",
            "in (0, 0.5)",
            self.border_fraction,
        )
        require(
            0 < self.faithfulness_top_percent < 100,
            "gradcam.faithfulness_top_percent",
            "a percentage in (0, 100)",
            self.faithfulness_top_percent,
        )
        require(self.batch_size >= 1, "gradcam.batch_size", "an integer >= 1", self.batch_size)
        require(
            self.gallery_per_group >= 0,
            "gradcam.gallery_per_group",
            "an integer >= 0 (0 = no gallery images)",
            self.gallery_per_group,
        )
        require(
            bool(self.road_percentiles) and all(0 < q < 100 for q in self.road_percentiles),
            "gradcam.road_percentiles",
            "a non-empty list of percentages in 1..99",
            self.road_percentiles,
        )
        require(self.bootstrap >= 1, "gradcam.bootstrap", "an integer >= 1", self.bootstrap)


@dataclass(frozen=True)
class SegmentParams:
    """The lung segmenter (cxr.segmenter): a small U-Net trained from scratch."""

    size: int  # network input, pixels: the split arrays are area-downsampled to it
    channels: int  # width of the top level; doubles at each level down
    depth: int  # levels (3 poolings at depth 4)
    epochs: int
    batch_size: int
    lr: float  # one-cycle peak, AdamW
    weight_decay: float
    augment: bool  # flip, rotate, scale, shift image and mask together
    threshold: float  # on the lung probability
    min_component: float  # pieces under this share of the image are dropped
    threads: int  # torch CPU threads; 0 = one per core

    def validate(self) -> None:
        step = 2 ** (self.depth - 1)
        require(2 <= self.depth <= 6, "segment.depth", "an integer in 2..6", self.depth)
        require(
            16 <= self.size <= 1024 and self.size % step == 0,
            "segment.size",
            f"in 16..1024 and divisible by 2^(depth-1) = {step}",
            self.size,
        )
        require(1 <= self.channels <= 64, "segment.channels", "an integer in 1..64", self.channels)
        require(self.epochs >= 1, "segment.epochs", "an integer >= 1", self.epochs)
        require(self.batch_size >= 1, "segment.batch_size", "an integer >= 1", self.batch_size)
        require(finite(self.lr) and self.lr > 0, "segment.lr", "a number > 0", self.lr)
        require(
            finite(self.weight_decay) and self.weight_decay >= 0,
            "segment.weight_decay",
            "a number >= 0",
            self.weight_decay,
        )
        require(0 < self.threshold < 1, "segment.threshold", "in (0, 1)", self.threshold)
        require(
            0 <= self.min_component < 0.5,
            "segment.min_component",
            "a share of the image in [0, 0.5)",
            self.min_component,
        )
        require(self.threads >= 0, "segment.threads", "an integer >= 0", self.threads)


def _load(cls: type, path: str | Path, name: str) -> Any:
    """Section `name` of the params file at `path` as `cls`, every key required."""
    return from_section(cls, section(load_params(path), name), name, source=str(path))


def load_base(path: str | Path) -> BaseParams:
    return _load(BaseParams, path, "base")


def load_split_params(path: str | Path) -> SplitParams:
    return _load(SplitParams, path, "split")


def load_train_params(path: str | Path, name: str) -> TrainParams:
    values = dict(section(load_params(path), name))
    task = name.removeprefix("train_")
    if values.setdefault("task", task) != task:
        raise ParamsError(f"{name}.task must be {task!r}")
    return from_section(TrainParams, values, name, source=str(path))


def load_evaluate_params(path: str | Path) -> EvaluateParams:
    return _load(EvaluateParams, path, "evaluate")


def load_gradcam_params(path: str | Path) -> GradcamParams:
    return _load(GradcamParams, path, "gradcam")


def load_segment_params(path: str | Path) -> SegmentParams:
    return _load(SegmentParams, path, "segment")


def network_input(base: BaseParams, p: TrainParams) -> int:
    """The side task `p`'s network sees: its input_size, at most the arrays' (base.image_size)
    since resizing up adds pixels, not detail."""
    if p.input_size is None:
        return base.image_size
    if p.input_size > base.image_size:
        raise ParamsError(
            f"train_{p.task}.input_size {p.input_size} is larger than base.image_size "
            f"{base.image_size}, the arrays it is resized from: raise base.image_size instead"
        )
    return p.input_size


def preprocessing(base: BaseParams, split: SplitParams) -> Preprocessing:
    """The preprocessing spec every stage shares (it travels in each checkpoint too)."""
    return Preprocessing(
        image_size=base.image_size,
        harmonise=split.harmonise,
        harmonise_size=split.harmonise_size,
        jpeg_quality=split.jpeg_quality,
        intensity=split.intensity,
        crop=base.crop,
        crop_margin=base.crop_margin,
    )
