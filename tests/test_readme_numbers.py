"""README.md and docs/*.md quote committed metrics only through generated blocks, kept in step.

Every block between `<!-- metrics:start NAME -->` and `<!-- metrics:end NAME -->` must equal what
cxr/readme_numbers.py renders from the committed metrics/*.json, reports/reference/*/,
metrics/data.json and params.yaml. A re-run that changes a metric, committed without
`python -m cxr.readme_numbers --write`, fails here instead of leaving a stale number behind.

Checked by hand: changing the README headline's binary test accuracy from "97.4% [96.4, 98.2]" to
"97.5% [96.4, 98.2]" turned test_every_block_matches_the_committed_files red (the diff named
README.md and the row); `--write` put it back and the test passed. Changing the 0.4835 threshold
in a copy of metrics/binary.json turns test_a_changed_metric_leaves_the_documents_stale's
documents stale, which is what that test asserts.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr import readme_numbers as rn

ROOT = Path(__file__).resolve().parents[1]


def test_every_block_matches_the_committed_files():
    stale = rn.stale(ROOT)
    assert not stale, (
        "metric blocks differ from what metrics/ and reports/ give now; run `python -m "
        "cxr.readme_numbers --write` and commit the documents with the metrics:\n"
        + "\n\n".join(stale.values())
    )


def test_every_block_is_used_and_the_headline_is_in_the_readme():
    used = rn.used_blocks(ROOT)
    assert not [name for name, where in used.items() if not where], f"blocks no page shows: {used}"
    assert used["headline"] == ["README.md"]


def copy_committed_files(tmp_path: Path) -> Path:
    """What the blocks read, in a folder of its own, to change without touching the repo. The
    candidates' kept fold models (`models/`, not in git, 2 GB in a working tree that ran them)
    are left out: no block reads them, and a copy per test filled the disk."""
    for folder in ("metrics", "reports"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("models"))
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def test_a_changed_metric_leaves_the_documents_stale(tmp_path):
    files_root = copy_committed_files(tmp_path)
    path = files_root / "metrics" / "binary.json"
    metrics = json.loads(path.read_text())
    metrics["threshold"]["value"] = 0.1234
    accuracy = metrics["test"]["ci"]["accuracy"]
    accuracy["point"] = 0.5
    path.write_text(json.dumps(metrics))

    stale = rn.stale(ROOT, rn.Files(files_root))
    assert "README.md" in stale
    interval = f"[{100 * accuracy['low']:.1f}, {100 * accuracy['high']:.1f}]"  # the CI unchanged
    # the threshold sentence quotes it whichever way it was chosen (validation or out-of-source)
    assert "0.123" in stale["README.md"] and f"50.0% {interval}" in stale["README.md"]


def test_a_new_growth_run_leaves_scaling_out_stale(tmp_path):
    """The growth table in docs/scaling-out.md is python -m cxr growth's reports/growth.json.
    (Watched red with the growth block reading the repository's reports/growth.json instead of
    the Files root's: nothing went stale.)"""
    path = copy_committed_files(tmp_path) / "reports" / "growth.json"
    before = rn.stale(ROOT, rn.Files(tmp_path))
    report = json.loads(path.read_text())
    report["sizes"][0]["near_duplicate_s"] = 123.456
    path.write_text(json.dumps(report))
    stale = rn.stale(ROOT, rn.Files(tmp_path))
    assert "docs/scaling-out.md" not in before
    assert set(stale) - set(before) == {"docs/scaling-out.md"}
    assert "| 123.46 |" in stale["docs/scaling-out.md"]


def test_a_hand_edit_inside_a_block_is_caught_and_rewritten(tmp_path):
    root = copy_committed_files(tmp_path)
    readme = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- metrics:start headline -->.*?<!-- metrics:end headline -->", readme, re.S
    )
    assert block is not None
    edited = readme.replace(
        block[0], block[0].replace("| accuracy (argmax) | ", "| accuracy (argmax) | 1"), 1
    )
    assert edited != readme
    (root / "README.md").write_text(edited)
    (root / "docs").mkdir()

    assert list(rn.stale(root)) == ["README.md"]
    assert rn.write(root) == ["README.md"]
    assert (root / "README.md").read_text() == readme
    assert rn.stale(root) == {}


@pytest.mark.parametrize(
    "text, message",
    [
        ("<!-- metrics:start nonsense -->\n<!-- metrics:end nonsense -->", "unknown metrics block"),
        ("<!-- metrics:start headline -->\nno end", "has no"),
        (
            "<!-- metrics:start headline -->\n<!-- metrics:start targets -->\n"
            "<!-- metrics:end targets -->\n<!-- metrics:end headline -->",
            "opens another",
        ),
    ],
)
def test_broken_markers_are_refused(text, message):
    with pytest.raises(rn.BlockError, match=message):
        rn.render(text, rn.Files(ROOT))


def test_a_block_in_a_list_item_keeps_its_indent():
    text = "- item\n  <!-- metrics:start per-class-f1 -->\n  old\n  <!-- metrics:end per-class-f1 -->\n"
    lines = rn.render(text, rn.Files(ROOT)).split("\n")
    body = lines[2 : lines.index("  <!-- metrics:end per-class-f1 -->")]
    assert body and all(line.startswith("  Four-class") or line.startswith("  ") for line in body)
    assert all(len(line) <= rn.WIDTH for line in body)


def numbers(text: str) -> set[str]:
    """Decimal numbers and percentages (e.g. 0.976, 97.6%), the way metrics are quoted."""
    return set(re.findall(r"(?<![\w.])\d+\.\d+%?", text))


def outside_blocks(text: str) -> str:
    return re.sub(
        r"<!-- metrics:start ([a-z0-9-]+) -->.*?<!-- metrics:end \1 -->", "", text, flags=re.S
    )


def test_the_readme_quotes_no_headline_metric_by_hand():
    """No number written twice: a value of the headline block must not be typed out again
    elsewhere in the README, where no generator would keep it in step."""
    readme = (ROOT / "README.md").read_text()
    headline = re.search(
        r"<!-- metrics:start headline -->(.*?)<!-- metrics:end headline -->", readme, re.S
    )
    assert headline is not None
    repeated = numbers(headline[1]) & numbers(outside_blocks(readme))
    assert not repeated, (
        f"README quotes these headline numbers outside the block: {sorted(repeated)}"
    )


def test_the_readme_image_count_is_the_source_lists():
    """The one data count the README writes by hand (the setup comment) is sources.csv's."""
    rows = len(pd.read_csv(ROOT / "data" / "sources" / "sources.csv"))
    readme = (ROOT / "README.md").read_text()
    quoted = re.search(r"default data \(([\d,]+) images", readme)
    assert quoted is not None and int(quoted[1].replace(",", "")) == rows


def test_a_new_gate_report_leaves_the_readme_stale(tmp_path):
    """The gate's detection rates in the README are reports/ood.json's (issue 22). Watched red
    with the block reading the repository's reports/ood.json instead of the Files root's."""
    path = copy_committed_files(tmp_path) / "reports" / "ood.json"
    report = json.loads(path.read_text())
    first = next(k for k in report["probes"] if k != "identity")
    report["probes"][first]["flagged_rate"] = 0.123
    path.write_text(json.dumps(report))
    stale = rn.stale(ROOT, rn.Files(tmp_path))
    assert "README.md" in stale and "| 12.3% |" in stale["README.md"]


@pytest.mark.parametrize("name", ["metrics/ood.json", "reports/ood_lung_shape_val.json"])
def test_new_gate_numbers_leave_docs_ood_stale(tmp_path, name):
    """docs/ood.md's numbers are blocks rendered from the gate's files, not prose (issue 19).
    Watched red with ood_committed reading a hard-coded threshold."""
    path = copy_committed_files(tmp_path) / name
    data = json.loads(path.read_text())
    if name.startswith("metrics"):
        data["threshold"] = 12.345
        expected = "12.35"
    else:
        data["real_films"]["all"]["flagged"] = 77
        expected = "flag 77 of"
    path.write_text(json.dumps(data))
    stale = rn.stale(ROOT, rn.Files(tmp_path))
    assert expected in stale.get("docs/ood.md", ""), stale.keys()


def test_four_class_folds_are_quoted_only_for_the_committed_recipe(tmp_path):
    """The headline's four-class out-of-source cell and issue 18's target row read
    reports/oos/four_class/ only when its params.yaml has the committed base/split/
    train_four_class; another recipe's rate must not stand beside the committed models.
    (Watched red with the recipe check removed: the changed run was still quoted.)"""
    import yaml

    root = copy_committed_files(tmp_path)
    four = rn.oos_four_class(rn.Files(root))
    assert four is not None and four["folds"] == ["europe"]
    assert rn.pct(four["normal"]) in rn.four_class_oos_text(rn.Files(root))
    run = root / "reports" / "oos" / "four_class" / "params.yaml"
    params = yaml.safe_load(run.read_text())
    # written before input_size existed: the key's absence means null, the committed value
    assert "input_size" not in params["train_four_class"]
    params["train_four_class"]["input_size"] = 96
    run.write_text(yaml.safe_dump(params))
    assert rn.oos_four_class(rn.Files(root)) is None
    params["train_four_class"]["input_size"] = None
    run.write_text(yaml.safe_dump(params))
    assert rn.oos_four_class(rn.Files(root)) is not None
    params["train_four_class"]["epochs"] = 2
    run.write_text(yaml.safe_dump(params))
    assert rn.oos_four_class(rn.Files(root)) is None
    assert "not run" in rn.oos_row(rn.Files(root), "link")[2]


def test_seed_ensemble_table_reads_each_run_and_the_committed_fold(tmp_path):
    """docs/validation.md's seed table: one row per seed folder, the ensemble, the first seed's
    test-time views, and the Zen 1 default run's numbers for the same fold (not its pooled ones):
    the seed models are 112 px ones. Watched red with the row taken from the pooled results."""
    root = copy_committed_files(tmp_path)
    committed = json.loads((root / rn.OOS_ZEN1 / "results.json").read_text())
    europe = committed["folds"]["europe"]
    seeds = root / "reports" / "oos" / "seeds"
    shutil.rmtree(seeds, ignore_errors=True)

    def write(folder: Path, auc: float) -> None:
        binary = json.loads(json.dumps(europe["binary"])) | {"roc_auc": {
            "point": auc, "low": auc - 0.05, "high": auc + 0.03}}  # fmt: skip
        folder.mkdir(parents=True)
        result = {"pooled": {"binary": binary, "four_class": {}}, "folds": {"europe": europe}}
        (folder / "results.json").write_text(json.dumps(result))

    for folder, auc in (("seed42", 0.911), ("seed43", 0.922), ("ensemble", 0.933),
                        ("seed42/tta/gamma", 0.944)):  # fmt: skip
        write(seeds / folder, auc)
    lines = rn.oos_seeds(rn.Files(root))
    labels = [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]
    assert labels == ["default run, Zen 1 (fold europe)", "seed 42", "seed 43",
                      "ensemble of seeds 42 + 43", "seed 42 + TTA `gamma`"]  # fmt: skip
    assert rn.ci3(europe["binary"]["roc_auc"]) in lines[2]
    assert all(
        f"{a:.3f} [" in line
        for a, line in zip((0.911, 0.922, 0.933, 0.944), lines[3:], strict=True)
    )


def test_normal_cutoff_table_counts_each_group_at_each_cutoff(tmp_path):
    """Watched red with the cut-off taken one film further down the sorted p(normal)."""
    folds = tmp_path / rn.OOS_FOUR_CLASS / "folds"
    folds.mkdir(parents=True)
    films = [("normal", p, "viral") for p in (0.9, 0.8, 0.4, 0.3, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02)]
    films += [("covid", 0.35, "covid"), ("covid", 0.01, "covid"), ("bacterial", 0.25, "viral")]
    header = "label,age_group,scored_as,p4_normal,call4\n"
    lines = [f"{label},adult,held_out,{p},{call}" for label, p, call in films]
    lines.append("normal,adult,internal_val,0.99,normal")  # the fold's own val film: left out
    (folds / "europe.csv").write_text(header + "\n".join(lines) + "\n")
    rows = rn.oos_normal_cutoff(rn.Files(tmp_path))
    assert rows[0].startswith("| rule") and "adult normal (10)" in rows[0]
    assert "adult COVID-19 (2)" in rows[0] and "adult pneumonia (1)" in rows[0]
    assert rows[2] == "| as called now (the largest probability) | 0.0% | 0.0% | 0.0% |"
    # 30% of 10 normals: the 3rd largest p(normal), 0.4: no COVID-19 film reaches it
    assert rows[3] == "| p(normal) >= 0.4000 (calls 30% of the normals) | 30.0% | 0.0% | 0.0% |"
    assert rows[4] == "| p(normal) >= 0.2000 (calls 50% of the normals) | 50.0% | 50.0% | 100.0% |"
    assert rows[5] == "| p(normal) >= 0.0500 (calls 70% of the normals) | 70.0% | 50.0% | 100.0% |"


def test_default_recipe_candidate_is_judged_only_with_every_fold(tmp_path):
    """Against the Zen 1 default run it was measured beside. Watched red with the verdict given
    on one fold."""
    root = copy_committed_files(tmp_path)
    committed = json.loads((root / rn.OOS_ZEN1 / "results.json").read_text())
    folder = root / "reports/oos/candidates/robust_default"
    folder.mkdir(parents=True, exist_ok=True)

    def better(b: dict, by: float) -> dict:
        return b | {"roc_auc": b["roc_auc"] | {"point": b["roc_auc"]["point"] + by}}

    one = {"folds": {"europe": {"binary": better(committed["folds"]["europe"]["binary"], 0.05)}}}
    (folder / "results.json").write_text(json.dumps(one))
    rows = rn.oos_candidates_default_recipe(rn.Files(root))
    assert len(rows) == 3 and rows[2].startswith("| robust_default: fold europe |")
    assert "| +0.050 |" in rows[2] and rows[2].endswith("| - |")
    every = {"folds": {k: {"binary": better(v["binary"], 0.005)}
                       for k, v in committed["folds"].items()},
             "pooled": {"binary": better(committed["pooled"]["binary"], 0.005)}}  # fmt: skip
    (folder / "results.json").write_text(json.dumps(every))
    rows = rn.oos_candidates_default_recipe(rn.Files(root))
    assert len(rows) == 2 + len(committed["folds"]) + 1
    assert "pooled" in rows[-1] and "| +0.005 |" in rows[-1]
    assert rows[-1].endswith("| keep default |")


def test_rank_auc_is_sklearns_roc_auc_with_ties():
    """Watched red with ties counted as wins."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 6, 40).tolist(), rng.integers(0, 4, 70).tolist()  # many ties
    expected = roc_auc_score([1] * len(pos) + [0] * len(neg), pos + neg)
    assert rn.rank_auc(pos, neg) == pytest.approx(expected, abs=1e-12)


def test_two_seed_rule_needs_the_mean_gain_and_every_seed():
    """Watched red with the every-seed condition dropped (the second case adopted)."""
    default = {42: 0.87, 43: 0.90}
    assert rn.two_seed_verdict({42: 0.89, 43: 0.92}, default).startswith("adopt (mean +0.020")
    # one seed that is not higher decides it; one that is higher decides nothing yet
    assert rn.two_seed_verdict({42: 0.86}, default) == (
        "keep default (not higher in seed 42: 0.860 vs 0.870; the rule needs it higher in every seed)"
    )
    assert rn.two_seed_verdict({42: 0.95}, default).startswith("not decided")
    # a larger mean gain carried by one seed, lower in the other: kept
    assert rn.two_seed_verdict({42: 0.93, 43: 0.89}, default).startswith("keep default")
    assert rn.two_seed_verdict({42: 0.875, 43: 0.905}, default).startswith("keep default")
    assert rn.two_seed_verdict({42: 0.95}, default).startswith("not decided")
    assert rn.two_seed_verdict({42: 0.95, 43: 0.95}, {42: 0.87}).startswith("not decided")


def test_no_loss_rule_for_a_cheaper_recipe():
    """Watched red with the worst-seed condition dropped (the second case adopted), and with
    the one-seed early decision dropped (the last case "not decided")."""
    default = {42: 0.87, 43: 0.90}
    assert rn.no_loss_verdict({42: 0.865, 43: 0.89}, default).startswith("adopt (no loss)")
    # the mean within 0.01 but one seed 0.03 lower: kept
    assert rn.no_loss_verdict({42: 0.89, 43: 0.87}, default).startswith("keep default")
    assert rn.no_loss_verdict({42: 0.85, 43: 0.885}, default).startswith("keep default")
    assert rn.no_loss_verdict({42: 0.95}, default).startswith("not decided")
    assert rn.no_loss_verdict({42: 0.86}, default).startswith("not decided")  # 0.01 below: wait
    # one seed more than 0.02 below decides it without the other
    assert rn.no_loss_verdict({42: 0.84}, default).startswith(
        "keep default (seed 42: 0.840 vs 0.870"
    )


def write_fold_csv(path: Path, covid: list[float], other: list[float]) -> None:
    """A fold's held-out adult predictions, plus an internal-val film that must be left out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["label,age_group,scored_as,p_covid"]
    lines += [f"covid,adult,held_out,{p}" for p in covid]
    lines += [f"normal,adult,held_out,{p}" for p in other]
    lines.append("normal,adult,internal_val,0.99")
    path.write_text("\n".join(lines) + "\n")


def test_two_seed_table_pools_each_seed_on_its_own_folds(tmp_path):
    """Watched red with every fold of a run pooled before all of them had run."""
    (tmp_path / "params.yaml").write_text("oos:\n  folds:\n  - name: a\n  - name: b\n")
    runs = rn.OOS_SEED_RUNS
    write_fold_csv(tmp_path / runs["default_zen1"][42] / "folds/a.csv", [0.9, 0.8], [0.1, 0.85])
    write_fold_csv(tmp_path / runs["default_zen1"][42] / "folds/b.csv", [0.6], [0.7, 0.2])
    write_fold_csv(tmp_path / runs["robust_default"][42] / "folds/a.csv", [0.9, 0.8], [0.1, 0.2])
    rows = rn.oos_two_seeds(rn.Files(tmp_path))
    # fold a: 3 of 4 pairs; fold b: 1 of 2; pooled: (0.9, 0.8, 0.6) vs (0.1, 0.85, 0.7, 0.2): 9/12
    assert rows[2] == "| default_zen1 | 42 | 0.750 | 0.500 | 0.750 |"
    assert rows[3] == "| robust_default | 42 | 1.000 | not run | - |"
    verdicts = [r for r in rows if r.startswith("Rule")]
    assert len(verdicts) == len(rn.TWO_SEED_CANDIDATES)
    assert all(v.endswith("not decided (needs every fold of two seeds of both).") for v in verdicts)
    write_fold_csv(tmp_path / runs["robust_default"][42] / "folds/b.csv", [0.6], [0.7, 0.2])
    for config in runs:
        for fold in "ab":
            write_fold_csv(tmp_path / runs[config][43] / f"folds/{fold}.csv", [0.9], [0.1])
    rows = rn.oos_two_seeds(rn.Files(tmp_path))
    assert "| **default_zen1** | mean |  |  | **0.875** |" in rows
    robust = next(r for r in rows if "robust_default against" in r)
    assert robust.endswith(
        "robust_default against default_zen1: keep default (mean +0.083; higher in 1 of 2 seeds)."
    )


def test_two_seed_candidate_with_folds_to_run_is_shown_fold_by_fold(tmp_path):
    """A candidate still training: each finished fold beside the default's same fold and seed,
    undecided. Watched red with the seed-42 default set beside a seed-43 fold."""
    (tmp_path / "params.yaml").write_text("oos:\n  folds:\n  - name: a\n  - name: b\n")
    runs = rn.OOS_SEED_RUNS
    baseline = rn.TWO_SEED_CANDIDATES["crop_lungs"][2]  # the default on the crop's CPU kind
    for seed, p in ((42, 0.2), (43, 0.95)):
        for fold in "ab":
            write_fold_csv(tmp_path / runs[baseline][seed] / f"folds/{fold}.csv", [0.9], [p])
    write_fold_csv(tmp_path / runs["crop_lungs"][43] / "folds/b.csv", [0.9, 0.8], [0.85, 0.1])
    _, pooled = rn.two_seed_pooled(rn.Files(tmp_path))
    measured, cell = rn.two_seed_cells(rn.Files(tmp_path), "crop_lungs", pooled)
    assert measured == "1 of 4 fold runs"
    assert cell == "0.750 vs 0.000 (b, seed 43)"
    committed = tmp_path / "committed"
    # crop_lungs without its committed runs: a candidate with one fold run (written below)
    ignore = shutil.ignore_patterns("models", "crop_lungs*")
    shutil.copytree(ROOT / "reports/oos", committed / "reports/oos", ignore=ignore)
    shutil.copy(ROOT / "params.yaml", committed / "params.yaml")
    write_fold_csv(committed / runs["crop_lungs"][42] / "folds/world.csv", [0.9], [0.1])
    row = next(r for r in rn.oos_choices(rn.Files(committed)) if "predicted lungs" in r)
    assert "| 1 of 6 fold runs | 1.000 vs " in row and "(world, seed 42)" in row
    assert row.endswith("| not decided (needs every fold of two seeds of both) |")


BUDGET_SOURCE_BALANCED = (
    "| source-balanced sampling (class x age group x dataset) |"  # the budget run's row
)


def test_choices_table_keeps_the_default_only_when_a_candidate_is_below_in_every_fold(tmp_path):
    """Watched red with the source-balanced verdict written whatever its folds say."""
    shutil.copytree(
        ROOT / "reports/oos", tmp_path / "reports/oos", ignore=shutil.ignore_patterns("models")
    )
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    row = next(
        r for r in rn.oos_choices(rn.Files(tmp_path)) if r.startswith(BUDGET_SOURCE_BALANCED)
    )
    assert row.endswith("below the default in each: keep default |")
    write_fold_csv(
        tmp_path / "reports/oos/candidates/source_balanced/folds/europe.csv", [0.9], [0.1]
    )
    row = next(
        r for r in rn.oos_choices(rn.Files(tmp_path)) if r.startswith(BUDGET_SOURCE_BALANCED)
    )
    assert "1.000 vs" in row and row.endswith("not decided |")


def test_pooled_auc_splits_into_same_place_and_cross_place_pairs(tmp_path):
    """Two folds each ranked perfectly by its own model, on scales that do not line up: the
    same-place pairs are perfect, the cross-place ones at chance, the pooled AUC between.
    Watched red with the cross-place AUC taken over every pair (the same-place ones included)."""
    (tmp_path / "params.yaml").write_text("oos:\n  folds:\n  - name: a\n  - name: b\n")
    folder = rn.OOS_SEED_RUNS["default_zen1"][42]
    write_fold_csv(tmp_path / folder / "folds/a.csv", [0.9], [0.8])
    write_fold_csv(tmp_path / folder / "folds/b.csv", [0.3], [0.2])
    files = rn.Files(tmp_path)
    csvs = [f"{folder}/folds/{fold}.csv" for fold in "ab"]
    assert rn.pair_split(files, csvs) == (1.0, 0.5, 2, 2, 0.75)
    assert rn.pooled_auc(files, csvs) == 0.75  # (0.9 > 0.8, 0.2; 0.3 > 0.2; 0.3 < 0.8): 3 of 4
    rows = rn.oos_pairs(files)
    assert rows[2] == "| default_zen1 | 42 | 1.000 | 0.500 | 0.750 |"
    assert (
        rows[-1]
        == "Pairs (COVID-19 film, adult non-COVID film): 2 held out in the same fold, 2 in different folds."
    )


def test_the_sars_fold_is_left_out_of_the_second_column_only(tmp_path):
    """Watched red with the SARS fold kept in both columns."""
    (tmp_path / "params.yaml").write_text("oos:\n  folds:\n  - name: a\n  - name: world\n")
    (tmp_path / "reports/oos").mkdir(parents=True)
    (tmp_path / "reports/oos/results.json").write_text(json.dumps({"non_covid_by_finding": [
        {"fold": "a", "finding": "Normal", "n": 9}, {"fold": "world", "finding": "SARS", "n": 1}]}))  # fmt: skip
    folder = rn.OOS_SEED_RUNS["default_zen1"][42]
    write_fold_csv(tmp_path / folder / "folds/a.csv", [0.9], [0.8])
    write_fold_csv(tmp_path / folder / "folds/world.csv", [0.3], [0.95])
    rows = rn.oos_without_sars_fold(rn.Files(tmp_path))
    # every fold: 0.9 beats 0.8 only, 0.3 beats neither: 1 of 4; without world: 1 of 1
    assert rows[2] == "| default_zen1 | 42 | 0.250 | 1.000 |"
    assert rows[-1] == "Fold world's held-out adult non-COVID films (the committed run): 1 SARS."


def test_four_class_calls_add_the_xeon_run_when_it_exists(tmp_path):
    """docs/validation.md's four-class table: the Xeon run of the 112 px recipe (RULE.md
    eleventh and thirteenth amendments) is a row pair of its own, from its own results, and so
    is the run with the adversarial head (twenty-sixth). Watched red with the row read from the
    Zen 1 run's results."""
    root = copy_committed_files(tmp_path)
    folder, adversary = root / rn.OOS_FOUR_CLASS_XEON, root / rn.OOS_FOUR_CLASS_ADVERSARY
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(adversary, ignore_errors=True)
    lines = rn.oos_four_class_calls(rn.Files(root))[2:]
    assert not any("Xeon" in line.split(" | ")[0] for line in lines)
    for where, normal in ((folder, 0.7), (adversary, 0.5)):
        calls = {"adult_normal": {"n": 642, "covid": 0.01, "viral": 0.2, "bacterial": 0.09,
                                  "normal": normal}}  # fmt: skip
        where.mkdir(parents=True)
        (where / "results.json").write_text(json.dumps({"pooled": {"four_class": calls}}))
    rows = [r for r in rn.oos_four_class_calls(rn.Files(root)) if "Xeon" in r]
    assert rows == ["| plain film, Xeon (RULE.md eleventh, thirteenth amendments) | adult normal "
                    "(642) | 70.0% | 20.0% | 9.0% | 1.0% |",
                    "| + source-adversarial head, Xeon (twenty-sixth amendment) | adult normal "
                    "(642) | 50.0% | 20.0% | 9.0% | 1.0% |"]  # fmt: skip


def test_lung_limits_text_says_whether_the_false_flags_are_under_the_1_percent(tmp_path):
    """The sentence follows the committed report (it said "under" at 1.3% once). Watched red
    with "under" written whatever the rate."""

    def write(flagged: int) -> list[str]:
        real = {
            "n": 1000,
            "flagged": flagged,
            "flagged_rate": flagged / 1000,
            "by_reason": {"lungs of implausible size": flagged},
        }
        control = {"n": 150, "flagged": 1, "flagged_rate": 1 / 150}
        report = {
            "real_films": {"all": real},
            "probed_films": 150,
            "probes": {"identity": control, "rotated_90": {"flagged_rate": 1.0}},
        }
        (tmp_path / "reports").mkdir(exist_ok=True)
        (tmp_path / "reports/ood_lung_shape_val.json").write_text(json.dumps(report))
        return rn.ood_lung_limits(rn.Files(tmp_path))

    assert "(0.4%;" in write(4)[0] and ", under the 1% asked for." in write(4)[0]
    assert "(1.3%;" in write(13)[0] and ", **above** the 1% asked for." in write(13)[0]


def test_the_xeon_four_class_fold_is_judged_by_its_own_rate(tmp_path):
    """The headline cell and issue 18's target row give the same fold and recipe trained on the
    Xeon beside the committed (Zen 1) fold, each judged by its own rate. Watched red with the
    Xeon's verdict written as "missed" whatever its rate."""
    root = copy_committed_files(tmp_path)
    results = root / rn.OOS_FOUR_CLASS_XEON / "results.json"
    blob = json.loads(results.read_text())
    blob["pooled"]["four_class"]["adult_normal"]["normal"] = 0.75
    results.write_text(json.dumps(blob))
    assert rn.four_class_oos_text(rn.Files(root)).endswith("; trained on the Xeon: 75.0%)")
    row = next(r for r in rn.new_hospital_targets(rn.Files(root)) if "held-out adult normals" in r)
    assert "; trained on the Xeon 75.0%: met; seeds 42 and 43 on the Zen 5" in row
    results.unlink()
    row = next(r for r in rn.new_hospital_targets(rn.Files(root)) if "held-out adult normals" in r)
    assert "Xeon" not in row and "Xeon" not in rn.four_class_oos_text(rn.Files(root))


def test_the_zen5_four_class_seeds_meet_the_target_only_together(tmp_path):
    """The target row gives the default's two Zen 5 seeds of the europe fold, "met" only when
    both call at least 70% of the held-out adult normals normal."""
    root = copy_committed_files(tmp_path)

    def row_with(seed42: float, seed43: float) -> str:
        for folder, rate in (
            (rn.OOS_FOUR_CLASS_ZEN5, seed42),
            (rn.OOS_FOUR_CLASS_ZEN5_SEED43, seed43),
        ):
            results = root / folder / "results.json"
            blob = json.loads(results.read_text())
            blob["pooled"]["four_class"]["adult_normal"]["normal"] = rate
            results.write_text(json.dumps(blob))
        return next(
            r for r in rn.new_hospital_targets(rn.Files(root)) if "held-out adult normals" in r
        )

    assert row_with(0.03, 0.75).endswith(
        "; seeds 42 and 43 on the Zen 5 3.0% and 75.0%: **missed** |"
    )
    assert row_with(0.71, 0.75).endswith("; seeds 42 and 43 on the Zen 5 71.0% and 75.0%: met |")
    (root / rn.OOS_FOUR_CLASS_ZEN5_SEED43 / "results.json").unlink()  # one seed: not given
    row = next(r for r in rn.new_hospital_targets(rn.Files(root)) if "held-out adult normals" in r)
    assert "Zen 5" not in row and "Xeon" in row


def test_ensemble_verdict_needs_each_member_beaten_and_the_mean_by_a_hundredth():
    """RULE.md seventeenth amendment. Watched red with the verdict taken on the mean alone."""
    assert rn.ensemble_verdict(0.906, [0.905, 0.899]).startswith("keep one model (+0.004")
    assert rn.ensemble_verdict(0.915, [0.905, 0.899]).startswith("better by the rule (+0.013")
    # +0.011 over the mean but below one member: still one model
    assert rn.ensemble_verdict(0.913, [0.92, 0.884]).startswith("keep one model")
    # the mean's bar met, the best member not beaten: the verdict says which condition failed
    assert rn.ensemble_verdict(0.910, [0.911, 0.888, 0.898]) == (
        "keep one model (+0.011 over the members' mean, but not above the best member's 0.911; "
        "the rule needs both)"
    )


def test_ensemble_row_pools_the_ensemble_and_each_member_on_every_fold(tmp_path):
    """Absent until every fold is scored; then the ensemble beside each member, folds pooled."""
    (tmp_path / "params.yaml").write_text("oos:\n  folds:\n  - name: a\n  - name: b\n")
    files = rn.Files(tmp_path)
    ens = tmp_path / rn.OOS_ENSEMBLE_XEON / "folds"
    write_fold_csv(ens / "a.csv", [0.9], [0.1])
    assert rn.ensemble_row(files, rn.OOS_ENSEMBLE_XEON, "2 seeds", {}) is None
    write_fold_csv(ens / "b.csv", [0.6], [0.2])  # pooled: 0.9, 0.6 above 0.1, 0.2: 1.0
    for folder in rn.OOS_SEED_RUNS["default_xeon"].values():
        write_fold_csv(tmp_path / folder / "folds/a.csv", [0.9], [0.1])
        write_fold_csv(tmp_path / folder / "folds/b.csv", [0.3], [0.5])  # 0.3 < 0.5: 0.75
    members = rn.seed_members(rn.two_seed_pooled(files)[1]["default_xeon"])
    row = rn.ensemble_row(files, rn.OOS_ENSEMBLE_XEON, "2 seeds", members)
    assert row[2] == "1.000 vs 0.750 (seed 42) and 0.750 (seed 43)"
    assert row[3].startswith("better by the rule (+0.250")


def test_a_recipe_recorded_before_a_train_key_existed_is_still_the_committed_one(tmp_path):
    """The operating point's recipe predates some train keys (input_size, adversary*): absent,
    they meant today's defaults, as evaluate reads them; a changed value is another recipe.
    Watched red (session 20) with the sections compared as recorded."""
    root = copy_committed_files(tmp_path)
    path = root / "reports" / "oos" / "operating_point.json"
    point = json.loads(path.read_text())
    for key in ("input_size", "adversary", "adversary_by", "adversary_within"):
        point["recipe"]["train_binary"].pop(key)
    path.write_text(json.dumps(point))
    assert rn.oos_is_committed_recipe(rn.Files(root))
    point["recipe"]["train_binary"]["epochs"] += 1
    path.write_text(json.dumps(point))
    assert not rn.oos_is_committed_recipe(rn.Files(root))
