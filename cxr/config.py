"""The schema of params.yaml: one dataclass per section, checked when a stage starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cxr.images import Preprocessing
from cxr.params import ParamsError, from_section, load_params, section

FOUR_CLASSES = ["covid", "viral", "bacterial", "normal"]
# Labels a manifest row may carry: the four classes, plus `pneumonia` (NIH report-mined, type
# unknown): non-COVID for the binary task, "viral or bacterial" for the four-class task.
PARTIAL_LABELS = {"pneumonia": ("viral", "bacterial")}
LABELS = [*FOUR_CLASSES, *PARTIAL_LABELS]
BINARY_CLASSES = ["non_covid", "covid"]
# Columns `train_*.balance_by` may combine into balancing strata (see cxr.data.strata_for).
BALANCE_BY = ("class", "age_group", "dataset")
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


@dataclass(frozen=True)
class BaseParams:
    """Values several stages read."""

    seed: int = 42
    image_size: int = 112

    def validate(self) -> None:
        if not 16 <= self.image_size <= 1024:
            raise ParamsError(f"base.image_size must be in 16..1024, got {self.image_size}")


@dataclass(frozen=True)
class SplitParams:
    group_by: Literal["patient", "image"] = "patient"
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    harmonise: bool = True
    harmonise_size: int = 224
    jpeg_quality: int = 75
    # Datasets whose publisher already squashed images to 224 px JPEG q75 (see cxr.images).
    pre_harmonised: list[str] = field(default_factory=lambda: ["kermany"])
    # false: no rsna/nih adult non-COVID rows in train/val (the study's data); test unchanged.
    adult_controls: bool = True
    # Whole datasets moved out of train/val/test into the `external` evaluation cohort.
    external: list[str] = field(default_factory=list)
    near_duplicate_threshold: float = 0.99  # thumbnail correlation (see cxr.duplicates)

    def validate(self) -> None:
        if not 0.5 <= self.near_duplicate_threshold <= 1.0:
            raise ParamsError(
                "split.near_duplicate_threshold must be in 0.5..1.0 (a correlation), "
                f"got {self.near_duplicate_threshold}"
            )


@dataclass(frozen=True)
class AugmentParams:
    hflip: bool = True
    degrees: float = 15.0
    translate: float = 0.1
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])


@dataclass(frozen=True)
class TrainParams:
    """One training task; train_binary and train_four_class share these keys."""

    task: Literal["binary", "four_class"]
    arch: str = "resnet152"
    weights: str = "none"  # none | imagenet | path to a state_dict
    zero_init_residual: bool = True
    epochs: int = 10
    batch_size: int = 16
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = 1.0e-3
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    schedule: Literal["onecycle", "multistep", "constant"] = "onecycle"
    milestones: list[int] = field(default_factory=lambda: [10, 20])
    gamma: float = 0.1
    balance: Literal["none", "oversample", "weighted_loss"] = "oversample"
    # What `balance` evens out: class, or class x age_group (adult and pediatric separately).
    balance_by: list[str] = field(default_factory=lambda: ["class"])
    # Images of unknown type (`pneumonia`): true = partial-label loss on {viral, bacterial};
    # false = leave them out of training. Binary: they are non-COVID either way.
    partial_labels: bool = True
    select_metric: Literal["macro_f1", "loss"] = "macro_f1"
    patience: int = 0  # epochs without improvement before stopping; 0 = never stop early
    augment: dict = field(default_factory=dict)
    deterministic: bool = False
    threads: int = 0  # torch CPU threads; 0 = one per core

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ParamsError(
                f"{self.task}: unknown arch {self.arch!r}; choose one of {list(ARCHS)}"
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise ParamsError(f"{self.task}: epochs and batch_size must be >= 1")
        if self.lr <= 0:
            raise ParamsError(f"{self.task}: lr must be > 0, got {self.lr}")
        if not self.balance_by or set(self.balance_by) - set(BALANCE_BY):
            raise ParamsError(
                f"train_{self.task}.balance_by must list some of {list(BALANCE_BY)}, "
                f"got {self.balance_by}"
            )
        self.augmentation()  # validates the augment mapping

    def augmentation(self) -> AugmentParams:
        return from_section(AugmentParams, self.augment, f"train_{self.task}.augment")

    @property
    def class_names(self) -> list[str]:
        return list(BINARY_CLASSES) if self.task == "binary" else list(FOUR_CLASSES)


@dataclass(frozen=True)
class EvaluateParams:
    bootstrap: int = 1000
    ci_level: float = 0.95
    threshold: Literal["youden", "sensitivity"] = "youden"
    threshold_on: Literal["all", "adult"] = "adult"  # which validation images choose it
    target_sensitivity: float = 0.95
    calibration_bins: int = 10


@dataclass(frozen=True)
class GradcamParams:
    method: Literal["gradcam", "gradcam++", "hirescam", "scorecam", "xgradcam", "eigencam"] = (
        "gradcam"
    )
    gallery_per_group: int = 3
    border_fraction: float = 0.12
    faithfulness_top_percent: float = 20.0
    batch_size: int = 8


def load_base(path: str | Path) -> BaseParams:
    return from_section(BaseParams, section(load_params(path), "base"), "base")


def load_split_params(path: str | Path) -> SplitParams:
    return from_section(SplitParams, section(load_params(path), "split"), "split")


def load_train_params(path: str | Path, name: str) -> TrainParams:
    values = dict(section(load_params(path), name))
    task = name.removeprefix("train_")
    if values.setdefault("task", task) != task:
        raise ParamsError(f"{name}.task must be {task!r}")
    return from_section(TrainParams, values, name)


def load_evaluate_params(path: str | Path) -> EvaluateParams:
    return from_section(EvaluateParams, section(load_params(path), "evaluate"), "evaluate")


def load_gradcam_params(path: str | Path) -> GradcamParams:
    return from_section(GradcamParams, section(load_params(path), "gradcam"), "gradcam")


def preprocessing(base: BaseParams, split: SplitParams) -> Preprocessing:
    """The preprocessing spec every stage shares (it travels in each checkpoint too)."""
    return Preprocessing(
        image_size=base.image_size,
        harmonise=split.harmonise,
        harmonise_size=split.harmonise_size,
        jpeg_quality=split.jpeg_quality,
    )
