"""The evaluate stage: metrics on hand-made data, and clear failures on bad checkpoints."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cxr import report
from cxr.arrays import save_split
from cxr.config import BINARY_CLASSES, FOUR_CLASSES
from cxr.data import labels_for
from cxr.evaluate import Scored, evaluate_task
from cxr.models import CheckpointError, build_model, save_checkpoint
from stages import evaluate as stage
from stages import report as report_stage
from tests.conftest import repo_params, write_params

LABELS = ["covid", "viral", "bacterial", "normal"]


# Default source of each label: (dataset, age group). Pediatric rows take the `dataset` argument.
SOURCE = {"covid": ("ieee8023", "adult"), "pneumonia": ("nih", "adult")}


def table(
    labels: list[str],
    groups: list[str] | None = None,
    dataset: str = "kermany",
    sources: list[tuple[str, str]] | None = None,
) -> pd.DataFrame:
    sources = sources or [SOURCE.get(lab, (dataset, "pediatric")) for lab in labels]
    return pd.DataFrame({
        "label": labels,
        "dataset": [ds for ds, _ in sources],
        "age_group": [age for _, age in sources],
        "group_id": groups or [f"g{i}" for i in range(len(labels))],
    })  # fmt: skip


def scored(name: str, t: pd.DataFrame, prob: list[list[float]], task: str) -> Scored:
    """A Scored split with labels from the real `labels_for` (pneumonia -> -1 for four-class)."""
    return Scored(name, t, labels_for(t, task), np.array(prob))


def test_binary_threshold_is_chosen_on_validation_and_applied_to_test():
    # val: covid scores 0.9, 0.8; non-covid 0.7, 0.1 -> Youden picks 0.8 (TPR 1, FPR 0)
    val = Scored("val", table(["covid", "covid", "normal", "viral"]), np.array([1, 1, 0, 0]),
                 np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.9, 0.1]]))  # fmt: skip
    # test: at 0.8, covid 0.85 -> positive, covid 0.75 -> negative, normal 0.6 -> negative
    test = Scored("test", table(["covid", "covid", "normal"]), np.array([1, 1, 0]),
                  np.array([[0.15, 0.85], [0.25, 0.75], [0.4, 0.6]]))  # fmt: skip
    adult = Scored("adult_check", table(["normal", "normal"], dataset="nih"), np.array([0, 0]),
                   np.array([[0.45, 0.55], [0.9, 0.1]]))  # fmt: skip
    p = repo_params("evaluate", bootstrap=50, threshold_on="all")
    result = evaluate_task(
        "binary", list(BINARY_CLASSES), {"val": val, "test": test, "adult_check": adult}, p, 0
    )
    assert result["threshold"]["value"] == pytest.approx(0.8)
    at = result["test"]["at_threshold"]
    assert at["sensitivity"] == pytest.approx(0.5) and at["specificity"] == pytest.approx(1.0)
    # argmax: all three covid -> accuracy 2/3
    assert result["test"]["accuracy"] == pytest.approx(2 / 3)
    assert result["adult_check"]["covid_call_rate"] == pytest.approx(0.5)  # 0.55 > 0.45
    assert result["adult_check"]["at_threshold"]["call_rate"]["point"] == 0.0  # 0.55 < 0.8
    sub = result["test"]["subgroups"]
    assert sub["normal"]["kermany_pediatric"] == {
        "n": 1, "accuracy": 0.0, "covid_call_rate": 1.0, "covid_call_rate_at_threshold": 0.0
    }  # fmt: skip


def test_threshold_on_adult_validation_images_ignores_easy_pediatric_negatives():
    from cxr.evaluate import operating_point

    # covid 0.9, 0.4 (adult); rsna normal 0.5 (adult); three Kermany children at 0.01.
    # All rows: Youden J at 0.4 = 1 - 1/4 = 0.75 beats 0.9 (J = 0.5). Adults only: J at 0.9 =
    # 0.5, at 0.4 = 1 - 1 = 0, so 0.9.
    labels = ["covid", "covid", "normal", "normal", "normal", "normal"]
    sources = [("ieee8023", "adult")] * 2 + [("rsna", "adult")] + [("kermany", "pediatric")] * 3
    prob = [[0.1, 0.9], [0.6, 0.4], [0.5, 0.5], [0.99, 0.01], [0.99, 0.01], [0.99, 0.01]]
    val = scored("val", table(labels, sources=sources), prob, "binary")
    everyone = operating_point(val, repo_params("evaluate", threshold_on="all"), 1)
    adults = operating_point(val, repo_params("evaluate", threshold_on="adult"), 1)
    assert everyone["value"] == pytest.approx(0.4) and everyone["n"] == 6
    assert adults["value"] == pytest.approx(0.9) and adults["n"] == 3


# A four-class example worked by hand (columns covid, viral, bacterial, normal).
# Validation: covid p(covid) 0.9, 0.5; non-covid 0.4, 0.1 -> Youden threshold 0.5 (TPR 1, FPR 0).
VAL4 = (["covid", "covid", "normal", "pneumonia"],
        [[0.9, 0.05, 0.03, 0.02], [0.5, 0.2, 0.2, 0.1], [0.4, 0.1, 0.1, 0.4], [0.1, 0.4, 0.4, 0.1]])  # fmt: skip
# Test rows:                                     p(covid)  argmax  >= 0.5
TEST4 = [
    ("covid", "ieee8023", "adult", [0.7, 0.1, 0.1, 0.1]),  #     0.7   covid   yes
    ("covid", "hannover", "adult", [0.4, 0.3, 0.2, 0.1]),  #     0.4   covid   no
    ("covid", "ieee8023", "adult", [0.2, 0.5, 0.2, 0.1]),  #     0.2   viral   no
    ("normal", "rsna", "adult", [0.6, 0.1, 0.1, 0.2]),  #        0.6   covid   yes
    ("normal", "rsna", "adult", [0.1, 0.1, 0.1, 0.7]),  #        0.1   normal  no
    ("pneumonia", "nih", "adult", [0.45, 0.1, 0.4, 0.05]),  #    0.45  covid   no
    ("pneumonia", "nih", "adult", [0.1, 0.3, 0.5, 0.1]),  #      0.1   bacterial no
    ("normal", "kermany", "pediatric", [0.9, 0.05, 0.03, 0.02]),  # 0.9 covid  yes
    ("viral", "kermany", "pediatric", [0.1, 0.8, 0.05, 0.05]),  #   0.1 viral  no
]
# adult_check: p(covid) 0.55 (argmax covid, >= 0.5), 0.45 (argmax covid, < 0.5), 0.1 (normal)
ADULT4 = [[0.55, 0.15, 0.15, 0.15], [0.45, 0.2, 0.2, 0.15], [0.1, 0.1, 0.1, 0.7]]
BOOT = 200


@pytest.fixture(scope="module")
def four() -> dict:
    labels, sources = [r[0] for r in TEST4], [(r[1], r[2]) for r in TEST4]
    splits = {
        "val": scored("val", table(VAL4[0]), VAL4[1], "four_class"),
        "test": scored("test", table(labels, sources=sources), [r[3] for r in TEST4], "four_class"),
        "adult_check": scored("adult_check", table(["normal"] * 3, sources=[("nih", "adult")] * 3),
                              ADULT4, "four_class"),
    }  # fmt: skip
    return evaluate_task(
        "four_class", list(FOUR_CLASSES), splits, repo_params("evaluate", bootstrap=BOOT), 0
    )


def test_four_class_threshold_is_chosen_on_validation(four):
    assert four["threshold"]["value"] == 0.5
    assert four["threshold"]["chosen_on"] == "val (adult images)"


def test_four_class_report_leaves_out_unknown_class_rows(four):
    test = four["test"]
    # 7 rows of known class; argmax right on rows 1, 2, 5, 9 (covid, covid, normal, viral)
    assert (test["n"], test["n_unknown"]) == (7, 2)
    assert test["accuracy"] == pytest.approx(4 / 7)
    assert sum(map(sum, test["confusion"])) == 7
    assert test["per_class"]["covid"]["support"] == 3
    # pneumonia rows: right when called viral or bacterial (row 7 yes, row 6 no: covid)
    assert test["subgroups"]["pneumonia"]["nih_adult"] == {
        "n": 2, "accuracy": 0.5, "covid_call_rate": 0.5, "covid_call_rate_at_threshold": 0.0
    }  # fmt: skip


def test_four_class_covid_vs_rest_at_threshold_and_argmax(four):
    calls = four["test"]["covid_vs_rest"]
    # all 9 rows, COVID-19 = rows 1-3. At 0.5: calls 1, 4, 8 -> TP 1, FN 2, FP 2, TN 4
    at = {k: v["point"] for k, v in calls["at_threshold"].items()}
    assert at == pytest.approx({"accuracy": 5 / 9, "sensitivity": 1 / 3, "specificity": 4 / 6,
                                "balanced_accuracy": 1 / 2, "call_rate": 3 / 9})  # fmt: skip
    assert four["test"]["at_threshold"]["confusion"] == [[4, 2], [2, 1]]
    # argmax calls 1, 2, 4, 6, 8 -> TP 2, FN 1, FP 3, TN 3
    am = {k: v["point"] for k, v in calls["argmax"].items()}
    assert am == pytest.approx({"accuracy": 5 / 9, "sensitivity": 2 / 3, "specificity": 3 / 6,
                                "balanced_accuracy": 7 / 12, "call_rate": 5 / 9})  # fmt: skip


def test_at_threshold_cis_contain_the_point_and_count_valid_resamples(four):
    for how in ("at_threshold", "argmax"):
        for name, ci in four["test"]["covid_vs_rest"][how].items():
            assert ci["low"] <= ci["point"] <= ci["high"], (how, name)
            assert ci["low"] < ci["high"], (how, name)  # 9 groups: a real spread
        ci = four["test"]["covid_vs_rest"][how]
        # sensitivity is undefined on resamples without a COVID-19 patient (P = (6/9)^9 ~ 2.6%
        # each, ~5 of 200) and skipped there, as is balanced accuracy; the others never are
        # (no non-COVID patient: P = (3/9)^9 ~ 0.005%)
        assert ci["sensitivity"]["n_valid"] == ci["balanced_accuracy"]["n_valid"]
        assert 0.9 * BOOT < ci["sensitivity"]["n_valid"] < BOOT, how
        for name in ("accuracy", "specificity", "call_rate"):
            assert ci[name]["n_valid"] == BOOT, (how, name)


def test_adult_only_metrics_by_hand(four):
    adult = four["test"]["adult_only"]
    # rows 1-7: COVID-19 p 0.7 0.4 0.2 vs non-COVID 0.6 0.1 0.45 0.1 (the pediatric 0.9 is out)
    assert adult["n"] == 7 and adult["n_by_class"] == {"covid": 3, "non_covid": 4}
    assert adult["n_by_source"] == {"covid": {"hannover": 1, "ieee8023": 2},
                                    "normal": {"rsna": 2}, "pneumonia": {"nih": 2}}  # fmt: skip
    # AUC: 0.7 beats 4, 0.4 beats 2, 0.2 beats 2 -> 8 of 12 pairs
    assert adult["roc_auc"]["point"] == pytest.approx(8 / 12)
    # at 0.5: sensitivity 1/3 (0.7), specificity 3/4 (0.6 is the one false call)
    assert adult["at_threshold"]["sensitivity"]["point"] == pytest.approx(1 / 3)
    assert adult["at_threshold"]["specificity"]["point"] == pytest.approx(3 / 4)
    # argmax: covid rows 1, 2 called (2/3); non-COVID rows 4, 6 called (specificity 2/4)
    assert adult["argmax"]["sensitivity"]["point"] == pytest.approx(2 / 3)
    assert adult["argmax"]["specificity"]["point"] == pytest.approx(2 / 4)
    for ci in (adult["roc_auc"], adult["at_threshold"]["specificity"]):
        assert ci["low"] <= ci["point"] <= ci["high"] and 0 < ci["n_valid"] <= BOOT


def test_pneumonia_rates_by_hand(four):
    pneu = four["test"]["pneumonia"]
    # rows 6 (p 0.45, argmax covid) and 7 (p 0.1, argmax bacterial)
    assert pneu["n"] == 2 and pneu["n_by_dataset"] == {"nih": 2}
    assert pneu["argmax"]["call_rate"]["point"] == pytest.approx(1 / 2)
    assert pneu["at_threshold"]["call_rate"]["point"] == 0.0
    assert pneu["viral_or_bacterial_rate"]["point"] == pytest.approx(1 / 2)
    assert pneu["at_threshold"]["sensitivity"]["point"] is None  # no COVID-19 among them


def test_adult_check_call_rates_by_hand(four):
    ac = four["adult_check"]
    assert ac["n"] == 3
    assert ac["at_threshold"]["call_rate"]["point"] == pytest.approx(1 / 3)  # 0.55 only
    assert ac["argmax"]["call_rate"]["point"] == pytest.approx(2 / 3)  # 0.55 and 0.45
    assert ac["covid_call_rate"] == pytest.approx(2 / 3)
    ci = ac["at_threshold"]["call_rate"]
    assert ci["low"] <= ci["point"] <= ci["high"] and ci["n_valid"] == BOOT
    assert "external" not in four  # none given
    json.dumps(four, allow_nan=False)  # plain types only, for DVC metrics


def test_external_report_per_dataset_by_hand():
    val = scored("val", table(VAL4[0]), VAL4[1], "four_class")
    # hannover: COVID-19 p 0.8 (yes), 0.3 (argmax viral, no), 0.6 (yes) -> sensitivity 2/3
    # rsna: normals p 0.55 (yes), 0.2 (no) -> specificity 1/2
    ext = scored("external", table(["covid"] * 3 + ["normal"] * 2,
                                   sources=[("hannover", "adult")] * 3 + [("rsna", "adult")] * 2),
                 [[0.8, 0.1, 0.05, 0.05], [0.3, 0.4, 0.2, 0.1], [0.6, 0.2, 0.1, 0.1],
                  [0.55, 0.15, 0.15, 0.15], [0.2, 0.1, 0.1, 0.6]], "four_class")  # fmt: skip
    splits = {"val": val, "test": val, "adult_check": val, "external": ext}
    result = evaluate_task(
        "four_class", list(FOUR_CLASSES), splits, repo_params("evaluate", bootstrap=50), 0
    )
    by = result["external"]["by_dataset"]
    assert result["external"]["n"] == 5 and list(by) == ["hannover", "rsna"]
    h, r = by["hannover"], by["rsna"]
    assert (h["n"], h["n_covid"], h["n_non_covid"]) == (3, 3, 0)
    assert h["at_threshold"]["sensitivity"]["point"] == pytest.approx(2 / 3)
    assert h["at_threshold"]["call_rate"]["point"] == pytest.approx(2 / 3)
    assert h["argmax"]["sensitivity"]["point"] == pytest.approx(2 / 3)
    assert h["at_threshold"]["specificity"]["point"] is None
    assert (r["n"], r["n_covid"], r["n_non_covid"]) == (2, 0, 2)
    assert r["at_threshold"]["specificity"]["point"] == pytest.approx(1 / 2)
    assert r["at_threshold"]["sensitivity"]["point"] is None
    # an empty external split adds no section
    splits["external"] = ext.subset(np.zeros(5, dtype=bool))
    empty = evaluate_task(
        "four_class", list(FOUR_CLASSES), splits, repo_params("evaluate", bootstrap=5), 0
    )
    assert "external" not in empty


def tiny_split(root: Path, size: int = 32, external: int | None = 3) -> None:
    """val/test with every label (incl. pneumonia and an adult rsna normal), adult_check, and
    `external` hannover COVID-19 rows (None: no external files at all, as in old data dirs)."""
    rng = np.random.default_rng(0)
    rsna = [("rsna", "adult")]
    splits = {
        "val": table([*LABELS * 2, "pneumonia"]),
        "test": table([*LABELS * 2, "pneumonia", "normal"],
                      sources=[SOURCE.get(lab, ("kermany", "pediatric")) for lab in LABELS * 2]
                      + [("nih", "adult")] + rsna),
        "adult_check": table(["normal"] * 3, sources=[("nih", "adult")] * 3),
    }  # fmt: skip
    if external is not None:
        splits["external"] = table(["covid"] * external, sources=[("hannover", "adult")] * external)
    for name, t in splits.items():
        save_split(root, name, rng.integers(0, 255, (len(t), size, size), dtype=np.uint8), t)


def checkpoint(path: Path, task: str, names: list[str] | None = None) -> Path:
    """A random resnet18 checkpoint; `names`: its class order (default: the task's)."""
    names = names or list(BINARY_CLASSES if task == "binary" else FOUR_CLASSES)
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
    return make_workdir(tmp_path)


def make_workdir(tmp_path: Path) -> Path:
    write_params(tmp_path / "params.yaml", base={"seed": 1, "image_size": 32},
                 evaluate={"bootstrap": 20, "operating_point": "val"})  # fmt: skip
    (tmp_path / "data.json").write_text(
        json.dumps({s: {"total": 8} for s in ("train", "val", "test")} | {"groups": {"test": 8}})
    )
    checkpoint(tmp_path / "binary.pt", "binary")
    checkpoint(tmp_path / "four_class.pt", "four_class")
    return tmp_path


def argv(d: Path, binary: str = "binary.pt", four: str = "four_class.pt") -> list[str]:
    return ["--binary", str(d / binary), "--four-class", str(d / four), "--data", str(d / "split"),
            "--params", str(d / "params.yaml"), "--metrics", str(d / "metrics"),
            "--plots", str(d / "plots")]  # fmt: skip


def report_argv(d: Path, binary: str = "binary.pt", four: str = "four_class.pt") -> list[str]:
    return ["--binary", str(d / binary), "--four-class", str(d / four), "--params", str(d / "params.yaml"),
            "--metrics", str(d / "metrics"), "--data-counts", str(d / "data.json"), "--reports", str(d / "reports")]  # fmt: skip


def evaluate_and_report(d: Path, *extra: str) -> None:
    """The evaluate stage, then the report stage on what it wrote (as dvc.yaml chains them)."""
    stage.main(argv(d))
    report_stage.main([*report_argv(d), *extra])


def test_stage_writes_metrics_plots_and_reports(workdir):
    torch.set_num_threads(1)
    evaluate_and_report(workdir)
    four = json.loads((workdir / "metrics" / "four_class.json").read_text())
    assert four["test"]["n"] == 9 and four["test"]["n_unknown"] == 1  # the pneumonia row
    assert set(four["test"]["per_class"]) == set(FOUR_CLASSES)
    assert four["external"]["by_dataset"]["hannover"]["n"] == 3
    binary = json.loads((workdir / "metrics" / "binary.json").read_text())
    # the frozen threshold reproduces its own validation confusion matrix
    thr = binary["threshold"]
    assert thr["val"]["threshold"] == thr["value"]
    assert np.array(thr["val"]["confusion"]).sum() == thr["n"]
    for name in (
        "four_class_confusion.png",
        "four_class_roc.png",
        "binary_reliability.png",
        "four_class_confusion.csv",
    ):
        assert (workdir / "plots" / name).stat().st_size > 0
    assert (workdir / "plots" / "four_class_roc" / "covid.csv").exists()
    # the K-class figures cover the 9 rows of known class, not the pneumonia row
    assert len(pd.read_csv(workdir / "plots" / "four_class_confusion.csv")) == 9
    summary = (workdir / "reports" / "summary.md").read_text()
    assert "study reported" in summary and "External cohort" in summary
    assert "(1 row(s) labelled `pneumonia`, type unknown, left out" in summary
    assert "This run vs reference runs" not in summary  # no --reference given
    card = (workdir / "reports" / "model_card.md").read_text()
    assert "Not a diagnostic device" in card and "not an unseen hospital" in card
    assert "Adult non-COVID test images in this run: normal: rsna 1; pneumonia: nih 1." in card


@pytest.mark.parametrize("external", [0, None], ids=["empty", "missing"])
def test_stage_without_external_rows(tmp_path, external):
    tiny_split(tmp_path / "split", external=external)
    workdir = make_workdir(tmp_path)
    torch.set_num_threads(1)
    evaluate_and_report(workdir)
    assert "external" not in json.loads((workdir / "metrics" / "four_class.json").read_text())
    assert "External cohort" not in (workdir / "reports" / "summary.md").read_text()


def test_stage_compares_with_reference_runs(workdir):
    # an old-style reference run: no adult-only or at-threshold keys yet
    run = workdir / "reference" / "no_adult_controls"
    run.mkdir(parents=True)
    (run / "binary.json").write_text(json.dumps({"test": {"accuracy": 0.75}}))
    (run / "four_class.json").write_text(json.dumps({"test": {}}))
    (run / "run.yaml").write_text(yaml.safe_dump({"name": "pediatric controls only",
        "description": "before adult controls", "command": "dvc exp run -S split.adult_controls=false"}))  # fmt: skip
    torch.set_num_threads(1)
    evaluate_and_report(workdir, "--reference", str(workdir / "reference"))
    for doc in ("summary.md", "model_card.md"):
        text = (workdir / "reports" / doc).read_text()
        assert "| metric | model | this run | pediatric controls only |" in text
        assert "| adult-only ROC AUC | binary | " in text
        row = next(
            line for line in text.splitlines() if line.startswith("| test accuracy | binary")
        )
        assert row.endswith("| 75.0% |")  # no CI in the reference file: the point alone
        assert "`dvc exp run -S split.adult_controls=false`" in text


def test_reference_folder_missing_a_file_fails_clearly(workdir, capsys):
    run = workdir / "reference" / "broken"
    run.mkdir(parents=True)
    (run / "binary.json").write_text("{}")
    with pytest.raises(SystemExit):
        evaluate_and_report(workdir, "--reference", str(workdir / "reference"))
    assert "missing four_class.json, run.yaml" in capsys.readouterr().err


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


def test_a_checkpoint_whose_class_order_is_not_the_tasks_is_refused(workdir, capsys):
    """Labels are numbered in the task's order, probability columns come in the checkpoint's:
    a checkpoint listing its classes in another order would have every metric pair a label
    with another class's probability. Watched red before the fix: the stage wrote
    metrics/binary.json for this checkpoint, p(non_covid) scored as p(covid)."""
    checkpoint(workdir / "binary.pt", "binary", names=["covid", "non_covid"])
    with pytest.raises(SystemExit) as exc:
        stage.main(argv(workdir))
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "binary.pt: class order ['covid', 'non_covid'] is not the binary task's " in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert not (workdir / "metrics" / "binary.json").exists()
    four = scored("val", table(LABELS), np.eye(4).tolist(), "four_class")
    splits = {"val": four, "test": four, "adult_check": four}
    with pytest.raises(CheckpointError, match="class order"):  # the library refuses it too
        evaluate_task("four_class", LABELS[::-1], splits, repo_params("evaluate", bootstrap=5), 0)


def ci(point: float, low: float, high: float) -> dict:
    return {"point": point, "low": low, "high": high, "n_valid": 10}


def test_reference_table_by_hand_with_missing_keys():
    this = {
        "binary": {
            "adult_check": {"at_threshold": {"call_rate": ci(0.1, 0.05, 0.2)}},
            "test": {"accuracy": 0.9, "ci": {"accuracy": ci(0.9, 0.8, 0.95)}},
        },
        "four_class": {"test": {"adult_only": {"roc_auc": ci(0.6, 0.5, 0.7)}}},
    }
    old = {"name": "no | controls", "description": "old run", "command": "dvc exp run",
           "binary": {"adult_check": {"covid_call_rate": 0.8}, "test": {"accuracy": 0.7}},
           "four_class": {}}  # fmt: skip
    lines = report.reference_lines(this, [old])
    assert "| metric | model | this run | no / controls |" in lines  # a | would split the cell
    assert (
        "| adult_check called COVID-19, at threshold | binary | 10.0% [5.0%, 20.0%] | n/a |"
        in lines
    )
    assert "| test accuracy | binary | 90.0% [80.0%, 95.0%] | 70.0% |" in lines
    assert "| adult-only ROC AUC | four-class | 60.0% [50.0%, 70.0%] | n/a |" in lines
    assert "| test macro F1 | four-class | n/a | n/a |" in lines
    assert len([line for line in lines if line.startswith("|")]) == 2 + len(report.REFERENCE_ROWS)
    assert "- **no | controls**: old run (`dvc exp run`)" in lines
    assert report.reference_lines(this, []) == []


def test_read_reference_runs(tmp_path):
    run = tmp_path / "b_run"
    run.mkdir()
    (run / "binary.json").write_text('{"task": "binary"}')
    (run / "four_class.json").write_text('{"task": "four_class"}')
    (run / "run.yaml").write_text("description: d\ncommand: c\n")
    (tmp_path / "README.md").write_text("files beside the run folders are ignored")
    (runs,) = report.read_reference_runs(tmp_path)
    assert runs["name"] == "b_run"  # no name key: the folder's name
    assert (runs["description"], runs["command"]) == ("d", "c")
    assert runs["four_class"] == {"task": "four_class"}
    with pytest.raises(FileNotFoundError, match="not a folder"):
        report.read_reference_runs(tmp_path / "nothing")


def test_report_sections_from_the_hand_worked_example(four):
    # the same numbers serve as the binary model's, less the key only four-class has
    binary = copy.deepcopy(four)
    del binary["test"]["pneumonia"]["viral_or_bacterial_rate"]
    results = {"binary": binary, "four_class": four}
    adult = report.adult_only_lines(results)
    assert adult[0].startswith("Adult test images only: 3 COVID-19 vs 4 adult non-COVID")
    assert "covid: hannover 1, ieee8023 2; normal: rsna 2; pneumonia: nih 2" in adult[0]
    auc = next(line for line in adult if line.startswith("| ROC AUC"))
    assert auc.startswith("| ROC AUC of p(COVID-19) | 66.7% [")
    sens = next(line for line in adult if line.startswith("| sensitivity, at threshold"))
    assert sens.startswith("| sensitivity, at threshold | 33.3% [")
    pneu = report.pneumonia_lines(results)
    row = next(line for line in pneu if line.startswith("| called viral or bacterial"))
    assert row.startswith("| called viral or bacterial, argmax | - | 50.0% [")
    assert report.external_lines(results) == []  # no external split in this example
    assert report.controls_line(results).startswith("Adult non-COVID test images in this run")
    no_controls = {"four_class": {"test": {"adult_only": {"n_by_source": {"covid": {"x": 1}}}}}}
    assert "age alone can separate" in report.controls_line(no_controls)


def test_validation_summary_by_hand_adult_auc_ignores_children():
    """p(covid): covid 0.9, 0.4; rsna adult normal 0.6; Kermany child normal 0.05, viral 0.1.
    Adults only: 0.9 > 0.6, 0.4 < 0.6 -> AUC 1/2 (all rows would give 5/6: children are easy).
    Argmax: [covid, non, covid, non, non] vs truth [covid, covid, non, non, non]:
    F1 covid 1/2, non-COVID 2*2 / (2*2 + 1 + 1) = 2/3 -> macro 7/12; accuracy 3/5."""
    from cxr.evaluate import validation_summary

    sources = [("ieee8023", "adult"), ("ieee8023", "adult"), ("rsna", "adult"),
               ("kermany", "pediatric"), ("kermany", "pediatric")]  # fmt: skip
    t = table(["covid", "covid", "normal", "normal", "viral"], sources=sources)
    covid = np.array([0.9, 0.4, 0.6, 0.05, 0.1])
    val = scored("val", t, np.stack([1 - covid, covid], axis=1).tolist(), "binary")
    summary = validation_summary(val, list(BINARY_CLASSES))
    assert summary["adult_n"] == 3 and summary["n"] == 5
    assert summary["adult_roc_auc"] == pytest.approx(0.5)
    assert summary["macro_f1"] == pytest.approx(7 / 12)
    assert summary["accuracy"] == pytest.approx(3 / 5)


def test_evaluate_alone_writes_no_reports(workdir):
    """Scoring a model does not depend on the reports or on reference runs (issue 20): the
    reports are the report stage's. Watched red with evaluate creating a reports/ folder again."""
    torch.set_num_threads(1)
    stage.main(argv(workdir))
    assert (workdir / "metrics" / "binary.json").exists()
    assert not (workdir / "reports").exists()


def test_report_stage_before_evaluate_fails_clearly(workdir, capsys):
    """Watched red with the metrics read without the existence check (a traceback)."""
    with pytest.raises(SystemExit):
        report_stage.main(report_argv(workdir))
    err = capsys.readouterr().err
    assert "binary.json not found: run the evaluate stage first" in err
    assert "Traceback" not in err


def oos_point_for(params: Path, threshold: float, **recipe_changes) -> dict:
    """An operating_point.json as stages/oos_report.py writes it, for the recipe in `params`
    (with `recipe_changes`, e.g. train_binary={"epochs": 2}, as a run with oos.epochs 2)."""
    from cxr.oos_params import recipe

    raw = yaml.safe_load(params.read_text())
    point = {"threshold": threshold, "rule": "smallest p(COVID-19) ...", "n_negatives": 40,
             "recipe": recipe(raw, None)}  # fmt: skip
    for section, changes in recipe_changes.items():
        point["recipe"][section] |= changes
    return point


def test_the_oos_operating_point_sets_the_binary_threshold_only(workdir):
    """evaluate.operating_point: oos gives the binary model (and so predict's bundle) the
    out-of-source threshold; the four-class model keeps its validation one. Watched red with
    the point ignored (the binary threshold stayed Youden's)."""
    torch.set_num_threads(1)
    params = workdir / "params.yaml"
    write_params(params, base={"seed": 1, "image_size": 32},
                 evaluate={"bootstrap": 20, "operating_point": "oos"})  # fmt: skip
    point = workdir / "operating_point.json"
    point.write_text(json.dumps(oos_point_for(params, 0.4242)))
    stage.main([*argv(workdir), "--operating-point", str(point)])
    binary = json.loads((workdir / "metrics" / "binary.json").read_text())
    four = json.loads((workdir / "metrics" / "four_class.json").read_text())
    assert binary["threshold"]["value"] == pytest.approx(0.4242)
    assert binary["threshold"]["method"] == "oos" and binary["threshold"]["n"] == 40
    assert binary["threshold"]["val"]["threshold"] == pytest.approx(0.4242)  # where it lands
    assert four["threshold"]["method"] == "youden"
    bundle = json.loads((workdir / "bundle.json").read_text())
    assert bundle["threshold"] == pytest.approx(0.4242)
    assert "out-of-source" in bundle["threshold_source"]


def test_an_oos_operating_point_of_another_recipe_is_refused(workdir, capsys):
    """A threshold measured on 2-epoch fold models is not given to an 8-epoch model, and a
    missing file says how to make it. Watched red with the recipe check removed."""
    params = workdir / "params.yaml"
    write_params(params, base={"seed": 1, "image_size": 32},
                 evaluate={"bootstrap": 20, "operating_point": "oos"})  # fmt: skip
    point = workdir / "operating_point.json"
    epochs = yaml.safe_load(params.read_text())["train_binary"]["epochs"]
    point.write_text(json.dumps(oos_point_for(params, 0.4, train_binary={"epochs": epochs + 1})))
    with pytest.raises(SystemExit):
        stage.main([*argv(workdir), "--operating-point", str(point)])
    err = capsys.readouterr().err
    assert f"train_binary.epochs: {epochs + 1} there, {epochs} here" in err
    assert "dvc repro oos/dvc.yaml" in err
    assert not (workdir / "metrics" / "binary.json").exists()
    with pytest.raises(SystemExit):
        stage.main([*argv(workdir), "--operating-point", str(workdir / "none.json")])
    assert "does not exist" in capsys.readouterr().err


def test_model_card_counts_typed_adult_films_from_the_split_counts() -> None:
    """The card's "validated on children only" line quotes metrics/data.json, not numbers
    written into the code. Watched red with the old hard-coded "46 ... 27"."""
    from cxr.report import typed_adults

    counts = {
        "train": {
            "viral": {"ieee8023": {"adult": 3}},
            "bacterial": {"x": {"adult": 2, "pediatric": 9}},
        },
        "val": {"viral": {"ieee8023": {"adult": 1}}},
        "test": {"normal": {"rsna": {"adult": 50}}},
    }
    assert typed_adults(counts) == "6 typed adult films in all splits, 5 of them in train"


def test_model_card_names_the_unknown_type_stratum_only_when_the_model_drew_it() -> None:
    """The card's "adult films called viral" line: the count from metrics/data.json, and only for
    a four-class model that drew the pneumonia films as a class of their own."""
    from cxr.report import unknown_type_stratum

    counts = {"train": {"pneumonia": {"nih": {"adult": 7}}}}
    params = {"partial_labels": True, "balance": "oversample", "balance_by": ["class"]}
    meta = {"params": params, "class_names": ["covid", "viral", "bacterial", "normal"]}
    (line,) = unknown_type_stratum(meta, counts)
    assert "draws 1/5 of its training from 7 NIH pneumonia films" in line
    for change in ({"partial_labels": False}, {"balance": "none"},
                   {"balance_by": ["class", "age_group"]}):  # fmt: skip
        assert unknown_type_stratum(meta | {"params": params | change}, counts) == []
    assert unknown_type_stratum(meta, {"train": {}}) == []


def test_stage_takes_an_ensemble_manifest_wherever_a_checkpoint_goes(workdir):
    """A model that is a list of checkpoints (cxr.ensemble) is scored like one checkpoint: one
    member without views gives the checkpoint's metrics exactly; two members give the metrics
    of their mean probability. Watched red with evaluate loading the first member only."""
    from cxr.ensemble import load_model, write_manifest

    torch.set_num_threads(1)
    stage.main(argv(workdir))
    single = (workdir / "metrics" / "binary.json").read_text()
    write_manifest(workdir / "one.json", [workdir / "binary.pt"], [])
    stage.main(argv(workdir, binary="one.json"))
    assert (workdir / "metrics" / "binary.json").read_text() == single

    second = build_model("resnet18", 2)  # another seed's member
    meta = torch.load(workdir / "binary.pt", weights_only=True)["meta"]
    save_checkpoint(workdir / "binary_2.pt", second, meta)
    write_manifest(workdir / "two.json", [workdir / "binary.pt", workdir / "binary_2.pt"], [])
    stage.main(argv(workdir, binary="two.json"))
    got = json.loads((workdir / "metrics" / "binary.json").read_text())
    from cxr.arrays import load_split
    from cxr.infer import predict_proba

    x, table = load_split(workdir / "split", "test")
    prob = predict_proba(load_model(workdir / "two.json")[0], np.asarray(x))
    y = labels_for(table, "binary")
    accuracy = float(np.mean(prob.argmax(1) == y))
    assert got["test"]["accuracy"] == pytest.approx(accuracy)
    assert (workdir / "metrics" / "binary.json").read_text() != single


def test_an_oos_recipe_recorded_before_later_train_keys_still_matches(tmp_path):
    """A recorded recipe without the train keys added since (input_size, adversary*) meant
    their defaults: accepted for today's params; a changed value is refused. Watched red
    (session 20) with the recorded sections compared as they are."""
    from cxr.evaluate import load_oos_point
    from cxr.params import ParamsError
    from tests.conftest import PARAMS

    params = yaml.safe_load(PARAMS.read_text())
    recipe = {s: dict(params[s]) for s in ("base", "split", "train_binary")}
    for key in ("input_size", "adversary", "adversary_by", "adversary_within"):
        recipe["train_binary"].pop(key)
    path = tmp_path / "operating_point.json"
    path.write_text(json.dumps({"threshold": 0.5, "recipe": recipe}))
    assert load_oos_point(path, params)["threshold"] == 0.5
    recipe["train_binary"]["adversary"] = 1.0  # a head the params do not have
    path.write_text(json.dumps({"threshold": 0.5, "recipe": recipe}))
    with pytest.raises(ParamsError, match="train_binary.adversary"):
        load_oos_point(path, params)
