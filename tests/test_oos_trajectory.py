"""Out-of-source AUC epoch by epoch (cxr/oos_trajectory.py, stages/oos_trajectory.py).

Checked by hand (each bug made in the code, this file went red, then the code was restored):
- every epoch scored with the kept model (scores taken after training): test_a_traced_fold_*;
- the callback not passed on by cxr.oos.fit (nothing traced): test_a_traced_fold_*;
- the loss rule keeping the highest loss: test_each_rule_keeps_its_epoch_*;
- a traced fold trained again on a second call: test_a_traced_fold_*;
- a weight-averaged recipe traced (its plain weights scored): test_a_weight_averaged_*.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxr.arrays import save_split
from cxr.config import load_base, load_train_params
from cxr.oos import pool_table, run_fold
from cxr.oos_params import load_oos_params
from cxr.oos_trajectory import read_fold_csv, summarise, write_fold_csv
from tests.conftest import write_params

ROWS = [  # label, age group, dataset, location, country
    ("covid", "adult", "ieee8023", "Rome, Italy", "Italy"),
    ("covid", "adult", "ieee8023", "Madrid, Spain", "Spain"),
    ("covid", "adult", "ieee8023", "Madrid, Spain", "Spain"),
    ("normal", "adult", "rsna", "NIH", "USA"),
    ("normal", "pediatric", "kermany", "Guangzhou", "China"),
    ("viral", "pediatric", "kermany", "Guangzhou", "China"),
    ("pneumonia", "adult", "nih", "NIH", "USA"),
    ("normal", "adult", "rsna", "NIH", "USA"),
]


def toy_pool(folder):
    rng = np.random.default_rng(0)
    for k, name in enumerate(("train", "val", "test")):
        table = pd.DataFrame(ROWS * 2, columns=["label", "age_group", "dataset", "location",
                                                "country"])  # fmt: skip
        table.insert(0, "path", [f"{name}{i}.png" for i in range(len(table))])
        table["group_id"] = [f"g{k}{i}" for i in range(len(table))]
        save_split(folder, name, rng.integers(0, 256, (len(table), 32, 32), dtype=np.uint8), table)


def test_a_traced_fold_scores_every_epoch_and_trains_as_the_fold_stage(tmp_path, monkeypatch):
    from stages import oos_trajectory

    data = tmp_path / "split"
    toy_pool(data)
    params = write_params(tmp_path / "params.yaml", base={"image_size": 32, "crop": "none"},
                          train_binary={"epochs": 3, "batch_size": 4, "threads": 1},
                          oos={"tasks": ["binary"], "folds": [
                              {"name": "r", "locations": ["Rome, Italy"], "datasets": ["nih"]}]})  # fmt: skip
    out = tmp_path / "trajectory"
    argv = [
        "--params",
        str(params),
        "--data",
        str(data),
        "--lungs",
        str(tmp_path),
        "--out",
        str(out),
    ]
    oos_trajectory.main(argv)
    traced = read_fold_csv(out / "r.csv")
    wide = pd.read_csv(out / "r.csv")  # one row per film, one score column per epoch
    assert len(wide) == 8 and [c for c in wide if c.startswith("p_covid")] == [
        "p_covid_epoch1", "p_covid_epoch2", "p_covid_epoch3"]  # fmt: skip
    summary = (out / "r.json").read_text()
    assert sorted(traced["epoch"].unique()) == [1, 2, 3]
    # The fold stage's own run, untraced: the same films, and the kept epoch's scores are its.
    images, table = pool_table(data, 32)
    fold = load_oos_params(params).folds[0]
    frame, plain = run_fold(images, table, fold, {"binary": load_train_params(params, "train_binary")},
                            load_base(params))  # fmt: skip
    kept = plain["binary"]["best_epoch"]
    assert f'"best_epoch": {kept}' in summary  # tracing changed nothing the training saw
    at = {e: g.reset_index(drop=True) for e, g in traced.groupby("epoch")}
    held = frame[frame["scored_as"] == "held_out"].reset_index(drop=True)
    assert len(held) == 8 and (traced["scored_as"] == "held_out").all()
    assert at[kept]["path"].tolist() == held["path"].tolist()
    np.testing.assert_allclose(at[kept]["p_covid"], held["p_covid"], atol=1e-5)
    # ... and the other epochs were scored by their own weights, not the kept ones.
    for e in {1, 2, 3} - {kept}:
        assert not np.allclose(at[e]["p_covid"], held["p_covid"], atol=1e-4)
    report = (out / "trajectory.md").read_text()
    assert "| 3 |" in report and "lowest validation loss" in report
    # A second call finds the fold traced and only rewrites the report.
    monkeypatch.setattr(oos_trajectory, "trace_fold", lambda *a: pytest.fail("traced again"))
    (out / "trajectory.md").unlink()
    oos_trajectory.main(argv)
    assert (out / "trajectory.md").read_text() == report


def test_a_weight_averaged_recipe_is_refused_by_name(tmp_path, capsys):
    from stages import oos_trajectory

    params = write_params(tmp_path / "params.yaml", train_binary={"average_epochs": 2})
    with pytest.raises(SystemExit):
        oos_trajectory.main(["--params", str(params), "--out", str(tmp_path / "out")])
    assert "train_binary.average_epochs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_each_rule_keeps_its_epoch_and_pools_the_folds_at_it():
    """Two folds, three epochs; held-out adult films only count (a child and an internal-val
    film are scored the other way round and must change nothing)."""

    def fold(scores: dict[int, list[float]]) -> pd.DataFrame:
        rows = []
        for epoch, s in scores.items():
            for k, (label, p) in enumerate(zip(["covid", "covid", "normal", "normal"], s,
                                               strict=True)):  # fmt: skip
                rows.append({"path": f"f{k}", "label": label, "age_group": "adult",
                             "group_id": f"g{k}", "scored_as": "held_out", "epoch": epoch,
                             "p_covid": p})  # fmt: skip
            rows.append(
                {
                    "path": "child",
                    "label": "normal",
                    "age_group": "pediatric",
                    "group_id": "c",
                    "scored_as": "held_out",
                    "epoch": epoch,
                    "p_covid": 1.0,
                }
            )
            rows.append(
                {
                    "path": "val",
                    "label": "covid",
                    "age_group": "adult",
                    "group_id": "v",
                    "scored_as": "internal_val",
                    "epoch": epoch,
                    "p_covid": 0.0,
                }
            )
        return pd.DataFrame(rows)

    frames = {
        "a": fold({1: [0.9, 0.8, 0.1, 0.2], 2: [0.9, 0.1, 0.8, 0.2], 3: [0.1, 0.2, 0.9, 0.8]}),
        "b": fold({1: [0.6, 0.7, 0.3, 0.4], 2: [0.6, 0.3, 0.7, 0.2], 3: [0.3, 0.4, 0.6, 0.7]}),
    }
    summaries = {
        name: {"binary": {"best_epoch": best}, "epochs": [
            {"epoch": e, "val_loss": loss, "val_macro_f1": f1}
            for e, loss, f1 in zip([1, 2, 3], losses, f1s, strict=True)]}
        for name, best, losses, f1s in [("a", 2, [0.5, 0.4, 0.3], [0.6, 0.9, 0.8]),
                                        ("b", 3, [0.2, 0.4, 0.6], [0.6, 0.7, 0.9])]
    }  # fmt: skip
    result = summarise(frames, summaries)
    assert [row["folds"] for row in result["per_epoch"]] == [
        {"a": 1.0, "b": 1.0},
        {"a": 0.5, "b": 0.5},
        {"a": 0.0, "b": 0.0},
    ]
    # Pooled at epoch 1: fold a's negatives (0.1, 0.2) sit below fold b's positives (0.6, 0.7).
    assert result["per_epoch"][0]["pooled"] == 1.0
    rules = result["rules"]
    assert rules["val_macro_f1"]["epochs"] == {"a": 2, "b": 3} == result["kept"]
    assert rules["val_loss"]["epochs"] == {"a": 3, "b": 1}
    assert rules["last"]["epochs"] == {"a": 3, "b": 3}
    assert rules["hindsight"]["epochs"] == {"a": 1, "b": 1}
    assert rules["hindsight"]["pooled"] == 1.0 and rules["last"]["pooled"] == 0.0
    # val_loss: fold a at epoch 3 (its positives 0.1, 0.2 lowest), fold b at epoch 1:
    # positives 0.1 0.2 0.6 0.7 against negatives 0.9 0.8 0.3 0.4 -> 4 of 16 pairs right.
    assert rules["val_loss"]["pooled"] == pytest.approx(4 / 16)


def test_a_fold_file_keeps_each_epochs_scores_and_refuses_other_films(tmp_path):
    films = pd.DataFrame({"path": ["a.png", "b.png"], "label": ["covid", "normal"],
                          "age_group": "adult", "group_id": ["g1", "g2"], "scored_as": "held_out"})  # fmt: skip
    long = pd.concat([films.assign(epoch=e, p_covid=[0.1 * e, 0.2 * e]) for e in (1, 2, 3)],
                     ignore_index=True)  # fmt: skip
    write_fold_csv(long, tmp_path / "f.csv")
    back = read_fold_csv(tmp_path / "f.csv")
    pd.testing.assert_frame_equal(back, long[back.columns], check_exact=False, atol=1e-6)
    # Epoch 2 scored the films in another order: its scores would land on the wrong films.
    swapped = long.copy()
    swapped.loc[[2, 3], "path"] = ["b.png", "a.png"]
    with pytest.raises(ValueError, match="epoch 2"):
        write_fold_csv(swapped, tmp_path / "g.csv")
