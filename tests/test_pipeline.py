"""End to end: the real pipeline (`dvc repro`, `dvc exp run`) on a tiny real subset of the mirror,
in a temporary copy of the repository, with tiny params."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.e2e
COPIED = [
    "dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore", ".gitignore", "cxr", "stages",
    "reports/reference",
]  # fmt: skip


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def tiny_sources(mirror: Path) -> pd.DataFrame:
    """A few sample images per label (one per patient group) plus a few adult_check ones."""
    sources = pd.read_csv(mirror / "sources.csv", keep_default_na=False, dtype=str)
    sample = sources[sources["sample"] == "1"]
    main = sample[sample["cohort"] == "main"]
    picked = [
        main[main["label"] == label].head(8) for label in ["covid", "viral", "bacterial", "normal"]
    ]
    # a few adult non-COVID images too, so subgroup breakdowns have two sources per class
    picked.append(main[(main["dataset"] == "ieee8023") & (main["label"] != "covid")].head(4))
    # adult controls: rsna normals and nih pneumonia of unknown type
    picked += [main[main["dataset"] == "rsna"].head(4), main[main["label"] == "pneumonia"].head(4)]
    # the ieee8023 pictures that are also Grad-CAM cases (they must end up in test)
    cases = pd.read_csv(mirror / "cases.csv", keep_default_na=False, dtype=str)
    picked.append(sources[sources["path"].isin(cases["twin_path"])])
    picked.append(sample[sample["cohort"] == "adult_check"].head(4))
    out = pd.concat(picked).drop_duplicates("path")
    out.loc[:, "sample"] = "1"
    return out


def tiny_params(path: Path) -> None:
    params = yaml.safe_load(path.read_text())
    params["base"]["image_size"] = 64
    for name in ("train_binary", "train_four_class"):
        params[name].update(arch="resnet18", epochs=1, batch_size=8, threads=1)
    params["evaluate"]["bootstrap"] = 20
    params["gradcam"]["gallery_per_group"] = 1
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory, request) -> tuple[Path, dict]:
    mirror = request.getfixturevalue("mirror")
    root = tmp_path_factory.mktemp("e2e") / "repo"
    root.mkdir()
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)
    (root / ".dvc").mkdir()
    shutil.copy2(REPO / ".dvc" / "config", root / ".dvc" / "config")
    (root / "data" / "sources").mkdir(parents=True)
    tiny_sources(mirror).to_csv(root / "data" / "sources" / "sources.csv", index=False)
    shutil.copy2(mirror / "cases.csv", root / "data" / "sources" / "cases.csv")
    tiny_params(root / "params.yaml")
    env = os.environ | {
        "CXR_MIRROR": str(mirror),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }  # fmt: skip
    run(["git", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "init"], root, env)
    return root, env


@pytest.fixture(scope="module")
def repro(project) -> tuple[Path, dict, subprocess.CompletedProcess]:
    root, env = project
    return root, env, run([sys.executable, "-m", "dvc", "repro"], root, env)


def test_split_is_patient_disjoint_and_counted(repro):
    root, _, _ = repro
    tables = {
        s: pd.read_csv(root / "data" / "split" / f"{s}.csv") for s in ("train", "val", "test")
    }
    groups = [set(t["group_id"]) for t in tables.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    counts = json.loads((root / "metrics" / "data.json").read_text())
    for name, table in tables.items():
        assert counts[name]["total"] == len(table) > 0
    manifest = pd.read_csv(root / "data" / "raw" / "manifest.csv")
    assert len(manifest) == len(pd.read_csv(root / "data" / "sources" / "sources.csv"))
    assert (root / "data" / "split" / "cases.npy").exists()
    assert counts["near_duplicates"]["groups_forced_to_test"] == 5


def test_case_twins_are_never_trained_on_and_pneumonia_is_used(repro):
    root, _, _ = repro
    read = lambda s: pd.read_csv(root / "data" / "split" / f"{s}.csv", keep_default_na=False)  # noqa: E731
    twins = set(read("cases")["twin_group_id"]) - {""}
    assert len(twins) == 5
    train_val = set(read("train")["group_id"]) | set(read("val")["group_id"])
    assert not twins & train_val
    assert twins <= set(read("test")["group_id"])
    assert "pneumonia" in set(read("train")["label"]) | set(read("val")["label"])
    assert len(read("external")) == 0


def test_every_stage_wrote_its_outputs(repro):
    root, _, _ = repro
    for task in ("binary", "four_class"):
        result = json.loads((root / "metrics" / f"{task}.json").read_text())
        assert 0.0 <= result["test"]["accuracy"] <= 1.0
        assert set(result["test"]["ci"]["accuracy"]) >= {"low", "high", "point"}
        assert 0.0 <= result["adult_check"]["covid_call_rate"] <= 1.0
        assert (root / "models" / f"{task}.pt").exists()
        assert (root / "plots" / "evaluate" / f"{task}_confusion.png").exists()
        curves = root / "plots" / f"train_{task}" / "plots" / "metrics" / "val" / "macro_f1.tsv"
        assert len(curves.read_text().splitlines()) == 2  # header + one epoch
    assert "threshold" in json.loads((root / "metrics" / "binary.json").read_text())
    gradcam = json.loads((root / "metrics" / "gradcam.json").read_text())
    assert "border_share" in gradcam and "randomisation" in gradcam
    assert len(list((root / "plots" / "gradcam" / "cases").glob("*.png"))) == 19
    summary = (root / "reports" / "summary.md").read_text()
    assert "study reported" in summary and "adult_check" in summary
    assert (root / "reports" / "model_card.md").exists()


def test_second_repro_does_nothing(repro):
    root, env, _ = repro
    out = run([sys.executable, "-m", "dvc", "repro"], root, env)
    assert "Running stage" not in out.stdout, out.stdout


def test_metrics_and_plots_show(repro):
    root, env, _ = repro
    shown = run([sys.executable, "-m", "dvc", "metrics", "show"], root, env).stdout
    assert "metrics/binary.json" in shown and "metrics/four_class.json" in shown
    run([sys.executable, "-m", "dvc", "plots", "show", "-o", "dvc_plots"], root, env)
    html = (root / "dvc_plots" / "index.html").read_text()
    assert "four_class_confusion" in html and "loss_four_class" in html


def test_experiment_with_set_param(repro):
    root, env, _ = repro
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "results"], root, env)
    run(
        [
            sys.executable,
            "-m",
            "dvc",
            "exp",
            "run",
            "-n",
            "two-epochs",
            "-S",
            "train_four_class.epochs=2",
        ],
        root,
        env,
    )
    shown = run([sys.executable, "-m", "dvc", "exp", "show", "--csv"], root, env).stdout
    assert "two-epochs" in shown
    # The experiment ran in the workspace: diff against the committed baseline shows the change.
    diff = run([sys.executable, "-m", "dvc", "exp", "diff"], root, env).stdout
    assert "train_four_class.epochs" in diff and "metrics/train_four_class.json" in diff, diff
    metrics_diff = run([sys.executable, "-m", "dvc", "metrics", "diff"], root, env).stdout
    assert "epochs_run" in metrics_diff, metrics_diff


def test_fetch_without_mirror_or_network_is_one_clear_error(repro):
    root, env, _ = repro
    offline = {k: v for k, v in env.items() if k != "CXR_MIRROR"} | {
        "CXR_BASE_URL": "http://127.0.0.1:9/"
    }
    proc = run(
        [sys.executable, "stages/fetch.py", "--out", "data/raw_offline", "--retries", "0"],
        root,
        offline,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr and "CXR_MIRROR" in proc.stderr
    assert not (root / "data" / "raw_offline" / "manifest.csv").exists()
