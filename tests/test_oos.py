"""Out-of-source validation: fold membership, operating points and pooled metrics (cxr/oos.py, cxr/oos_report.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cxr.oos import held_out
from cxr.oos_params import Fold, folds_from_params
from cxr.oos_report import (
    markdown,
    report,
    sens_at_spec,
    spec_at_sens,
    threshold_at_specificity,
)
from cxr.params import ParamsError


def _pool() -> pd.DataFrame:
    return pd.DataFrame({
        "path": ["a", "b", "c", "d", "e"],
        "dataset": ["hannover", "ieee8023", "ieee8023", "rsna", "kermany"],
        "group_id": ["g1", "g1", "g2", "g3", "g4"],
        "location": ["HMS", "Rome, Italy", "Rome, Italy", "NIH", "Guangzhou"],
        "country": ["Germany", "Italy", "Italy", "USA", "China"],
    })  # fmt: skip


def test_a_fold_holds_out_its_places_datasets_and_their_whole_patient_groups():
    """Watched red with the group closure removed: b (g1's second film, taken in Rome) stayed in."""
    assert held_out(_pool(), Fold("h", [], ["HMS"], [])).tolist() == [
        True,
        True,
        False,
        False,
        False,
    ]
    assert held_out(_pool(), Fold("r", [], [], ["rsna"])).tolist() == [
        False,
        False,
        False,
        True,
        False,
    ]
    assert held_out(_pool(), Fold("i", ["Italy"], [], [])).tolist() == [
        True,
        True,
        True,
        False,
        False,
    ]
    with pytest.raises(ParamsError, match="Hanover"):
        held_out(_pool(), Fold("typo", [], ["Hanover"], []))


def test_fold_params_are_checked():
    assert folds_from_params([{"name": "a", "locations": ["x"]}])[0] == Fold("a", [], ["x"], [])
    for bad in ([], [{"name": "a"}, {"name": "a"}], [{"name": "a", "place": ["x"]}]):
        with pytest.raises(ParamsError):
            folds_from_params(bad)


def test_threshold_at_specificity_calls_the_requested_share_negative():
    neg = np.arange(1, 11) / 10.0  # 0.1 .. 1.0
    t = threshold_at_specificity(neg, 0.9)
    assert np.mean(neg < t) == pytest.approx(0.9)  # 9 of 10 below, the 10th (1.0) above
    assert 0.9 < t <= 1.0
    assert np.mean(neg < threshold_at_specificity(neg, 0.85)) == pytest.approx(0.9)  # ceil
    assert np.mean(neg < threshold_at_specificity(neg, 1.0)) == 1.0


def test_operating_points_on_a_hand_computed_example():
    # 10 negatives 0.1..1.0, positives 0.95, 0.5, 0.05: threshold for 90% spec is just above 0.9
    y = np.array([0] * 10 + [1, 1, 1])
    s = np.r_[np.arange(1, 11) / 10.0, 0.95, 0.5, 0.05]
    assert sens_at_spec(y, s, 0.9) == pytest.approx(1 / 3)
    # 90% sensitivity of 3 positives needs all 3: threshold 0.05, no negative below it
    assert spec_at_sens(y, s, 0.9) == 0.0
    assert spec_at_sens(y, s, 0.6) == pytest.approx(0.4)  # two positives: t = 0.5, 4 below


def test_report_pools_folds_and_keeps_children_out_of_the_binary_numbers():
    rng = np.random.default_rng(0)
    rows = []
    for fold in ("f1", "f2"):
        for i in range(40):
            covid = i % 2 == 0
            rows.append(
                {
                    "fold": fold,
                    "group_id": f"{fold}{i}",
                    "age_group": "adult",
                    "label": "covid" if covid else "normal",
                    "p_covid": rng.uniform(0.5, 1) if covid else rng.uniform(0, 0.6),
                    "call4": "covid" if covid else ("normal" if i % 4 == 1 else "viral"),
                }
            )
    # children scored high would wreck the adult AUC if they were counted
    rows += [{"fold": "f1", "group_id": f"k{i}", "age_group": "pediatric", "label": "normal",
              "p_covid": 0.99, "call4": "normal"} for i in range(20)]  # fmt: skip
    # the fold's own validation films: reported beside, never used for the threshold
    rows += [{"fold": "f1", "group_id": f"v{i}", "age_group": "adult", "label": "normal",
              "p_covid": 0.999, "call4": "normal", "scored_as": "internal_val"}
             for i in range(30)]  # fmt: skip
    frame = pd.DataFrame(rows)
    frame["scored_as"] = frame["scored_as"].fillna("held_out")
    result = report(frame, specificity=0.9, n_boot=50, seed=0)
    assert result["folds"]["f1"]["internal_val"]["n"] == 30
    assert result["operating_point"]["n_negatives"] == 40
    pooled = result["pooled"]["binary"]
    assert pooled["n_covid"] == 40 and pooled["n_non_covid"] == 40
    assert pooled["roc_auc"]["low"] <= pooled["roc_auc"]["point"] <= pooled["roc_auc"]["high"]
    assert pooled["roc_auc"]["point"] > 0.9
    assert pooled["at_threshold"]["specificity"] >= 0.9
    assert result["pooled"]["four_class"]["adult_normal"]["normal"] == pytest.approx(0.5)
    assert set(result["folds"]) == {"f1", "f2"}
    page = markdown(result, {"tasks": ["binary"], "epochs": 2})
    auc = pooled["roc_auc"]
    assert f"{auc['point']:.3f} [{auc['low']:.3f}, {auc['high']:.3f}]" in next(
        line for line in page.splitlines() if line.startswith("| **pooled")
    )
    assert "fold f1 (internal val)" in page


def test_non_covid_films_are_broken_down_by_finding_within_each_fold():
    """A fold's AUC mixes its negatives; the by-finding rows say which ones look like COVID-19.
    Watched red with `by_finding` comparing against every fold's COVID-19 films."""
    frame = pd.DataFrame({
        "fold": ["w"] * 6 + ["e"] * 4,
        "group_id": [f"g{i}" for i in range(10)],
        "age_group": ["adult"] * 9 + ["pediatric"],
        "label": ["covid", "covid", "viral", "viral", "normal", "normal",
                  "covid", "normal", "normal", "normal"],
        "finding": ["COVID-19", "COVID-19", "SARS", "SARS", "No Finding", "No Finding",
                    "COVID-19", "No Finding", "No Finding", "No Finding"],
        # SARS outscores the fold's COVID-19 films; "No Finding" does not
        "p_covid": [0.6, 0.7, 0.9, 0.8, 0.1, 0.2, 0.3, 0.1, 0.65, 0.99],
        "scored_as": "held_out",
    })  # fmt: skip
    rows = {(r["fold"], r["finding"]): r for r in
            report(frame, specificity=0.5, n_boot=10, seed=0)["non_covid_by_finding"]}  # fmt: skip
    assert set(rows) == {("w", "SARS"), ("w", "No Finding"), ("e", "No Finding")}  # adults only
    assert rows[("w", "SARS")]["roc_auc_vs_fold_covid"] == 0.0
    assert rows[("w", "No Finding")]["roc_auc_vs_fold_covid"] == 1.0
    assert rows[("e", "No Finding")]["n"] == 2
    assert rows[("e", "No Finding")]["roc_auc_vs_fold_covid"] == 0.5  # vs e's 0.3 only
    assert rows[("w", "SARS")]["called_covid"] == 1.0


def test_four_class_folds_alone_report_call_rates_and_no_operating_point():
    """oos.tasks: [four_class] (no p_covid column): the adult call rates, pooled and per fold;
    no COVID-19 threshold is made up. Watched red with the binary path taken regardless."""
    frame = pd.DataFrame({
        "fold": ["e"] * 5 + ["w"] * 3,
        "group_id": [f"g{i}" for i in range(8)],
        "age_group": ["adult"] * 7 + ["pediatric"],
        "label": ["normal"] * 4 + ["covid", "normal", "normal", "normal"],
        "call4": ["normal", "viral", "viral", "normal", "covid", "bacterial", "normal", "viral"],
        "scored_as": ["held_out"] * 7 + ["held_out"],
    })  # fmt: skip
    result = report(frame, specificity=0.9, n_boot=10, seed=0)
    assert result["operating_point"] is None and "binary" not in result["pooled"]
    normal = result["pooled"]["four_class"]["adult_normal"]
    assert normal["n"] == 6 and normal["normal"] == pytest.approx(3 / 6)  # the child is left out
    assert normal["viral"] == pytest.approx(2 / 6, abs=1e-4)  # rounded to 4 places
    assert result["folds"]["w"]["four_class"]["adult_normal"]["bacterial"] == pytest.approx(0.5)
    page = markdown(result, {"tasks": ["four_class"], "epochs": None})
    assert "| pooled: adult normal | 6 | 0.0% | 33.3% | 16.7% | 50.0% |" in page
    assert "| fold e: adult normal | 4 |" in page and "Binary" not in page


def test_oos_params_are_checked(tmp_path):
    """Watched red with the epochs check removed: epochs 0 was accepted."""
    import yaml

    from cxr.oos_params import load_oos_params

    params = yaml.safe_load(Path("params.yaml").read_text())
    assert load_oos_params("params.yaml").folds
    for key, bad in (("epochs", 0), ("specificity", 1.5), ("tasks", ["bianry"])):
        changed = {**params, "oos": {**params["oos"], key: bad}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(changed))
        with pytest.raises(ParamsError, match=f"oos.{key}"):
            load_oos_params(tmp_path / "params.yaml")


def test_saved_models_are_scored_on_a_folds_films_like_a_trained_fold(tmp_path, capsys):
    """stages/oos_score.py: a kept fold model (or an ensemble/TTA manifest of it) scored on the
    fold's held-out and internal-validation films, in the fold stage's CSV format. Watched red
    with the test-split rows scored too."""
    import torch

    from cxr.arrays import save_split
    from cxr.config import load_base, load_split_params, preprocessing
    from cxr.infer import predict_proba
    from cxr.models import build_model, save_checkpoint
    from stages import oos_score
    from tests.conftest import write_params

    rng = np.random.default_rng(0)
    data = tmp_path / "split"
    for k, name in enumerate(("train", "val", "test")):
        table = pd.DataFrame({
            "path": [f"{name}{i}.png" for i in range(4)],
            "dataset": ["rsna", "kermany", "rsna", "ieee8023"],
            "location": ["NIH", "Guangzhou", "NIH", "Rome, Italy"],
            "country": ["USA", "China", "USA", "Italy"],
            "label": ["normal", "viral", "normal", "covid"],
            "age_group": ["adult", "pediatric", "adult", "adult"],
            "group_id": [f"g{k}{i}" for i in range(4)],
        })  # fmt: skip
        save_split(data, name, rng.integers(0, 256, (4, 32, 32), dtype=np.uint8), table)
    params = write_params(tmp_path / "params.yaml", base={"image_size": 32, "crop": "none"},
                          oos={"tasks": ["four_class"], "folds": [{"name": "r", "datasets": ["rsna"]}]})  # fmt: skip
    spec = preprocessing(load_base(params), load_split_params(params)).to_dict()
    names = ["covid", "viral", "bacterial", "normal"]
    torch.manual_seed(0)
    model = build_model("resnet18", 4, zero_init_residual=False)
    ckpt = tmp_path / "r_four_class.pt"
    save_checkpoint(ckpt, model, {"task": "four_class", "arch": "resnet18", "class_names": names,
                                  "image_size": 32, "preprocessing": spec})  # fmt: skip
    argv = ["--fold", "r", "--params", str(params), "--data", str(data), "--lungs", str(tmp_path),
            "--four-class", str(ckpt), "--out", str(tmp_path / "out")]  # fmt: skip
    oos_score.main(argv)
    frame = pd.read_csv(tmp_path / "out" / "r.csv")
    # rsna rows of train and val are held out and scored; val's others are internal; test never
    assert frame["path"].tolist() == ["train0.png", "train2.png", "val0.png", "val1.png",
                                      "val2.png", "val3.png"]  # fmt: skip
    assert frame["scored_as"].tolist() == ["held_out"] * 2 + ["held_out", "internal_val"] * 2
    from cxr.arrays import load_split

    x = np.concatenate([load_split(data, "train")[0][[0, 2]], load_split(data, "val")[0]])
    want = predict_proba(model.eval(), x)
    np.testing.assert_allclose(frame[[f"p4_{c}" for c in names]].to_numpy(), want, atol=1e-5)
    assert frame["call4"].tolist() == [names[k] for k in want.argmax(1)]
    # --adapt-bn: the held-out films by the model adapted to them alone, the others as they were
    from cxr.adapt import adapt_batchnorm

    oos_score.main([*argv[:-2], "--out", str(tmp_path / "adapted"), "--adapt-bn"])
    adapted = pd.read_csv(tmp_path / "adapted" / "r.csv")[[f"p4_{c}" for c in names]].to_numpy()
    held = (frame["scored_as"] == "held_out").to_numpy()
    np.testing.assert_allclose(adapted[held], predict_proba(adapt_batchnorm(model, x[held]), x[held]),
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(adapted[~held], want[~held], atol=1e-5)
    assert not np.allclose(adapted[held], want[held], atol=1e-3)

    other = write_params(tmp_path / "p2.yaml", base={"image_size": 32, "crop": "none"},
                         split={"jpeg_quality": 90}, oos={"folds": [{"name": "r", "datasets": ["rsna"]}]})  # fmt: skip
    with pytest.raises(SystemExit):
        oos_score.main([*argv[:2], "--params", str(other), *argv[4:]])
    assert "trained with preprocessing" in capsys.readouterr().err


# --- the run scripts' reading of params.yaml (cxr/oos_runs.py, oos/*.sh) ----------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_plan_lists_the_folds_and_tasks_of_a_run(tmp_path):
    from cxr.oos_runs import plan, with_seed

    assert plan(ROOT / "params.yaml") == "hannover,europe,world binary"
    with_seed(ROOT / "params.yaml", 43, tmp_path / "run" / "params.yaml")
    import yaml

    seeded = yaml.safe_load((tmp_path / "run" / "params.yaml").read_text())
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert seeded["base"]["seed"] == 43
    assert seeded | {"base": committed["base"]} == committed  # nothing else changed


def test_a_candidate_with_a_bad_params_file_stops_with_one_line(tmp_path):
    """Watched red with the script's old inline reading (a KeyError traceback)."""
    import subprocess

    text = (ROOT / "params.yaml").read_text().replace("- name: hannover", "- nmae: hannover")
    (tmp_path / "params.yaml").write_text(text)
    done = subprocess.run(["bash", str(ROOT / "oos/candidate.sh"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "error: oos.folds[0]: keys are name, countries, locations, datasets" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "folds").exists()


def test_a_split_of_another_size_than_the_params_is_refused(tmp_path):
    """The fold stages read the default split; params of another image_size must not train on
    it under their name (RULE.md thirteenth amendment: the size128 runs were 112 px). Watched
    red with the size check removed (the 32 px arrays pooled for 48 px params)."""
    from cxr.arrays import save_split
    from cxr.errors import InputError
    from cxr.oos import pool_table

    table = pd.DataFrame({"path": ["a.png", "b.png"], "location": ["NIH", "Rome, Italy"],
                          "label": ["normal", "covid"]})  # fmt: skip
    for name in ("train", "val", "test"):
        save_split(tmp_path, name, np.zeros((2, 32, 32), dtype=np.uint8), table)
    images, pooled = pool_table(tmp_path, 32)
    assert (
        images.shape == (6, 32, 32)
        and pooled["origin"].tolist() == ["train"] * 2 + ["val"] * 2 + ["test"] * 2
    )
    with pytest.raises(InputError, match="train.npy holds 32 px arrays but base.image_size is 48"):
        pool_table(tmp_path, 48)


def test_the_report_reads_a_committed_runs_packed_fold_files(tmp_path):
    """Committed runs keep `<fold>.csv.gz` (oos/candidate.sh); the report stage reads them as
    the plain files it was made from: hflip_off's committed results, to float noise. Watched
    red with fold_file returning the plain name only."""
    from stages import oos_report

    run = Path("reports/oos/candidates/hflip_off")
    assert not list((run / "folds").glob("*.csv")) and list((run / "folds").glob("*.csv.gz"))
    oos_report.main(["--params", str(run / "params.yaml"), "--folds", str(run / "folds"),
                     "--out", str(tmp_path)])  # fmt: skip
    ours = json.loads((tmp_path / "results.json").read_text())
    committed = json.loads((run / "results.json").read_text())

    def numbers(tree, path=""):
        if isinstance(tree, dict):
            return {
                k: v for key, sub in tree.items() for k, v in numbers(sub, f"{path}.{key}").items()
            }
        if isinstance(tree, list):
            return {
                k: v for i, sub in enumerate(tree) for k, v in numbers(sub, f"{path}[{i}]").items()
            }
        return {path: tree}

    a, b = numbers(ours), numbers(committed)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float) and isinstance(b[key], float):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key
        else:
            assert a[key] == b[key], key


def test_a_missing_fold_file_is_named(tmp_path, capsys):
    from stages import oos_report

    run = Path("reports/oos/candidates/hflip_off")
    with pytest.raises(SystemExit):
        oos_report.main(["--params", str(run / "params.yaml"), "--folds", str(tmp_path),
                         "--out", str(tmp_path / "out")])  # fmt: skip
    assert "no predictions for fold(s)" in capsys.readouterr().err


def test_pack_replaces_the_plain_fold_files_and_the_report_still_reads_them(tmp_path):
    """`--pack` (oos/candidate.sh and the other run scripts) leaves `<fold>.csv.gz` only, the
    same rows, and twice the same bytes; a report made again from them is the same report.
    Watched red with pack keeping the time in the header."""
    import gzip
    import time

    from cxr.oos_report import pack
    from stages import oos_report

    run = Path("reports/oos/candidates/hflip_off")
    folds = tmp_path / "folds"
    folds.mkdir()
    for packed in (run / "folds").glob("*.csv.gz"):
        (folds / packed.name[:-3]).write_bytes(gzip.decompress(packed.read_bytes()))
    plain = {p.name: p.read_bytes() for p in folds.glob("*.csv")}
    # A few bootstrap resamples: the two reports are compared with each other, not with the
    # committed one, and 1,000 made this the suite's slowest unit test.
    params = yaml.safe_load((run / "params.yaml").read_text())
    params["oos"]["bootstrap"] = 20
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    argv = ["--params", str(tmp_path / "params.yaml"), "--folds", str(folds)]
    oos_report.main([*argv, "--out", str(tmp_path / "a"), "--pack"])
    assert not list(folds.glob("*.csv")) and len(list(folds.glob("*.csv.gz"))) == len(plain) == 3
    for name, data in plain.items():
        assert gzip.decompress((folds / f"{name}.gz").read_bytes()) == data
    oos_report.main([*argv, "--out", str(tmp_path / "b")])
    assert (tmp_path / "a" / "results.json").read_text() == (
        tmp_path / "b" / "results.json"
    ).read_text()
    # Packed again from the same rows: the same bytes (no time in the header).
    first = (folds / "world.csv.gz").read_bytes()
    (folds / "world.csv").write_bytes(plain["world.csv"])
    (folds / "world.csv.gz").unlink()
    time.sleep(1.1)  # a header with the time in it would differ now
    assert pack(folds / "world.csv").read_bytes() == first


def test_mean_covid_scores_averages_the_two_models_film_by_film():
    from cxr.oos_report import mean_covid_scores

    binary = pd.DataFrame({
        "path": ["a", "b", "c"], "scored_as": ["held_out", "held_out", "internal_val"],
        "label": ["covid", "normal", "covid"], "p_covid": [0.9, 0.2, 0.4],
    })  # fmt: skip
    four = pd.DataFrame({
        "path": ["c", "b", "a"], "scored_as": ["internal_val", "held_out", "held_out"],
        "p4_covid": [0.0, 0.6, 0.5], "p4_viral": [1.0, 0.4, 0.5], "p4_bacterial": 0.0,
        "p4_normal": 0.0, "call4": ["viral", "covid", "covid"],
    })  # fmt: skip
    out = mean_covid_scores(binary, four)
    assert list(out["path"]) == ["a", "b", "c"]  # the binary file's order, rows matched by film
    np.testing.assert_allclose(out["p_covid"], [0.7, 0.4, 0.2])
    assert list(out["call4"]) == ["covid", "covid", "viral"]
    with pytest.raises(ValueError, match="do not score the same films"):
        mean_covid_scores(binary, four.iloc[:2])
    with pytest.raises(ValueError, match="do not score the same films"):
        mean_covid_scores(binary, four.assign(path=["c", "b", "x"]))
    # Another binary model's fold file (RULE.md fifty-first): its p_covid, nothing else added.
    other = binary.assign(p_covid=[0.5, 0.6, 0.0]).iloc[::-1]
    both = mean_covid_scores(binary, other)
    assert list(both.columns) == list(binary.columns) and list(both["path"]) == ["a", "b", "c"]
    np.testing.assert_allclose(both["p_covid"], [0.7, 0.4, 0.2])


def test_largest_difference_compares_the_same_films_column_by_column():
    """Watched red with the films matched by row order instead of by path."""
    from cxr.oos_report import largest_difference

    before = pd.DataFrame({"path": ["a", "b"], "scored_as": ["held_out", "held_out"],
                           "p_covid": [0.5, 0.25]})  # fmt: skip
    scored = before.iloc[::-1].assign(p_covid=[0.25, 0.5 + 1e-6])  # the same films, reordered
    assert largest_difference(scored, before, ["p_covid"]) == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="do not score the same films"):
        largest_difference(scored.iloc[:1], before, ["p_covid"])


def _prior_normal():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prior_normal", "oos/prior_normal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_normal_prior_shifts_only_the_normal_call_and_finds_the_smallest_shift():
    """oos/prior_normal.py (RULE.md, fifty-fourth amendment). Watched red with the shift
    applied to p(covid) instead of p(normal)."""
    pn = _prior_normal()
    p = np.array([[0.5, 0.3, 0.1, 0.1], [0.1, 0.6, 0.1, 0.2], [0.2, 0.2, 0.2, 0.4]])
    assert list(pn.shifted_calls(p, 0.0)) == ["covid", "viral", "normal"]
    assert list(pn.shifted_calls(p, np.log(3.1))) == [
        "covid",
        "normal",
        "normal",
    ]  # 0.2 x 3.1 > 0.6
    assert list(pn.shifted_calls(p, np.log(5.1))) == ["normal", "normal", "normal"]
    # ten held-out adult normals, p(normal) / the best other class = 1/2 for seven of them
    rows = [[0.0, 0.5, 0.25, 0.25]] * 7 + [[0.0, 0.95, 0.04, 0.01]] * 3
    fold = pd.DataFrame(rows, columns=[f"p4_{c}" for c in pn.ORDER]).assign(
        scored_as="held_out", age_group="adult", label="normal")  # fmt: skip
    assert pn.smallest_shift(fold) == 0.7  # the first grid point with e^b > 2 (ln 2 = 0.693)


def test_the_committed_normal_prior_report_comes_from_the_committed_fold_files(tmp_path):
    """reports/oos/prior_normal.json, quoted in docs/candidates.md, regenerates exactly."""
    pn = _prior_normal()
    pn.main(["--out", str(tmp_path / "p.json")])
    committed = json.loads(Path("reports/oos/prior_normal.json").read_text())
    assert json.loads((tmp_path / "p.json").read_text()) == committed


def test_average_sh_regenerates_a_committed_ensemble(tmp_path: Path) -> None:
    """oos/average.sh, the fifty-first and fifty-fifth amendments' averaging, run into a temporary
    folder with ensemble_resnet34's params: the committed results.json again, byte for byte; the
    folds come from those params. Watched red with the fold list cut to its first fold."""
    import os
    import shutil
    import subprocess
    import sys

    committed = ROOT / "reports/oos/candidates/ensemble_resnet34"
    shutil.copy(committed / "params.yaml", tmp_path / "params.yaml")
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    members = ["reports/oos/candidates/default_zen5", "reports/oos/candidates/resnet34"]
    child = subprocess.run(["bash", "oos/average.sh", str(tmp_path), *members], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert child.returncode == 0, child.stderr
    assert (tmp_path / "results.json").read_bytes() == (committed / "results.json").read_bytes()
