"""Patient-grouped stratified splitting and the leakage guard."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxr.splits import LeakageError, check_no_leakage, split_table
from tests.conftest import repo_params


def make_table(n_groups: int = 120, seed: int = 0) -> pd.DataFrame:
    """Groups of 1-3 images, four labels, two datasets, like the real manifest."""
    rng = np.random.default_rng(seed)
    rows = []
    labels = ["covid", "viral", "bacterial", "normal"]
    for g in range(n_groups):
        label = labels[g % 4]
        dataset = "ieee8023" if label == "covid" or g % 10 == 0 else "kermany"
        for i in range(rng.integers(1, 4)):
            rows.append(
                {"group_id": f"g{g}", "label": label, "dataset": dataset, "sha256": f"{g}-{i}"}
            )
    return pd.DataFrame(rows)


def split(table: pd.DataFrame, **kw) -> pd.DataFrame:
    args = dict(group_by="patient", val_fraction=0.2, test_fraction=0.2, seed=7) | kw
    return table.assign(split=split_table(table, **args))


def test_no_group_crosses_splits_and_guard_agrees():
    out = split(make_table())
    assert (out.groupby("group_id")["split"].nunique() == 1).all()
    check_no_leakage(out)  # does not raise


def test_fractions_and_stratification():
    out = split(make_table(200))
    share = out["split"].value_counts(normalize=True)
    assert abs(share["test"] - 0.2) < 0.06 and abs(share["val"] - 0.2) < 0.06
    per_label = pd.crosstab(out["label"], out["split"], normalize="index")
    # every class is in every split at about the right share
    assert (per_label["test"] > 0.1).all() and (per_label["test"] < 0.3).all()
    assert (per_label["train"] > 0.5).all()


def test_same_seed_same_split_other_seed_other_split():
    table = make_table()
    a, b, c = split(table), split(table), split(table, seed=8)
    assert a["split"].tolist() == b["split"].tolist()
    assert a["split"].tolist() != c["split"].tolist()


def test_image_mode_lets_patients_cross():
    table = make_table(200)
    out = split(table, group_by="image")
    assert (out.groupby("group_id")["split"].nunique() > 1).any()
    with pytest.raises(LeakageError, match="group_id"):
        check_no_leakage(out)
    check_no_leakage(out, check_groups=False)  # identical files still may not cross


def test_guard_catches_a_duplicate_file_in_two_splits():
    table = pd.DataFrame(
        {"group_id": ["a", "b"], "sha256": ["same", "same"], "split": ["train", "test"]}
    )
    with pytest.raises(LeakageError, match="sha256"):
        check_no_leakage(table, check_groups=False)


def test_bad_params_are_refused():
    with pytest.raises(ValueError, match="group_by"):
        split(make_table(), group_by="hospital")
    with pytest.raises(ValueError, match="fractions"):
        split(make_table(), val_fraction=0.6, test_fraction=0.5)


def test_external_datasets_leave_the_main_pool_and_a_typo_is_refused(tmp_path):
    from cxr.params import ParamsError
    from stages.split import all_rows

    pd.DataFrame({
        "path": ["a", "b", "c", "d"], "dataset": ["hannover", "ieee8023", "nih", "hannover"],
        "cohort": ["main", "main", "adult_check", "main"], "label": ["covid", "covid", "normal", "covid"],
    }).to_csv(tmp_path / "manifest.csv", index=False)  # fmt: skip
    pd.DataFrame({"path": ["case00"], "label": ["covid"]}).to_csv(
        tmp_path / "cases.csv", index=False
    )
    rows = all_rows(tmp_path, repo_params("split", external=["hannover"]))
    assert rows["cohort"].tolist() == ["external", "main", "adult_check", "external", "cases"]
    assert all_rows(tmp_path, repo_params("split", external=[]))["cohort"].tolist()[:2] == [
        "main",
        "main",
    ]
    with pytest.raises(ParamsError, match="hanover"):
        all_rows(tmp_path, repo_params("split", external=["hanover"]))


def _assign_external(tmp_path, **params):
    """all_rows + duplicate resolution + assign, on a hand-made manifest (no images needed)."""
    from cxr.splits import resolve_duplicates
    from stages.split import all_rows, assign

    hmh = "Hannover Medical School, Hannover, Germany"
    rows = [  # path, dataset, group, location, country
        ("h1", "hannover", "g1", hmh, "Germany"),
        ("i1", "ieee8023", "g1", "Rome, Italy", "Italy"),  # g1's other film: another place
        ("i2", "ieee8023", "g2", hmh, "Germany"),  # the hospital, under another dataset name
        ("i3", "ieee8023", "g3", "Rome, Italy", "Italy"),
    ] + [(f"k{i}", "kermany", f"k{i}", "Guangzhou", "China") for i in range(20)]
    pd.DataFrame({
        "path": [r[0] for r in rows], "dataset": [r[1] for r in rows],
        "group_id": [r[2] for r in rows], "location": [r[3] for r in rows],
        "country": [r[4] for r in rows], "cohort": "main", "sha256": [r[0] for r in rows],
        "label": ["covid"] * 4 + ["normal"] * 20,
    }).to_csv(tmp_path / "manifest.csv", index=False)  # fmt: skip
    pd.DataFrame({"path": ["case00"], "label": ["covid"]}).to_csv(
        tmp_path / "cases.csv", index=False
    )
    p = repo_params("split", **{"external": [], "external_places": []} | params)
    table = all_rows(tmp_path, p)
    table, forced, _ = resolve_duplicates(table, [], set())
    return assign(table, forced, p, seed=0).set_index("path")["split"]


def test_external_moves_whole_patient_groups_and_whole_places(tmp_path):
    """Watched red before the fix: with external=[hannover], i1 (g1's ieee8023 film) stayed in the
    main pool, and Hannover's ieee8023 film i2 was never held out."""
    split = _assign_external(tmp_path, external=["hannover"])
    assert split["h1"] == split["i1"] == "external"  # the whole patient group
    assert split["i2"] != "external" and split["i3"] != "external"
    split = _assign_external(
        tmp_path, external_places=["Hannover Medical School, Hannover, Germany"]
    )
    assert split["h1"] == split["i1"] == split["i2"] == "external"
    assert split["i3"] != "external"
    split = _assign_external(tmp_path, external_places=["Italy"])  # a country holds out its films
    assert split["i1"] == split["i3"] == split["h1"] == "external"  # h1: i1's patient


def test_an_unknown_place_is_refused(tmp_path):
    from cxr.params import ParamsError

    with pytest.raises(ParamsError, match="Hanover"):
        _assign_external(tmp_path, external_places=["Hanover"])


def test_the_leakage_check_covers_external():
    """A group in train and external is a leak (watched red: the stage checked train/val/test)."""
    from cxr.errors import LeakageError
    from stages.split import check_leakage

    table = pd.DataFrame({"split": ["train", "external"], "group_id": ["g1", "g1"],
                          "sha256": ["a", "b"]})  # fmt: skip
    with pytest.raises(LeakageError):
        check_leakage(table, [], repo_params("split", external=[]))
