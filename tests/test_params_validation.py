"""Range checks of params.yaml (cxr.config validate()) and of the --threads options."""

from __future__ import annotations

import argparse
import dataclasses
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cxr import config
from cxr.config import load_train_params
from cxr.params import ParamsError, load_params, non_negative_int

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
INF, NAN = math.inf, math.nan

LOADERS: dict[str, Callable[[Path], object]] = {
    "base": config.load_base,
    "split": config.load_split_params,
    "train_binary": lambda p: load_train_params(p, "train_binary"),
    "train_four_class": lambda p: load_train_params(p, "train_four_class"),
    "evaluate": config.load_evaluate_params,
    "gradcam": config.load_gradcam_params,
}
LOADERS["oos"] = __import__("cxr.oos_params", fromlist=["load_oos_params"]).load_oos_params
LOADERS["ood"] = __import__("cxr.ood", fromlist=["load_ood_params"]).load_ood_params
if hasattr(config, "load_segment_params"):  # the lung segmenter's section, where present
    LOADERS["segment"] = config.load_segment_params
CORE = {"base", "fetch", "split", "train_binary", "train_four_class", "evaluate", "gradcam"}

# (dotted key, bad value, the key the message must name)
REJECTED: list[tuple[str, Any, str]] = [
    ("base.seed", -1, "base.seed"),
    ("base.image_size", 8, "base.image_size"),
    ("split.val_fraction", 0.0, "split.val_fraction"),
    ("split.val_fraction", 1.0, "split.val_fraction"),
    ("split.val_fraction", NAN, "split.val_fraction"),
    ("split.test_fraction", 0.0, "split.test_fraction"),
    ("split.test_fraction", -0.2, "split.test_fraction"),
    ("split.test_fraction", 0.8, "split.val_fraction + split.test_fraction"),  # 0.2 + 0.8 = 1
    ("split.jpeg_quality", 0, "split.jpeg_quality"),
    ("split.jpeg_quality", 101, "split.jpeg_quality"),
    ("split.harmonise_size", 8, "split.harmonise_size"),
    ("split.harmonise_size", 0, "split.harmonise_size"),
    ("split.near_duplicate_threshold", 0.4, "split.near_duplicate_threshold"),
    ("train_binary.lr", INF, "train_binary.lr"),
    ("train_binary.lr", -INF, "train_binary.lr"),
    ("train_binary.lr", NAN, "train_binary.lr"),
    ("train_binary.lr", 0.0, "train_binary.lr"),
    ("train_binary.lr", -1.0e-3, "train_binary.lr"),
    ("train_four_class.lr", INF, "train_four_class.lr"),
    ("train_binary.epochs", 0, "train_binary.epochs"),
    ("train_four_class.batch_size", 0, "train_four_class.batch_size"),
    ("train_binary.threads", -1, "train_binary.threads"),
    ("train_four_class.threads", -4, "train_four_class.threads"),
    ("train_binary.patience", -1, "train_binary.patience"),
    ("train_binary.weight_decay", -1.0e-4, "train_binary.weight_decay"),
    ("train_binary.weight_decay", INF, "train_binary.weight_decay"),
    ("train_binary.weight_decay", NAN, "train_binary.weight_decay"),
    ("train_binary.momentum", 1.0, "train_binary.momentum"),
    ("train_binary.momentum", -0.1, "train_binary.momentum"),
    ("train_binary.momentum", NAN, "train_binary.momentum"),
    ("train_binary.gamma", 0.0, "train_binary.gamma"),
    ("train_binary.gamma", 1.5, "train_binary.gamma"),
    ("train_binary.gamma", NAN, "train_binary.gamma"),
    ("train_binary.milestones", [0, 10], "train_binary.milestones"),
    ("train_binary.milestones", [-5], "train_binary.milestones"),
    ("train_binary.milestones", [20, 10], "train_binary.milestones"),
    ("train_binary.milestones", [10, 10], "train_binary.milestones"),
    ("train_binary.augment.scale", [0.0, 0.0], "train_binary.augment.scale"),
    ("train_binary.augment.scale", [-0.5, 1.0], "train_binary.augment.scale"),
    ("train_binary.augment.scale", [1.1, 0.9], "train_binary.augment.scale"),
    ("train_binary.augment.scale", [0.9], "train_binary.augment.scale"),
    ("train_binary.augment.scale", [0.9, 1.0, 1.1], "train_binary.augment.scale"),
    ("train_binary.augment.scale", [0.9, INF], "train_binary.augment.scale"),
    ("train_four_class.augment.scale", [0.0, 0.0], "train_four_class.augment.scale"),
    ("train_binary.augment.degrees", -1.0, "train_binary.augment.degrees"),
    ("train_binary.augment.degrees", 181.0, "train_binary.augment.degrees"),
    ("train_binary.augment.degrees", NAN, "train_binary.augment.degrees"),
    ("train_binary.augment.translate", -0.1, "train_binary.augment.translate"),
    ("train_binary.augment.translate", 1.0, "train_binary.augment.translate"),
    ("train_binary.augment.translate", INF, "train_binary.augment.translate"),
    ("evaluate.bootstrap", -1, "evaluate.bootstrap"),
    ("evaluate.ci_level", 0.0, "evaluate.ci_level"),
    ("evaluate.ci_level", 1.0, "evaluate.ci_level"),
    ("evaluate.ci_level", 95.0, "evaluate.ci_level"),
    ("evaluate.ci_level", NAN, "evaluate.ci_level"),
    ("evaluate.target_sensitivity", 0.0, "evaluate.target_sensitivity"),
    ("evaluate.target_sensitivity", 1.01, "evaluate.target_sensitivity"),
    ("evaluate.calibration_bins", 1, "evaluate.calibration_bins"),
    ("evaluate.calibration_bins", 0, "evaluate.calibration_bins"),
    ("gradcam.border_fraction", 0.0, "gradcam.border_fraction"),
    ("gradcam.border_fraction", 0.5, "gradcam.border_fraction"),
    ("gradcam.border_fraction", -0.1, "gradcam.border_fraction"),
    ("gradcam.faithfulness_top_percent", 0.0, "gradcam.faithfulness_top_percent"),
    ("gradcam.faithfulness_top_percent", 100.0, "gradcam.faithfulness_top_percent"),
    ("gradcam.faithfulness_top_percent", 150.0, "gradcam.faithfulness_top_percent"),
    ("gradcam.batch_size", 0, "gradcam.batch_size"),
    ("gradcam.gallery_per_group", -1, "gradcam.gallery_per_group"),
]

# Boundary values that must still be accepted.
ACCEPTED: list[tuple[str, Any]] = [
    ("evaluate.bootstrap", 0),  # point estimates only, CIs null
    ("evaluate.target_sensitivity", 1.0),
    ("evaluate.calibration_bins", 2),
    ("train_binary.gamma", 1.0),
    ("train_binary.momentum", 0.0),
    ("train_binary.weight_decay", 0.0),
    ("train_binary.milestones", []),
    ("train_binary.threads", 4),
    ("train_binary.augment.scale", [1.0, 1.0]),
    ("train_binary.augment.degrees", 0.0),
    ("train_binary.augment.degrees", 180.0),
    ("train_binary.augment.translate", 0.0),
    ("split.jpeg_quality", 1),
    ("split.jpeg_quality", 100),
    ("split.harmonise_size", 16),
    ("gradcam.gallery_per_group", 0),
    ("base.seed", 0),
]


def with_value(tmp_path: Path, dotted: str, value: Any) -> tuple[Path, str]:
    """A copy of the repository's params.yaml with one key changed; returns (path, section)."""
    params = load_params(PARAMS)
    section, *inner, last = dotted.split(".")
    node = params[section]
    for key in inner:
        node = node[key]
    node[last] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))  # inf/nan as .inf/.nan
    return path, section


@pytest.mark.parametrize(
    ("dotted", "value", "key"), REJECTED, ids=[f"{d}={v}" for d, v, _ in REJECTED]
)
def test_out_of_range_value_is_refused_naming_the_key(
    tmp_path: Path, dotted: str, value: Any, key: str
) -> None:
    path, section = with_value(tmp_path, dotted, value)
    with pytest.raises(ParamsError) as err:
        LOADERS[section](path)
    message = str(err.value)
    assert message.startswith(key + " ") or message.startswith(key + ":"), message
    assert "\n" not in message


@pytest.mark.parametrize(("dotted", "value"), ACCEPTED, ids=[f"{d}={v}" for d, v in ACCEPTED])
def test_boundary_values_are_accepted(tmp_path: Path, dotted: str, value: Any) -> None:
    path, section = with_value(tmp_path, dotted, value)
    LOADERS[section](path)


def test_yaml_inf_is_a_float_and_refused(tmp_path: Path) -> None:
    text = PARAMS.read_text().replace("  lr: 1.0e-3", "  lr: .inf", 1)
    assert "lr: .inf" in text
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert load_params(path)["train_binary"]["lr"] == math.inf
    with pytest.raises(
        ParamsError, match=r"^train_binary\.lr must be a finite number > 0, got inf$"
    ):
        load_train_params(path, "train_binary")


def test_the_repository_params_pass_every_check() -> None:
    params = load_params(PARAMS)
    assert set(params) >= CORE
    assert set(params) - {"fetch"} <= set(LOADERS), "a section without a checked loader"
    for name in set(params) - {"fetch"}:
        loaded = LOADERS[name](PARAMS)
        if name.startswith("train_"):
            loaded.augmentation()
    from cxr.fetch import DATASETS

    assert params["fetch"]["dataset"] in DATASETS


def test_the_params_dataclasses_hold_no_default_values() -> None:
    """params.yaml is the one source of values: a default in code could only contradict it (as
    TrainParams' resnet152 / 10 epochs / batch 16 and GradcamParams' layer4 did).
    Watched red before the fix: every field of these dataclasses but TrainParams.task had one."""
    classes = [config.BaseParams, config.SplitParams, config.AugmentParams, config.TrainParams,
               config.EvaluateParams, config.GradcamParams, config.SegmentParams]  # fmt: skip
    with_default = [
        f"{cls.__name__}.{f.name}"
        for cls in classes
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert not with_default, with_default


def every_key(params: dict) -> list[str]:
    """Dotted names of every key of the checked sections, augment's keys included."""
    keys = []
    for name in LOADERS:
        for key, value in params[name].items():
            keys.append(f"{name}.{key}")
            if key == "augment" and isinstance(value, dict):
                keys += [f"{name}.augment.{k}" for k in value]
    return keys


@pytest.mark.parametrize("dotted", every_key(load_params(PARAMS)))
def test_a_missing_key_is_an_error_naming_it(tmp_path: Path, dotted: str) -> None:
    """Watched red before the fix: a key left out took the dataclass's default, silently."""
    params = load_params(PARAMS)
    section, *inner, last = dotted.split(".")
    node = params[section]
    for key in inner:
        node = node[key]
    del node[last]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(ParamsError) as err:
        LOADERS[section](path)  # train_*: validate() reads the nested augment section too
    message = str(err.value)
    assert message.endswith(f": {dotted} missing") and "\n" not in message, message
    if not inner:  # a top-level key: the message names the file it is missing from
        assert message == f"{path}: {dotted} missing"


def test_an_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    path, _ = with_value(tmp_path, "train_binary.epoch", 3)  # a typo of `epochs`
    with pytest.raises(ParamsError, match=rf"^{path}: train_binary\.epoch unknown \(known keys: "):
        load_train_params(path, "train_binary")
    path, _ = with_value(tmp_path, "gradcam.layer", "layer4")
    with pytest.raises(ParamsError, match=r"gradcam\.layer unknown .*target_layer"):
        config.load_gradcam_params(path)


# ---- --threads -------------------------------------------------------------------------------


def test_non_negative_int() -> None:
    assert non_negative_int("0") == 0 and non_negative_int("3") == 3
    for bad in ("-1", "x", "1.5", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=">= 0"):
            non_negative_int(bad)


def test_predict_negative_threads_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from cxr import predict

    with pytest.raises(SystemExit) as exit_:
        predict.parse_args(["image.png", "--threads", "-3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --threads: must be an integer >= 0, got -3" in err
    assert predict.parse_args(["image.png", "--threads", "2"]).threads == 2


def test_bench_negative_threads_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from cxr import bench

    with pytest.raises(SystemExit) as exit_:
        bench.main(["--threads", "-2"])  # refused before any model is built
    assert exit_.value.code == 2
    assert "argument --threads: must be an integer >= 0, got -2" in capsys.readouterr().err


def test_python_m_cxr_predict_negative_threads_exits_2_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cxr", "predict", str(tmp_path / "x.png"), "--threads", "-3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--threads: must be an integer >= 0, got -3" in proc.stderr
