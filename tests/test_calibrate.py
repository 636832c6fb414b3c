"""Site calibration (cxr.calibrate): a threshold from a site's own COVID-19-negative films,
stored beside the models and used by predict for that binary checkpoint only."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import beta

from cxr import calibrate, predict
from cxr.bundle import sha256_of
from tests.test_predict import (
    PREP,
    THREADS,
    listing,
    make_checkpoint,
    make_models,
    radiograph,
    run,
    save,
    stub_segmenter,  # noqa: F401  (a fixture)
    two_lungs,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def site_folder(root: Path, n: int) -> Path:
    """`n` films of a site, an unreadable file and a truncated JPEG among them."""
    for i in range(n):
        save(Image.fromarray(radiograph(64, seed=100 + i)), root / f"film{i:02d}.png")
    (root / "notes.png").write_text("a text file named like an image")
    buf = io.BytesIO()
    Image.fromarray(radiograph(128)).save(buf, format="JPEG", quality=95)
    (root / "sub").mkdir()
    (root / "sub" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return root


def calibrate_run(capsys: pytest.CaptureFixture[str], argv: list[object]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        calibrate.main([str(a) for a in (*argv, *THREADS)])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return info.value.code, out, err


# --- the rule, by hand ------------------------------------------------------------------------


def test_threshold_is_the_smallest_reaching_the_target_and_ties_fall_below() -> None:
    """Watched red before the fix: with k = ceil(target * n) unrounded, 0.56 of 25 films asked
    for 15 negatives (0.56 * 25 = 14.000000000000002) instead of 14."""
    scores = np.array([0.05, 0.1, 0.2, 0.2, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9])
    t = calibrate.threshold_for_specificity(scores, 0.5)  # 5 of 10 below: the 5th is 0.2
    assert 0.2 < t < 0.2 + 1e-15 and (scores < t).sum() == 5
    # 3 of 10 asked: the 3rd lowest is 0.2, tied with two more; all three fall below
    t = calibrate.threshold_for_specificity(scores, 0.3)
    assert (scores < t).sum() == 5 and (scores[scores >= t] > 0.2).all()
    assert (scores < calibrate.threshold_for_specificity(scores, 0.6)).sum() == 6
    twenty_five = np.linspace(0.01, 0.25, 25)
    assert (twenty_five < calibrate.threshold_for_specificity(twenty_five, 0.56)).sum() == 14
    twenty = np.linspace(0.01, 0.2, 20)
    t = calibrate.threshold_for_specificity(twenty, 0.9)
    assert (twenty < t).sum() == 18 and t < twenty[18]
    everything = calibrate.threshold_for_specificity(scores, 1.0)
    assert (scores < everything).all() and everything == np.nextafter(0.9, 1)


def test_specificity_ci_is_clopper_pearson() -> None:
    """The exact interval from its beta-quantile definition, not from the code under test."""
    for negative, n in ((18, 20), (36, 40), (20, 20), (0, 25)):
        low = beta.ppf(0.025, negative, n - negative + 1) if negative else 0.0
        high = beta.ppf(0.975, negative + 1, n - negative) if negative < n else 1.0
        got = calibrate.specificity_ci(negative, n)
        assert got == pytest.approx((low, high), abs=1e-9), (negative, n)
    assert calibrate.specificity_ci(18, 20) == pytest.approx((0.683, 0.988), abs=1e-3)


# --- end to end -------------------------------------------------------------------------------


def test_calibrate_then_predict_uses_the_site_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """24 readable films and two bad files: the bad ones are skipped and named, the threshold
    calls 18 of 24 negative (target 0.75), and predict on the same films calls exactly those
    18 negative with threshold_source `site`; --threshold still wins."""
    models = make_models(tmp_path / "models")
    films = site_folder(tmp_path / "site", 24)
    code, stdout, err = calibrate_run(
        capsys, [films, "--specificity", 0.75, "--models", models["models"]]
    )
    assert code == 0, err
    site = json.loads((models["models"] / "site.json").read_text())
    assert site["binary"] == {"file": "binary.pt", "sha256": sha256_of(models["binary"])}
    assert (site["n_films"], site["n_called_negative"]) == (24, 18)
    assert site["achieved_specificity"] == 0.75 and site["target_specificity"] == 0.75
    ci = calibrate.specificity_ci(18, 24)
    assert (site["specificity_ci95"]["low"], site["specificity_ci95"]["high"]) == ci
    skipped = {Path(s["file"]).name: s["reason"] for s in site["films_skipped"]}
    assert set(skipped) == {"notes.png", "cut.jpg"}
    assert "not a readable image" in skipped["notes.png"] and "truncated" in skipped["cut.jpg"]
    assert site["bundle_threshold"]["value"] == 0.5 and site["date"].startswith("20")
    assert "24 films scored, 2 skipped" in stdout and "notes.png" in stdout
    assert "specificity 0.750 (target 0.75)" in stdout
    assert f"95% Clopper-Pearson CI {ci[0]:.3f}-{ci[1]:.3f}" in stdout

    out = tmp_path / "pred.json"
    code, _, _ = run(capsys, [str(films), "--models", str(models["models"]), *THREADS,
                              "--out", str(out)])  # fmt: skip
    rows = [r for r in json.loads(out.read_text()) if r["status"] == "ok"]
    assert code == 1 and len(rows) == 24  # the two bad files are error rows
    assert {(r["threshold"], r["threshold_source"]) for r in rows} == {(site["threshold"], "site")}
    assert sum(not r["covid_positive"] for r in rows) == 18
    argv = [str(films), "--models", str(models["models"]), *THREADS, "--out", str(out)]
    run(capsys, [*argv, "--threshold", "0.5"])
    assert {r["threshold_source"] for r in json.loads(out.read_text())} - {None} == {"argument"}


@pytest.mark.usefixtures("stub_segmenter")
def test_calibration_sees_exactly_what_predict_feeds_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Models trained with `crop: lungs`, the segmenter stubbed: calibrate's p(covid) for each
    film is predict's binary_p_covid, to the bit. Watched red before the fix: scoring
    read_inputs' uncropped images (a second model path) differed for every film."""
    models = make_models(tmp_path / "models", prep=PREP | {"crop": "lungs", "crop_margin": 0.1})
    films = site_folder(tmp_path / "site", 4)
    loaded = predict.load_models(models["four"], models["binary"], None)
    items = predict.collect_inputs([films]).items
    scored, skipped = calibrate.score_films(items, loaded, batch_size=3)
    out = tmp_path / "pred.json"
    # The same batches (of 3 files) on both sides: a conv's float sums may differ in the 7th
    # digit with the batch's composition.
    argv = [films, "--models", models["models"], *THREADS, "--out", out, "--batch-size", 3]
    run(capsys, [str(a) for a in argv])
    want = {
        r["file"]: r["binary_p_covid"] for r in json.loads(out.read_text()) if r["status"] == "ok"
    }
    assert {file: p for file, p, _ in scored} == want and len(want) == 4
    assert len(skipped) == 2
    uncropped = dataclasses.replace(loaded, spec=dataclasses.replace(loaded.spec, crop="none"))
    assert calibrate.score_films(items, uncropped, batch_size=3)[0] != scored  # the crop acts
    assert two_lungs(8).any()  # the stub's lungs are what crop_inputs cut to


def test_too_few_films_are_refused_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Watched red before the fix: with MIN_FILMS at 0, 10 films were calibrated."""
    models = make_models(tmp_path / "models")
    films = site_folder(tmp_path / "site", 10)
    code, stdout, err = calibrate_run(capsys, [films, "--models", models["models"]])
    assert code == 2 and stdout == "" and err.count("\n") == 1, err
    assert "only 10 readable film(s) (at least 20 needed)" in err
    low, high = calibrate.specificity_ci(9, 10)
    assert f"9 of 10 called negative has a 95% CI of {low:.2f}-{high:.2f}" in err
    assert "2 file(s) skipped" in err and not (models["models"] / "site.json").exists()


def test_predict_refuses_a_site_calibration_for_another_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Watched red before the fix: with the sha256 check in cxr.bundle.site_threshold removed,
    predict applied another model's site threshold."""
    models = make_models(tmp_path / "models")
    films = site_folder(tmp_path / "site", 20)
    assert calibrate_run(capsys, [films, "--models", models["models"]])[0] == 0
    other = make_checkpoint(tmp_path / "other.pt", "binary", seed=5)
    image = save(Image.fromarray(radiograph()), tmp_path / "x.png")
    argv = [str(image), "--models", str(models["models"]), *THREADS, "--binary", str(other)]
    code, _, err = run(capsys, argv)
    assert code == 2 and err.count("\n") == 1, err
    assert "site.json was calibrated for another binary model" in err and str(other) in err
    assert run(capsys, [*argv, "--threshold", "0.5"])[0] == 0
    # An explicit --site for another model is refused the same way.
    moved = tmp_path / "elsewhere.json"
    (models["models"] / "site.json").rename(moved)
    code, _, err = run(capsys, [*argv, "--site", str(moved)])
    assert code == 2 and "calibrated for another binary model" in err


def test_out_that_is_not_a_site_calibration_is_kept_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = make_models(tmp_path / "models")
    films = site_folder(tmp_path / "site", 20)
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    code, _, err = calibrate_run(capsys, [films, "--models", models["models"], "--out", notes])
    assert code == 2 and "is not a site calibration" in err and "--force" in err
    assert notes.read_text() == '{"mine": true}'
    argv = [films, "--models", models["models"], "--out", notes, "--force"]
    assert calibrate_run(capsys, argv)[0] == 0
    assert json.loads(notes.read_text())["format"] == "cxr-site/1"
    assert calibrate_run(capsys, argv[:-1])[0] == 0  # its own file: replaced without --force


def test_out_file_checks_shared_with_predict(tmp_path: Path) -> None:
    """calibrate's and predict's --out go through one check (cxr.outputs.check_out_file): a
    folder gets predict's hint of a file name to give and calibrate's "not a regular file".

    Watched red with check_out_file giving the file-name hint to every folder."""
    from cxr.inputs import UsageError
    from cxr.outputs import check_out

    (tmp_path / "d.csv").mkdir()
    with pytest.raises(UsageError, match=r"is a folder; give a file, e\.g\. .*predictions\.csv$"):
        check_out(tmp_path / "d.csv")
    (tmp_path / "d.json").mkdir()
    with pytest.raises(UsageError, match="exists and is not a regular file; choose another name"):
        calibrate.check_out(tmp_path / "d.json", force=True)
    with pytest.raises(UsageError, match=r"^--out must end in \.json, got "):
        calibrate.check_out(tmp_path / "site.txt", force=False)


def test_ctrl_c_while_scoring_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxr.__main__ import main

    models = make_models(tmp_path / "models")
    films = site_folder(tmp_path / "site", 20)
    before = listing(tmp_path)

    def interrupt(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(calibrate, "score_films", interrupt)
    monkeypatch.setitem(sys.modules, "cxr.calibrate", calibrate)
    with pytest.raises(SystemExit) as info:
        main(["calibrate", str(films), "--models", str(models["models"]), *THREADS])
    _, err = capsys.readouterr()
    assert info.value.code == 130 and "Traceback" not in err and err.count("\n") == 1
    assert listing(tmp_path) == before
