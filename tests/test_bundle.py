"""The model bundle (cxr.bundle): checkpoints and their threshold travel together, and predict
finds them from any working directory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cxr import bundle as bundle_module
from cxr import predict
from cxr.bundle import load_bundle, write_bundle
from cxr.errors import BundleError
from tests.test_predict import THREADS, make_checkpoint, make_models, radiograph, run, save

pytestmark = pytest.mark.usefixtures("one_thread")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bundle_names_each_checkpoint_by_sha256_and_carries_the_threshold(tmp_path: Path) -> None:
    four = make_checkpoint(tmp_path / "four_class.pt", "four_class", seed=1)
    binary = make_checkpoint(tmp_path / "sub" / "binary.pt", "binary", seed=2)
    segmenter = tmp_path / "segmenter.pt"
    segmenter.write_bytes(b"stand-in: the bundle hashes files, it does not load them")
    out = write_bundle(tmp_path, binary, four, segmenter, 0.4835, "youden on val (adult images)")
    blob = json.loads(out.read_text())
    assert out == tmp_path / "bundle.json" and blob["format"] == "cxr-bundle/1"
    assert blob["binary"] == {"file": "sub/binary.pt", "sha256": sha(binary)}
    assert blob["four_class"] == {"file": "four_class.pt", "sha256": sha(four)}
    assert blob["segmenter"]["sha256"] == sha(segmenter)
    assert (blob["threshold"], blob["threshold_source"]) == (0.4835, "youden on val (adult images)")
    loaded = load_bundle(tmp_path)
    assert loaded.files == {"binary": binary, "four_class": four, "segmenter": segmenter}
    assert loaded.threshold == 0.4835 and loaded.sha256["binary"] == sha(binary)
    # Moved whole, the folder still works: names are relative to it.
    moved = tmp_path.rename(tmp_path.with_name("moved"))
    assert load_bundle(moved).files["binary"] == moved / "sub" / "binary.pt"


def test_a_checkpoint_changed_after_bundling_is_refused(tmp_path: Path) -> None:
    """Watched red before the fix: with the sha256 comparison in cxr.bundle._verified removed,
    load_bundle returned the retrained binary with the old model's threshold."""
    models = make_models(tmp_path)
    make_checkpoint(models["binary"], "binary", seed=7)  # retrained, bundle not rewritten
    with pytest.raises(BundleError, match=r"binary.pt .*is not the binary checkpoint") as info:
        load_bundle(tmp_path)
    assert str(tmp_path / "bundle.json") in str(info.value)
    assert "dvc repro evaluate" in str(info.value)
    load_bundle(tmp_path, roles=("four_class",))  # a caller not using the binary is not held up
    models["binary"].unlink()
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path)


def test_checkpoints_outside_the_folder_and_bad_thresholds_are_not_bundled(tmp_path: Path) -> None:
    inside = make_models(tmp_path / "models")
    outside = make_checkpoint(tmp_path / "elsewhere.pt", "binary")
    with pytest.raises(BundleError, match="outside"):
        write_bundle(tmp_path / "models", outside, inside["four"], None, 0.5, "x")
    with pytest.raises(BundleError, match=r"threshold must be in \[0, 1\]"):
        write_bundle(tmp_path / "models", inside["binary"], inside["four"], None, 1.5, "x")


def test_predict_refuses_a_binary_the_bundle_was_not_written_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 19 defect 5: `--binary other.pt` used to take the threshold another model chose.
    Watched red before the fix: with the sha256 comparison in cxr.loading.choose_threshold removed,
    this exits 0 with threshold_source "bundle"."""
    models = make_models(tmp_path / "models")
    other = make_checkpoint(tmp_path / "other.pt", "binary", seed=9)
    image = save(Image.fromarray(radiograph()), tmp_path / "x.png")
    base = [str(a) for a in (image, "--models", models["models"], *THREADS)]
    code, stdout, err = run(capsys, [*base, "--binary", str(other)])
    assert code == 2 and err.count("\n") == 1 and stdout == "", err
    assert f"--binary {other}" in err and "is not the binary model" in err and "--threshold" in err
    out = tmp_path / "p.json"
    code, _, err = run(
        capsys, [*base, "--binary", str(other), "--threshold", "0.3", "--out", str(out)]
    )
    record = json.loads(out.read_text())[0]
    assert code == 0 and (record["threshold"], record["threshold_source"]) == (0.3, "argument")
    # A copy of the bundled checkpoint is the same model: its threshold applies.
    copy = tmp_path / "copy.pt"
    copy.write_bytes(models["binary"].read_bytes())
    assert run(capsys, [*base, "--binary", str(copy), "--out", str(out)])[0] == 0
    assert json.loads(out.read_text())[0]["threshold_source"] == "bundle"


def test_predict_finds_the_bundle_from_any_working_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default --models is the `models/` folder of the repository the package lives in,
    not of the working directory. Watched red before the fix: predict run from another folder
    said "metrics/binary.json not found"."""
    repo = tmp_path / "repo"
    make_models(repo / "models", threshold=0.25)
    monkeypatch.setattr(bundle_module, "__file__", str(repo / "cxr" / "bundle.py"))
    image = save(Image.fromarray(radiograph()), tmp_path / "elsewhere" / "x.png")
    monkeypatch.chdir(image.parent)
    code, _, err = run(capsys, [image.name, *THREADS, "--out", "p.json"])
    record = json.loads((image.parent / "p.json").read_text())[0]
    assert code == 0 and (record["threshold"], record["threshold_source"]) == (0.25, "bundle"), err
    (repo / "models" / "bundle.json").unlink()
    code, _, err = run(capsys, [image.name, *THREADS])
    assert code == 2 and f"no model bundle at {repo / 'models' / 'bundle.json'}" in err
    assert "--models DIR" in err and err.count("\n") == 1


def test_evaluate_stage_writes_the_bundle_with_its_threshold(tmp_path: Path) -> None:
    """The threshold in the bundle is the one evaluate chose and wrote to metrics/binary.json,
    for exactly the checkpoints it scored."""
    from stages import evaluate as stage
    from tests.test_evaluate import argv, make_workdir, tiny_split

    tiny_split(tmp_path / "split")
    workdir = make_workdir(tmp_path)
    (workdir / "segmenter.pt").write_bytes(b"a segmenter stand-in")
    torch.set_num_threads(1)
    stage.main(argv(workdir))
    chosen = json.loads((workdir / "metrics" / "binary.json").read_text())["threshold"]
    bundled = load_bundle(workdir)
    assert bundled.threshold == chosen["value"]
    assert bundled.threshold_source == f"{chosen['method']} on {chosen['chosen_on']}"
    assert bundled.files["binary"] == workdir / "binary.pt"
    assert bundled.sha256["segmenter"] == sha(workdir / "segmenter.pt")
    predict_args = predict.parse_args(["x.png", "--models", str(workdir)])
    assert predict.resolve(predict_args).threshold == predict.Threshold(chosen["value"], "bundle")


def test_evaluate_refuses_a_bundle_predict_would_not_find(tmp_path: Path) -> None:
    """--bundle must be named bundle.json, and a --segmenter named but missing is an error,
    not a bundle without a segmenter. Both are the user's to fix: one-line errors."""
    import argparse

    from cxr.cli import is_user_error
    from stages import evaluate as stage

    models = make_models(tmp_path)
    chosen = {"value": 0.4, "method": "youden", "chosen_on": "val (adult images)"}
    base = {"binary": models["binary"], "four_class": models["four"]}
    with pytest.raises(BundleError) as wrong_name:
        stage.write_model_bundle(
            argparse.Namespace(**base, bundle=tmp_path / "other.json", segmenter=None), chosen
        )
    assert "must be named bundle.json" in str(wrong_name.value) and is_user_error(wrong_name.value)
    with pytest.raises(BundleError, match="file not found"):
        missing = tmp_path / "segmenter.pt"
        stage.write_model_bundle(argparse.Namespace(**base, bundle=None, segmenter=missing), chosen)
    stage.write_model_bundle(argparse.Namespace(**base, bundle=None, segmenter=None), chosen)
    assert load_bundle(tmp_path).files["segmenter"] is None  # none beside the models: none bundled
