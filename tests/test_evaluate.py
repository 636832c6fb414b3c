"""The evaluate stage: metrics on hand-made data, and clear failures on bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cxr.arrays import save_split
from cxr.config import BINARY_CLASSES, FOUR_CLASSES, EvaluateParams
from cxr.evaluate import Scored, evaluate_task
from cxr.models import build_model, save_checkpoint
from stages import evaluate as stage

LABELS = ["covid", "viral", "bacterial", "normal"]


def table(
    labels: list[str], groups: list[str] | None = None, dataset: str = "kermany"
) -> pd.DataFrame:
    return pd.DataFrame({
        "label": labels,
        "dataset": [("ieee8023" if lab == "covid" else dataset) for lab in labels],
        "age_group": [("adult" if lab == "covid" else "pediatric") for lab in labels],
        "group_id": groups or [f"g{i}" for i in range(len(labels))],
    })  # fmt: skip


def test_binary_threshold_is_chosen_on_validation_and_applied_to_test():
    # val: covid scores 0.9, 0.8; non-covid 0.7, 0.1 -> Youden picks 0.8 (TPR 1, FPR 0)
    val = Scored("val", table(["covid", "covid", "normal", "viral"]), np.array([1, 1, 0, 0]),
                 np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.9, 0.1]]))  # fmt: skip
    # test: at 0.8, covid 0.85 -> positive, covid 0.75 -> negative, normal 0.6 -> negative
    test = Scored("test", table(["covid", "covid", "normal"]), np.array([1, 1, 0]),
                  np.array([[0.15, 0.85], [0.25, 0.75], [0.4, 0.6]]))  # fmt: skip
    adult = Scored("adult_check", table(["normal", "normal"], dataset="nih"), np.array([0, 0]),
                   np.array([[0.45, 0.55], [0.9, 0.1]]))  # fmt: skip
    p = EvaluateParams(bootstrap=50)
    result = evaluate_task(
        "binary", list(BINARY_CLASSES), {"val": val, "test": test, "adult_check": adult}, p, 0
    )
    assert result["threshold"]["value"] == pytest.approx(0.8)
    at = result["test"]["at_threshold"]
    assert at["sensitivity"] == pytest.approx(0.5) and at["specificity"] == pytest.approx(1.0)
    # argmax: all three covid -> accuracy 2/3
    assert result["test"]["accuracy"] == pytest.approx(2 / 3)
    assert result["adult_check"]["covid_call_rate"] == pytest.approx(0.5)  # 0.55 > 0.45
    assert result["adult_check_at_threshold"]["covid_call_rate"] == 0.0  # 0.55 < 0.8
    sub = result["test"]["subgroups"]
    assert sub["normal"]["kermany_pediatric"] == {"n": 1, "accuracy": 0.0, "covid_call_rate": 1.0}


def tiny_split(root: Path, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for name, labels in {
        "val": LABELS * 2,
        "test": LABELS * 2,
        "adult_check": ["normal"] * 3,
    }.items():
        images = rng.integers(0, 255, (len(labels), size, size), dtype=np.uint8)
        save_split(root, name, images, table(labels))


def checkpoint(path: Path, task: str) -> Path:
    names = list(BINARY_CLASSES if task == "binary" else FOUR_CLASSES)
    torch.manual_seed(0)
    model = build_model("resnet18", len(names))
    meta = {"task": task, "arch": "resnet18", "class_names": names, "image_size": 32,
            "preprocessing": {"image_size": 32}, "params": {"arch": "resnet18", "weights": "none",
            "select_metric": "macro_f1", "optimizer": "adamw", "lr": 1e-3, "balance": "none"},
            "training": {"epochs_run": 1, "best_epoch": 1, "wall_seconds": 1.0}}  # fmt: skip
    save_checkpoint(path, model, meta)
    return path


@pytest.fixture
def workdir(tmp_path) -> Path:
    tiny_split(tmp_path / "split")
    params = {"base": {"seed": 1, "image_size": 32}, "evaluate": {"bootstrap": 20}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data.json").write_text(
        json.dumps({s: {"total": 8} for s in ("train", "val", "test")} | {"groups": {"test": 8}})
    )
    checkpoint(tmp_path / "binary.pt", "binary")
    checkpoint(tmp_path / "four_class.pt", "four_class")
    return tmp_path


def argv(d: Path, binary: str = "binary.pt", four: str = "four_class.pt") -> list[str]:
    return ["--binary", str(d / binary), "--four-class", str(d / four), "--data", str(d / "split"),
            "--params", str(d / "params.yaml"), "--metrics", str(d / "metrics"),
            "--data-counts", str(d / "data.json"), "--plots", str(d / "plots"), "--reports", str(d / "reports")]  # fmt: skip


def test_stage_writes_metrics_plots_and_reports(workdir):
    torch.set_num_threads(1)
    stage.main(argv(workdir))
    four = json.loads((workdir / "metrics" / "four_class.json").read_text())
    assert four["test"]["n"] == 8 and set(four["test"]["per_class"]) == set(FOUR_CLASSES)
    binary = json.loads((workdir / "metrics" / "binary.json").read_text())
    assert 0.0 <= binary["threshold"]["value"] <= 1.0
    for name in (
        "four_class_confusion.png",
        "four_class_roc.png",
        "binary_reliability.png",
        "four_class_confusion.csv",
    ):
        assert (workdir / "plots" / name).stat().st_size > 0
    assert (workdir / "plots" / "four_class_roc" / "covid.csv").exists()
    assert "study reported" in (workdir / "reports" / "summary.md").read_text()
    assert "Not a diagnostic device" in (workdir / "reports" / "model_card.md").read_text()


def test_missing_checkpoint_fails_clearly(workdir, capsys):
    (workdir / "binary.pt").unlink()
    with pytest.raises(SystemExit) as exc:
        stage.main(argv(workdir))
    assert exc.value.code == 1
    assert "binary.pt: file not found" in capsys.readouterr().err


def test_checkpoint_of_the_wrong_task_fails_clearly(workdir, capsys):
    with pytest.raises(SystemExit) as exc:
        stage.main(argv(workdir, binary="four_class.pt"))
    assert exc.value.code == 1
    assert "expected 'binary'" in capsys.readouterr().err
