"""Tests for cxr.predict and cxr.dicom on tiny resnet18 checkpoints and synthetic radiographs."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import struct
import subprocess
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from cxr import api, inputs, loading, outputs, predict
from cxr.bundle import write_bundle
from cxr.dicom import read_dicom
from cxr.images import Preprocessing, load_image, preprocess, preprocess_file, preprocess_gray
from cxr.infer import predict_proba
from cxr.models import CHECKPOINT_FORMAT, build_model, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FOUR = ["covid", "viral", "bacterial", "normal"]
PREP = {"image_size": 32, "harmonise": True, "harmonise_size": 224, "jpeg_quality": 75}
# One thread: on 2 shared cores a second OpenMP thread makes these tiny batches far slower.
THREADS = ["--threads", "1"]
COLUMNS = ["file", "status", "predicted", "p_predicted", "p_covid", "p_viral", "p_bacterial",
           "p_normal", "binary_p_covid", "threshold", "threshold_source", "covid_positive", "cam",
           "age_group", "warning", "message"]  # fmt: skip


# --- fixtures and writers ---------------------------------------------------------------------


def make_checkpoint(path: Path, task: str, prep: dict = PREP, seed: int = 0) -> Path:
    names = FOUR if task == "four_class" else ["non_covid", "covid"]
    torch.manual_seed(seed)
    # zero_init_residual=False: a zero-initialised resnet ignores most of its input.
    model = build_model("resnet18", len(names), zero_init_residual=False)
    meta = {"task": task, "arch": "resnet18", "class_names": names,
            "image_size": prep["image_size"], "preprocessing": prep}  # fmt: skip
    save_checkpoint(path, model, meta)
    return path


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    """predict.main sets torch's threads and denormal flushing; leave other tests the defaults."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


def make_models(folder: Path, threshold: float = 0.5, prep: dict = PREP) -> dict[str, Path]:
    """Two tiny checkpoints and their bundle (no segmenter), as the evaluate stage writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    four = make_checkpoint(folder / "four_class.pt", "four_class", prep, seed=1)
    binary = make_checkpoint(folder / "binary.pt", "binary", prep, seed=2)
    write_bundle(folder, binary, four, None, threshold, "youden on val (adult images)")
    return {"models": folder, "four": four, "binary": binary, "bundle": folder / "bundle.json"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    # segmenter absent: the lung check is tested on its own
    return make_models(d) | {"segmenter": d / "no-segmenter.pt"}


def args(ckpt: dict[str, Path], *extra: object) -> list[str]:
    # pediatric: the caveat on a viral/bacterial call for adults or unknown ages (tested on its
    # own, in test_age_group_*) would otherwise mix into the image warnings these tests check.
    fixed = ["--models", ckpt["models"], "--four-class", ckpt["four"], "--binary", ckpt["binary"],
             *THREADS, "--segmenter", ckpt["segmenter"], "--age-group", "pediatric"]  # fmt: skip
    return [str(a) for a in (*extra, *fixed)]


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        predict.main(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def radiograph(size: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus noise, different per seed, as uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 120 + 80 * np.sin(3 * xx + seed) * np.cos(2 * yy) + rng.normal(0, 15, (size, size))
    return np.clip(base, 0, 255).astype(np.uint8)


def save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def write_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME1",
    window: tuple[float, float] | None = (3000.0, 2000.0),
    rescale: tuple[float, float] = (2.0, -1024.0),
    rows_cols: tuple[int, int] | None = None,
) -> Path:
    """A 16-bit single-frame DX file with a real preamble; stored is uint16 rows x cols."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows_cols or stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(size: int = 64) -> np.ndarray:
    """Stored values 0..4095 in raster order."""
    return np.linspace(0, 4095, size * size).round().astype(np.uint16).reshape(size, size)


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def bomb_png(path: Path, side: int = 30_000) -> Path:
    """A few hundred bytes whose header claims side x side pixels (900 MP)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    data += png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def good_folder(root: Path) -> dict[str, Path]:
    """One of each supported kind, from 8-bit PNG to a DICOM file without a suffix."""
    gray = radiograph(seed=1)
    rgba = np.dstack(
        [np.stack([radiograph(seed=s) for s in (2, 3, 4)], -1), np.full_like(gray, 200)]
    )
    files = {
        "png": save(Image.fromarray(gray), root / "a.png"),
        "jpeg": save(Image.fromarray(radiograph(seed=5)), root / "sub" / "b.jpg", quality=90),
        "png16": save(Image.fromarray(ramp().astype(np.uint16) * 16), root / "c16.png"),
        "rgba": save(Image.fromarray(rgba, mode="RGBA"), root / "d_rgba.png"),
        "dicom": write_dicom(root / "e.dcm", ramp()),
        "dicom_bare": write_dicom(root / "sub" / "f_no_suffix", ramp()[::-1]),
    }
    return files


# --- DICOM ------------------------------------------------------------------------------------


def test_dicom_monochrome1_is_rescaled_windowed_and_inverted(tmp_path: Path) -> None:
    stored = ramp()
    mono1 = read_dicom(write_dicom(tmp_path / "m1.dcm", stored))
    mono2 = read_dicom(write_dicom(tmp_path / "m2.dcm", stored, photometric="MONOCHROME2"))
    assert mono1.dtype == np.uint8 and mono1.shape == stored.shape
    # Raw 0 is low (rescaled -1024, under the window 2000..4000): MONOCHROME1 shows it bright.
    assert mono1.flat[0] == 255 and mono1.flat[-1] == 0
    np.testing.assert_array_equal(mono1, 255 - mono2)
    # Rescaled = 2 * stored - 1024, so the window centre 3000 is stored 2012: mid-grey.
    centre = np.argmin(np.abs(stored.astype(int) - 2012))
    assert abs(int(mono2.flat[centre]) - 127) <= 2
    # Saturated outside the window, not min-max stretched: stored 1400 (rescaled 1776) is black.
    assert mono2.flat[np.argmin(np.abs(stored.astype(int) - 1400))] == 0
    assert np.all(np.diff(mono2.ravel().astype(int)) >= 0)  # monotone in the stored value
    # An image inside its window keeps its place in it: stored 1762..2262 is rescaled
    # 2500..3500, the middle half of the window 2000..4000, so a quarter to three quarters.
    narrow = np.linspace(1762, 2262, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    gray = read_dicom(write_dicom(tmp_path / "n.dcm", narrow, photometric="MONOCHROME2"))
    assert abs(int(gray.min()) - 64) <= 2 and abs(int(gray.max()) - 191) <= 2


def test_dicom_without_window_is_min_max_scaled(tmp_path: Path) -> None:
    gray = read_dicom(
        write_dicom(tmp_path / "w.dcm", ramp(), photometric="MONOCHROME2", window=None)
    )
    assert gray.flat[0] == 0 and gray.flat[-1] == 255


# --- predictions ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(ckpt: dict[str, Path]) -> tuple[torch.nn.Module, torch.nn.Module, Preprocessing]:
    four, meta = load_checkpoint(ckpt["four"], "four_class")
    binary, _ = load_checkpoint(ckpt["binary"], "binary")
    return four, binary, Preprocessing(**meta["preprocessing"])


def direct(reference: tuple, image: np.ndarray | Image.Image) -> tuple[np.ndarray, float]:
    """The models called by hand on the shared preprocessing: what predict must reproduce."""
    four, binary, spec = reference
    if isinstance(image, Image.Image):
        x = np.stack([preprocess(image, spec)])
    else:
        x = np.stack([preprocess_gray(image, spec)])
    return predict_proba(four, x)[0], float(predict_proba(binary, x)[0, 1])


def test_every_supported_kind_is_predicted_like_the_model_directly(
    tmp_path: Path, ckpt: dict[str, Path], reference: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    files = good_folder(tmp_path / "in")
    out = tmp_path / "pred.json"
    code, stdout, stderr = run(capsys, args(ckpt, tmp_path / "in", "--out", out, "--batch-size", 4))
    assert code == 0, stderr
    records = json.loads(out.read_text())
    assert [r["file"] for r in records] == sorted(str(p) for p in files.values())
    by_file = {Path(r["file"]): r for r in records}
    for r in records:
        assert list(r) == COLUMNS
        assert r["status"] == "ok" and r["message"] == "" and r["warning"] == ""
        probs = np.array([r[f"p_{c}"] for c in FOUR])
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert r["predicted"] == FOUR[int(probs.argmax())] and r["p_predicted"] == probs.max()
        assert r["threshold"] == 0.5
        assert r["covid_positive"] == (r["binary_p_covid"] >= 0.5)
    assert load_image(files["png16"]).mode.startswith("I;16")
    assert load_image(files["rgba"]).mode == "RGBA"
    for kind in ("png", "jpeg", "png16", "rgba"):
        want_four, want_covid = direct(reference, load_image(files[kind]))
        got = by_file[files[kind]]
        np.testing.assert_allclose([got[f"p_{c}"] for c in FOUR], want_four, atol=1e-5)
        assert got["binary_p_covid"] == pytest.approx(want_covid, abs=1e-5)
    want_four, _ = direct(reference, read_dicom(files["dicom"]))
    np.testing.assert_allclose(
        [by_file[files["dicom"]][f"p_{c}"] for c in FOUR], want_four, atol=1e-5
    )
    # The images differ, so identical outputs would mean the input was ignored.
    assert len({round(r["p_covid"], 6) for r in records}) > 1
    assert "COVID-19 positive" in stdout or "negative" in stdout
    assert "images/s" in stderr


def test_csv_output_has_the_documented_columns(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    image = save(Image.fromarray(radiograph()), tmp_path / "x.png")
    out = tmp_path / "out" / "pred.csv"
    code, _, _ = run(capsys, args(ckpt, image, tmp_path / "nothere.png", "--out", out))
    assert code == 1
    with open(out, newline="") as fh:
        assert next(csv.reader(fh)) == COLUMNS
    table = pd.read_csv(out)
    assert table["status"].tolist() == ["ok", "error"]
    assert table.loc[0, ["p_covid", "p_viral", "p_bacterial", "p_normal"]].sum() == pytest.approx(
        1.0
    )
    assert "no such file" in table.loc[1, "message"]


def test_threshold_comes_from_the_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = save(Image.fromarray(radiograph()), tmp_path / "x.png")
    for value, positive in ((0.0, True), (1.0, False)):
        models = make_models(tmp_path / f"models{value}", threshold=value)
        out = tmp_path / "p.json"
        argv = [str(a) for a in (image, "--models", models["models"], *THREADS, "--out", out)]
        assert run(capsys, argv)[0] == 0
        record = json.loads(out.read_text())[0]
        assert record["covid_positive"] is positive and record["threshold"] == value
        assert record["threshold_source"] == "bundle"


@pytest.mark.parametrize("content", [None, {"format": "cxr-bundle/1"}, {"auc": 0.9}, "not json"])
def test_missing_bundle_is_a_usage_error_unless_everything_is_given(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str], content: object
) -> None:
    """No bundle, or a broken one: one line naming where predict looked and how to point
    elsewhere; both classifiers and --threshold given, it is not needed."""
    image = save(Image.fromarray(radiograph()), tmp_path / "x.png")
    folder = tmp_path / "models"
    folder.mkdir()
    if content is not None:
        text = content if isinstance(content, str) else json.dumps(content)
        (folder / "bundle.json").write_text(text)
    base = [str(a) for a in (image, "--models", folder, *THREADS)]
    code, _, err = run(capsys, base)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(folder / "bundle.json") in err and "--models DIR" in err
    given = ["--four-class", str(ckpt["four"]), "--binary", str(ckpt["binary"])]
    assert run(capsys, [*base, *given])[0] == 2  # the threshold still comes from the bundle
    assert run(capsys, [*base, *given, "--threshold", "0.5"])[0] == 0


def test_bad_files_get_error_rows_and_the_rest_is_predicted(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    good = save(Image.fromarray(radiograph()), folder / "good.png")
    buf = io.BytesIO()
    Image.fromarray(radiograph(256)).save(buf, format="JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "text.png").write_text("this is not a PNG")
    bomb_png(folder / "bomb.png")
    write_dicom(folder / "bomb.dcm", ramp(8), rows_cols=(20_000, 20_000))
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    out = tmp_path / "pred.json"
    code, stdout, _ = run(capsys, args(ckpt, folder, tmp_path / "missing.png", "--out", out))
    assert code == 1
    rows = {Path(r["file"]).name: r for r in json.loads(out.read_text())}
    assert rows["good.png"]["status"] == "ok" and rows["good.png"]["file"] == str(good)
    expected = {
        "truncated.jpg": "truncated",
        "text.png": "not a readable image",
        "bomb.png": "decompression bomb",
        "bomb.dcm": "decompression bomb",
        "broken.dcm": "not a readable DICOM",
        "missing.png": "no such file",
    }
    for name, words in expected.items():
        assert rows[name]["status"] == "error", name
        assert words in rows[name]["message"] and rows[name]["file"] in rows[name]["message"]
        assert rows[name]["predicted"] is None and rows[name]["covid_positive"] is None
        assert list(rows[name]) == COLUMNS
    assert stdout.count("ERROR") == len(expected)


def test_folder_without_files_is_a_clear_error(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    code, stdout, err = run(capsys, args(ckpt, tmp_path / "empty"))
    assert code == 2 and err.startswith("error: no images") and str(tmp_path / "empty") in err
    assert "no files in folder" in err and "1 hidden entries skipped" in err
    assert "Traceback" not in err and stdout == ""


# --- checkpoints ------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs open(marker, "w"): the marker proves the code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("case", ["missing", "wrong_task", "garbage", "not_ours", "prep_differs"])
def test_unusable_checkpoints_exit_2_without_traceback(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str], case: str
) -> None:
    image = save(Image.fromarray(radiograph()), tmp_path / "x.png")
    bad = tmp_path / "bad.pt"
    if case == "wrong_task":
        bad = ckpt["binary"]
    elif case == "garbage":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "not_ours":
        torch.save({"conv1.weight": torch.zeros(1)}, bad)
    elif case == "prep_differs":
        make_checkpoint(bad, "four_class", prep=PREP | {"jpeg_quality": 90})
    argv = args(ckpt, image)
    argv[argv.index("--four-class") + 1] = str(bad)
    code, stdout, err = run(capsys, argv)
    assert code == 2 and err.startswith("error: ") and str(bad) in err
    assert "Traceback" not in err and stdout == ""


def test_malicious_pickle_is_refused_and_never_executed(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "meta": {}, "state_dict": Payload(marker)}, evil)
    image = save(Image.fromarray(radiograph()), tmp_path / "x.png")
    for flag in ("--four-class", "--binary"):
        argv = args(ckpt, image, "--threshold", 0.5)  # past the bundle check, to the loading
        argv[argv.index(flag) + 1] = str(evil)
        code, _, err = run(capsys, argv)
        assert code == 2 and err.startswith("error: ") and "refused" in err
        assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: a plain load does run it
    assert marker.exists()


# --- Grad-CAM ---------------------------------------------------------------------------------


def test_cam_overlays_are_written_per_image(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a = save(Image.fromarray(radiograph(seed=1)), tmp_path / "in" / "one" / "x.png")
    b = save(Image.fromarray(radiograph(seed=2)), tmp_path / "in" / "two" / "x.png")
    (tmp_path / "in" / "bad.png").write_text("nope")
    out, cams = tmp_path / "pred.json", tmp_path / "cams"
    code, _, _ = run(capsys, args(ckpt, tmp_path / "in", "--cam", cams, "--out", out))
    assert code == 1
    records = {r["file"]: r for r in json.loads(out.read_text())}
    written = sorted(p.name for p in cams.iterdir())
    assert written == ["x-2_cam.png", "x_cam.png"]  # same stem, two files: both kept
    assert {records[str(a)]["cam"], records[str(b)]["cam"]} == {str(cams / n) for n in written}
    assert records[str(tmp_path / "in" / "bad.png")]["cam"] is None
    overlay = np.asarray(Image.open(cams / "x_cam.png"))
    assert overlay.shape == (32, 32, 3) and overlay.std() > 0


# --- a real radiograph ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_of_the_mirror(
    tmp_path_factory: pytest.TempPathFactory, mirror: Path
) -> tuple[Path, Path, Path]:
    """A tiny raw folder fetched from the mirror by the fetch code, and the split stage run on
    it with this repository's params (no held-out datasets): (raw, split folder, params)."""
    import yaml

    from cxr.fetch import fetch_dataset
    from stages import split as split_stage
    from tests.test_pipeline import tiny_sources

    root = tmp_path_factory.mktemp("split_parity")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["split"].update(external=[], external_places=[])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cases = pd.read_csv(mirror / "cases.csv", dtype=str, keep_default_na=False)
    every = pd.read_csv(mirror / "sources.csv", dtype=str, keep_default_na=False)
    hannover = every[(every["dataset"] == "hannover") & (every["sample"] == "1")].head(2)
    sources = pd.concat([tiny_sources(mirror), hannover]).drop_duplicates("path")
    fetch_dataset(sources, cases, root / "raw", mirror=mirror)
    split_stage.main([str(a) for a in ("--raw", root / "raw", "--params", root / "params.yaml",
                      "--out", root / "split", "--metrics", root / "data.json",
                      "--workers", 1)])  # fmt: skip
    return root / "raw", root / "split", root / "params.yaml"


@pytest.mark.mirror
def test_predict_feeds_the_model_the_split_stage_row_of_the_same_file(
    tmp_path: Path,
    split_of_the_mirror: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Real radiographs (every source, PNG and JPEG, adults and children, and the Grad-CAM
    cases): what predict feeds the binary model for a raw file is, bit for bit, the array row
    the split stage wrote for it, with checkpoints carrying the preprocessing that params.yaml
    gives training. Kermany's files are the documented exception: the split leaves them as
    their publisher harmonised them, predict harmonises every new file (a near no-op on a file
    already squashed to 224 px at JPEG q75). Replaces a test that
    compared predict with the same `preprocess` it calls. Watched red: with predict skipping
    `intensity` (equalize) every row differed."""
    from cxr.config import load_base, load_split_params, preprocessing

    raw, split, params = split_of_the_mirror
    spec = preprocessing(load_base(params), load_split_params(params))
    # The lung crop is applied after the arrays (its parity is tested with the segmenter).
    prep = dataclasses.replace(spec, crop="none").to_dict()
    models = make_models(tmp_path / "models", prep=prep)
    rows = pick_rows(split, load_split_params(params).pre_harmonised)
    seen: list[np.ndarray] = []
    real = api.covid_probability

    def spy(models: loading.Models, images: np.ndarray, batch_size: int) -> np.ndarray:
        seen.append(images.copy())
        return real(models, images, batch_size)

    monkeypatch.setattr(api, "covid_probability", spy)
    files = [raw / row["file"] for row, _ in rows]
    out = tmp_path / "pred.json"
    code, _, err = run(capsys, [str(a) for a in (*files, "--models", models["models"],
                                                 *THREADS, "--out", out)])  # fmt: skip
    assert code == 0, err
    fed = np.concatenate(seen)
    assert len(fed) == len(rows) and [r["file"] for r in json.loads(out.read_text())] == [
        str(f) for f in files
    ]
    for (row, array_row), given in zip(rows, fed, strict=True):
        if row["dataset"] == "kermany":  # a second 224 px q75 round trip changes little
            assert np.abs(given.astype(int) - array_row).mean() < 2, row["file"]
        else:
            assert np.array_equal(given, array_row), (row["file"], row["dataset"])
    assert {row["dataset"] for row, _ in rows} >= {"ieee8023", "hannover", "kermany", "rsna", "nih"}


def pick_rows(split: Path, pre_harmonised: list[str]) -> list[tuple[pd.Series, np.ndarray]]:
    """Two rows of every dataset (cases too) across the split's outputs, with their arrays."""
    picked = []
    for npy in sorted(split.glob("*.npy")):
        table = pd.read_csv(npy.with_suffix(".csv"), keep_default_na=False, dtype=str)
        arrays = np.load(npy, mmap_mode="r")
        if "dataset" not in table:
            table = table.assign(dataset="cases")
        for _, group in table.groupby("dataset"):
            picked += [(group.loc[i], np.asarray(arrays[i])) for i in group.index[:2]]
    kept, seen = [], {}
    for row, array in picked:  # two per dataset over all splits
        if seen.setdefault(row["dataset"], 0) < 2:
            seen[row["dataset"]] += 1
            kept.append((row, array))
    assert set(pre_harmonised) <= set(seen), "no pre-harmonised file to check the exception on"
    return kept


@pytest.mark.mirror
def test_real_radiographs_get_no_warning(
    tmp_path: Path, ckpt: dict[str, Path], mirror: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every sample radiograph of every dataset (518: adults and children, PNG and JPEG,
    224 to 2,828 px) passes the sanity checks: the warnings flag odd inputs, not real films."""
    sources = pd.read_csv(mirror / "sources.csv", keep_default_na=False)
    sample = sources[sources["sample"] == 1]
    assert set(sample["dataset"]) == {"ieee8023", "hannover", "kermany", "nih", "rsna"}
    files = [mirror / path for path in sample["path"]]
    out = tmp_path / "pred.json"
    code, _, err = run(capsys, args(ckpt, *files, "--out", out, "--batch-size", 64, "--strict"))
    records = json.loads(out.read_text())
    assert len(records) == len(files) >= 500
    flagged = [(r["file"], r["warning"] or r["message"]) for r in records if r["warning"] != ""]
    assert flagged == [] and code == 0, flagged[:10]


def test_dicom_fixture_is_a_part10_file(tmp_path: Path) -> None:
    """Guards the DICOM fixture itself: a real Part 10 file with the tags the reader uses."""
    ds = pydicom.dcmread(write_dicom(tmp_path / "x.dcm", ramp(8)))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and float(ds.RescaleSlope) == 2.0
    assert (tmp_path / "x.dcm").read_bytes()[128:132] == b"DICM"


# --- --out checked before any work, written atomically ----------------------------------------


def make_read_only(folder: Path) -> None:
    """chmod the folder read-only; as root (where chmod does not stop writes) make it immutable;
    skip when neither works."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if os.access(folder, os.W_OK) and shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
    try:
        (folder / "probe").touch()
    except OSError:
        return
    (folder / "probe").unlink()
    pytest.skip("cannot make a read-only folder here (root without chattr)")


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "ro"
    make_read_only(folder)
    yield folder
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True, check=False)
    folder.chmod(0o755)


def listing(folder: Path) -> list[str]:
    """Every name under `folder`, hidden ones included: a leftover temporary file shows here."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", ["folder", "parent_is_file", "read_only", "suffix", "cam_file"])
def test_unwritable_out_is_refused_before_any_work(
    tmp_path: Path,
    ckpt: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    case: str,
) -> None:
    image = save(Image.fromarray(radiograph()), tmp_path / "x.png")
    (tmp_path / "existing").mkdir()
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    extra = {
        "folder": ["--out", tmp_path / "existing"],
        "parent_is_file": ["--out", tmp_path / "notes.txt" / "sub" / "pred.csv"],
        "read_only": ["--out", tmp_path / "ro" / "new" / "pred.json"],
        "suffix": ["--out", tmp_path / "pred.txt"],
        "cam_file": ["--cam", tmp_path / "notes.txt", "--out", tmp_path / "pred.csv"],
    }[case]
    if case == "read_only":
        request.getfixturevalue("read_only")
    before = listing(tmp_path)

    def never(*_: object) -> None:
        raise AssertionError("models were loaded although --out is unusable")

    monkeypatch.setattr(predict, "load_models", never)
    code, stdout, err = run(capsys, args(ckpt, image, *extra))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(extra[1]) in err and "Traceback" not in err and stdout == ""
    assert listing(tmp_path) == before  # no .tmp, no probe, no folder created


def test_a_failed_write_leaves_no_temporary_file(
    tmp_path: Path,
    ckpt: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--out turns into a folder while predicting: the rename fails; the table still shows all."""
    image = save(Image.fromarray(radiograph()), tmp_path / "in" / "x.png")
    out = tmp_path / "results" / "pred.csv"
    real = predict.predict_chunk

    def chunk_then_block_out(*a: object, **k: object) -> object:
        out.mkdir(parents=True)
        return real(*a, **k)

    monkeypatch.setattr(predict, "predict_chunk", chunk_then_block_out)
    code, stdout, err = run(capsys, args(ckpt, image, "--out", out))
    assert code == 1 and f"error: could not write {out}" in err and "Traceback" not in err
    assert "/x.png " in stdout and ("negative" in stdout or "positive" in stdout)
    assert listing(tmp_path / "results") == ["pred.csv"]  # the folder only, no temporary file


def test_rewriting_out_replaces_it_whole(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pred.json"
    earlier = [dict.fromkeys(COLUMNS, "an earlier, longer record " * 10) for _ in range(50)]
    out.write_text(json.dumps(earlier))
    image = save(Image.fromarray(radiograph()), tmp_path / "in" / "x.png")
    assert run(capsys, args(ckpt, image, "--out", out))[0] == 0
    assert [r["file"] for r in json.loads(out.read_text())] == [str(image)]
    assert listing(tmp_path) == ["in", "in/x.png", "pred.json"]


# --- file names that are not UTF-8 ------------------------------------------------------------


def test_printable_escapes_only_the_bytes_that_are_not_utf8() -> None:
    assert inputs.printable(os.fsdecode(b"scan\xff\xfe.png")) == "scan\\xff\\xfe.png"
    assert inputs.printable("röntgen/Ωmega.png") == "röntgen/Ωmega.png"
    assert inputs.printable("lone \ud800 surrogate") == "lone \\ud800 surrogate"


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_a_file_name_that_is_not_utf8_is_written(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    try:
        odd = save(Image.fromarray(radiograph(seed=3)), folder / os.fsdecode(b"\xff.png"))
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    good = save(Image.fromarray(radiograph(seed=4)), folder / "ok.png")
    out = tmp_path / f"pred{suffix}"
    code, stdout, err = run(capsys, args(ckpt, folder, "--out", out))
    assert code == 0, err
    text = out.read_bytes().decode("utf-8")  # strict: the whole file is valid UTF-8
    if suffix == ".csv":
        files = pd.read_csv(io.StringIO(text))["file"].tolist()
    else:
        files = [r["file"] for r in json.loads(text)]
    assert files == [str(good), str(folder / "\\xff.png")]  # bytes sort: "o" < 0xff
    assert "/\\xff.png " in stdout and odd.exists()


# --- the folder walk --------------------------------------------------------------------------


def fifo_with_watchdog(path: Path, seconds: float = 20.0) -> threading.Thread:
    """A FIFO, and a thread that unblocks a reader stuck on it after `seconds` (opening it
    read-write counts as a writer), so a regression fails the test instead of hanging it."""
    os.mkfifo(path)

    def unblock() -> None:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        os.write(fd, b"not an image")
        os.close(fd)

    timer = threading.Timer(seconds, unblock)
    timer.daemon = True
    timer.start()
    return timer


def test_folder_walk_gives_every_file_a_row(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, other = tmp_path / "in", tmp_path / "elsewhere"
    img = Image.fromarray(radiograph())
    for name, fmt in [("a.png", "PNG"), ("b.webp", "WEBP"), ("c.jfif", "JPEG"), ("d.tif", "TIFF"),
                      ("e.bmp", "BMP"), ("f.jpg", "PNG"), ("g_no_suffix", "PNG"),
                      ("sub/deep.gif", "GIF"), (".hidden/x.png", "PNG")]:  # fmt: skip
        save(img, root / name, format=fmt)
    save(img, other / "h.png")
    (root / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "linked").symlink_to(other, target_is_directory=True)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "self").symlink_to(root / "self")
    (root / "dangling.png").symlink_to(tmp_path / "gone.png")
    timer = fifo_with_watchdog(root / "pipe.png")
    out = tmp_path / "pred.json"
    code, _, err = run(capsys, args(ckpt, root, "--out", out))
    timer.cancel()
    assert code == 1
    rows = {str(Path(r["file"]).relative_to(root)): r for r in json.loads(out.read_text())}
    ok = {"a.png", "b.webp", "c.jfif", "d.tif", "e.bmp", "f.jpg", "g_no_suffix", "sub/deep.gif",
          "linked/h.png"}  # fmt: skip
    errors = {
        "notes.txt": "not a readable image",
        "sub/loop": "symlink loop",
        "self": "symlink loop",
        "dangling.png": "dangling symlink",
        "pipe.png": "not a regular file (a FIFO)",
    }
    assert set(rows) == ok | set(errors)  # nothing hidden, nothing dropped
    assert all(rows[name]["status"] == "ok" for name in ok)
    for name, words in errors.items():
        assert rows[name]["status"] == "error" and words in rows[name]["message"], name
    assert str(root) in rows["sub/loop"]["message"]  # names the folder it leads back to
    assert "9 of 14 files predicted" in err and "2 hidden entries skipped" in err


def test_devices_fifos_and_huge_files_are_refused_unread(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    good = save(Image.fromarray(radiograph()), tmp_path / "good.png")
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as fh:  # sparse: no disk used, and never read
        fh.truncate(inputs.MAX_FILE_BYTES + 1)
    at_cap = save(Image.fromarray(radiograph(seed=2)), tmp_path / "at_cap.png")
    with open(at_cap, "ab") as fh:  # PNG ignores bytes after IEND: exactly at the cap is fine
        fh.truncate(inputs.MAX_FILE_BYTES)
    timer = fifo_with_watchdog(tmp_path / "pipe")
    out = tmp_path / "pred.json"
    started = time.perf_counter()
    paths = ["/dev/zero", tmp_path / "pipe", huge, at_cap, good]
    code, _, err = run(capsys, args(ckpt, *paths, "--out", out))
    timer.cancel()
    assert code == 1 and time.perf_counter() - started < 15
    rows = {r["file"]: r for r in json.loads(out.read_text())}
    assert rows[str(good)]["status"] == "ok" and rows[str(at_cap)]["status"] == "ok"
    assert "not a regular file (a character device)" in rows["/dev/zero"]["message"]
    assert "not a regular file (a FIFO)" in rows[str(tmp_path / "pipe")]["message"]
    assert "larger than 200 MB" in rows[str(huge)]["message"]
    assert "2 of 5 files predicted" in err


# --- sanity warnings --------------------------------------------------------------------------


def pattern(width: int, height: int) -> np.ndarray:
    """Smooth light and dark bands at any shape: survives the squash-resize with its contrast."""
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    return np.clip(128 + 90 * np.sin(4 * np.pi * xx) * np.cos(3 * np.pi * yy), 0, 255).astype(
        np.uint8
    )


def transparent(path: Path) -> Path:
    """A radiograph under alpha 0: composited onto black, as every transparent pixel is."""
    rgba = np.dstack([np.stack([radiograph()] * 3, -1), np.zeros((64, 64), np.uint8)])
    return save(Image.fromarray(rgba, mode="RGBA"), path)


ODD_IMAGES = {
    "transparent": (transparent, {"near-constant"}),
    "constant": (lambda p: save(Image.new("L", (256, 256), 128), p), {"near-constant"}),
    "one_pixel": (lambda p: save(Image.new("L", (1, 1), 200), p), {"near-constant", "tiny"}),
    "strip_4000x50": (
        lambda p: save(Image.fromarray(pattern(4000, 50)), p),
        {"extreme aspect ratio", "tiny"},
    ),
    "wide_4to1": (lambda p: save(Image.fromarray(pattern(800, 200)), p), {"extreme aspect ratio"}),
    "tall_1to4": (lambda p: save(Image.fromarray(pattern(200, 800)), p), {"extreme aspect ratio"}),
    "small": (lambda p: save(Image.fromarray(pattern(48, 40)), p), {"tiny"}),
    "small_dicom": (
        lambda p: write_dicom(p.with_suffix(".dcm"), ramp(32)),
        {"tiny"},  # the original size comes from the DICOM too
    ),
}
WARNING_KINDS = ("near-constant", "extreme aspect ratio", "tiny")


@pytest.mark.parametrize("case", ODD_IMAGES)
def test_odd_images_are_predicted_with_a_warning(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str], case: str
) -> None:
    make, expected = ODD_IMAGES[case]
    odd = make(tmp_path / f"{case}.png")
    normal = save(Image.fromarray(radiograph()), tmp_path / "normal.png")
    out = tmp_path / "pred.csv"
    code, stdout, err = run(capsys, args(ckpt, odd, normal, "--out", out))
    assert code == 0, err  # warnings alone do not fail the run
    table = pd.read_csv(out, keep_default_na=False).set_index("file")
    warning = table.loc[str(odd), "warning"]
    assert {kind for kind in WARNING_KINDS if kind in warning} == expected, warning
    assert table.loc[str(odd), "status"] == "ok" and table.loc[str(normal), "warning"] == ""
    odd_line = next(line for line in stdout.splitlines() if f"/{odd.name} " in line)
    assert f"WARNING: {warning}" in odd_line and "WARNING" not in stdout.replace(odd_line, "")
    assert "1 with warnings" in err
    assert run(capsys, args(ckpt, odd, normal, "--strict"))[0] == 1
    assert run(capsys, args(ckpt, normal, "--strict"))[0] == 0


def test_warning_thresholds_are_the_documented_ones() -> None:
    """Just inside each limit: no warning; just outside: that warning only."""
    flat = np.zeros((32, 32), np.uint8)
    flat[:, :16] = 10  # std exactly 5.0
    lively = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # std ~74
    square = np.zeros((100, 100), np.uint8)

    def kinds(original: np.ndarray, pixels: np.ndarray) -> list[str]:
        found = api.sanity_warnings(original, pixels)
        return [kind for warning in found for kind in WARNING_KINDS if warning.startswith(kind)]

    assert api.MIN_PIXEL_STD == 5.0
    assert kinds(square, flat) == []
    flatter = flat.copy()
    flatter[0, 0] = 0  # std just under 5
    assert kinds(square, flatter) == ["near-constant"]
    assert (api.MAX_ASPECT_RATIO, api.MIN_SIDE) == (3.0, 64)
    assert kinds(np.zeros((64, 192), np.uint8), lively) == []
    assert kinds(np.zeros((193, 64), np.uint8), lively) == ["extreme aspect ratio"]
    assert kinds(np.zeros((63, 100), np.uint8), lively) == ["tiny"]


# --- Ctrl-C -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_ctrl_c_saves_the_rows_done_and_exits_130(
    tmp_path: Path,
    ckpt: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    suffix: str,
) -> None:
    files = [save(Image.fromarray(radiograph(seed=s)), tmp_path / f"{s}.png") for s in range(3)]
    real, calls = predict.predict_chunk, []

    def interrupt_second_chunk(*a: object, **k: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(predict, "predict_chunk", interrupt_second_chunk)
    out = tmp_path / "out" / f"pred{suffix}"
    code, stdout, err = run(capsys, args(ckpt, *files, "--batch-size", 1, "--out", out))
    assert code == 130 and "Traceback" not in err and len(calls) == 2
    assert "interrupted" in err and "after 1 of 3 files" in err and f"saved in {out}" in err
    rows = pd.read_csv(out) if suffix == ".csv" else pd.DataFrame(json.loads(out.read_text()))
    assert rows["file"].tolist() == [str(files[0])] and rows["status"].tolist() == ["ok"]
    assert "/0.png " in stdout and "/1.png " not in stdout  # the table shows the rows saved
    assert listing(tmp_path / "out") == [out.name]


def test_ctrl_c_before_any_row_keeps_an_earlier_out(
    tmp_path: Path,
    ckpt: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = save(Image.fromarray(radiograph()), tmp_path / "in" / "x.png")
    out = tmp_path / "pred.csv"
    yesterday = ",".join(COLUMNS) + "\nyesterday's predictions\n"
    out.write_text(yesterday)

    def interrupt(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "predict_chunk", interrupt)
    code, stdout, err = run(capsys, args(ckpt, image, "--out", out))
    assert code == 130 and "Traceback" not in err and stdout == ""
    assert "after 0 of 1 files; nothing was finished, nothing written" in err
    assert out.read_text() == yesterday and listing(tmp_path) == [
        "in", "in/x.png", "pred.csv"
    ]  # fmt: skip


# --- the lung check and the lung crop (the segmenter stubbed: its own tests are in test_lungs) --


def two_lungs(size: int) -> np.ndarray:
    """A plausible mask: two upright ellipses, about 30% of the image."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    left = ((xx - 0.3) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 <= 1
    right = ((xx - 0.7) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 <= 1
    return left | right


@pytest.fixture
def stub_segmenter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lungs found in every image but the near-black ones, where the 'segmenter' finds none."""

    def fake_segment(segmenter, images):
        size = images.shape[1]
        return np.stack([two_lungs(size) if x.mean() > 20 else np.zeros((size, size), bool)
                         for x in images])  # fmt: skip

    monkeypatch.setattr(api, "segment", fake_segment)
    monkeypatch.setattr(loading, "load_segmenter_for", lambda spec, path: ("stub", {}))


def test_lung_check_warns_when_no_plausible_lungs(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str], stub_segmenter
) -> None:
    """Checked by hand: dropping implausible_lungs from predict_chunk turns this red."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(radiograph(96, seed=3)).save(folder / "chest.png")
    Image.fromarray(np.full((96, 96), 5, np.uint8) + radiograph(96) // 40).save(folder / "dark.png")
    out = tmp_path / "p.json"
    code, _, _ = run(capsys, args(ckpt, folder, "--out", out))
    by_name = {Path(r["file"]).name: r for r in json.loads(out.read_text())}
    assert code == 0
    assert by_name["chest.png"]["warning"] == ""
    assert "no plausible pair of lungs" in by_name["dark.png"]["warning"]
    code, _, _ = run(capsys, args(ckpt, folder, "--out", out, "--strict"))
    assert code == 1


def test_implausible_lungs_thresholds() -> None:
    from cxr.lungs import LUNG_AREA_RANGE, implausible_lungs

    assert implausible_lungs(two_lungs(64)) == ""
    assert "lung area 0%" in implausible_lungs(np.zeros((64, 64), bool))
    assert "lung area 100%" in implausible_lungs(np.ones((64, 64), bool))
    sliver = np.zeros((64, 64), bool)
    sliver[:, :4] = True  # 6% of the image but a 4 px wide strip: no chest
    assert LUNG_AREA_RANGE[0] <= sliver.mean() and "too small" in implausible_lungs(sliver)


@pytest.mark.parametrize("crop", ["lungs", "mask"])
def test_crop_parity_between_training_arrays_and_predict(
    tmp_path: Path, ckpt: dict[str, Path], stub_segmenter, crop: str
) -> None:
    """The same file, through the split stage's preprocessing + cxr.lungs.crop_inputs (what
    training reads) and through predict: identical model input, cropped or masked."""
    from cxr.lungs import crop_inputs

    path = tmp_path / "film.png"
    Image.fromarray(radiograph(200, seed=5)).save(path)
    models = loading.load_models(ckpt["four"], ckpt["binary"], ckpt["segmenter"])
    spec = dataclasses.replace(models.spec, crop=crop, crop_margin=0.1)
    models = dataclasses.replace(models, spec=spec)
    threshold = loading.Threshold(0.5, "argument")
    _, batch = predict.predict_chunk([inputs.Input(path)], models, threshold, 4)
    array = preprocess_file(path, spec)  # what the split stage stores for this file
    trained_on = crop_inputs(array[None], two_lungs(spec.image_size)[None], spec.to_dict())
    assert np.array_equal(batch, trained_on)
    assert not np.array_equal(batch[0], array)  # the crop did something
    if crop == "mask":  # framing and scale kept: the lungs' own pixels as they were
        lung = two_lungs(spec.image_size) > 0
        assert np.array_equal(batch[0][lung], array[lung])


def test_crop_models_without_a_segmenter_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    four = make_checkpoint(tmp_path / "f.pt", "four_class", seed=1)
    binary = make_checkpoint(tmp_path / "b.pt", "binary", seed=2)
    for path in (four, binary):
        blob = torch.load(path, weights_only=True)
        blob["meta"]["preprocessing"]["crop"] = "lungs"
        torch.save(blob, path)
    argv = [str(Image.new("L", (1, 1)) and tmp_path), "--four-class", str(four), "--binary",
            str(binary), "--threshold", "0.5", "--segmenter", str(tmp_path / "none.pt")]  # fmt: skip
    code, _, err = run(capsys, argv)
    assert code == 2 and "need the lung segmenter" in err


# --- images read as they are meant to be seen (issue 22) --------------------------------------


def test_exif_orientation_is_applied_as_the_split_stage_reads_it(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A film stored sideways with EXIF orientation 6 is predicted like the upright film, and
    its model input is what the split stage's reader (preprocess_file) makes of the same file.
    Watched red before the fix: without cxr.images.upright the two p(covid) differed."""
    film = radiograph(96, seed=4)[:, :72]  # not square, so sideways is visibly different
    upright = save(Image.fromarray(film), tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # row 0 is the right side: stored rotated a quarter turn anticlockwise
    sideways = save(Image.fromarray(np.rot90(film).copy()), tmp_path / "sideways.png", exif=exif)
    out = tmp_path / "p.json"
    assert run(capsys, args(ckpt, upright, sideways, "--out", out))[0] == 0
    a, b = json.loads(out.read_text())
    assert (a["binary_p_covid"], a["p_covid"]) == (b["binary_p_covid"], b["p_covid"])
    models = loading.load_models(ckpt["four"], ckpt["binary"], None)
    batch = api.model_inputs([inputs.Input(sideways)], models)
    assert np.array_equal(batch.images[0], preprocess_file(sideways, models.spec))


def write_multiframe_dicom(path: Path, frames: np.ndarray) -> Path:
    """A 16-bit MONOCHROME2 file of len(frames) frames (a cine or tomosynthesis series)."""
    write_dicom(path, frames[0], photometric="MONOCHROME2")
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = len(frames)
    ds.PixelData = frames.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_multi_frame_files_warn_that_only_the_first_frame_was_used(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Watched red before the fix: the GIF, TIFF and DICOM rows had an empty warning."""
    pages = [Image.fromarray(radiograph(seed=s)) for s in (1, 2, 3)]
    folder = tmp_path / "in"
    save(pages[0], folder / "anim.gif", save_all=True, append_images=pages[1:2])
    save(pages[0], folder / "pages.tif", save_all=True, append_images=pages[1:])
    write_multiframe_dicom(folder / "cine.dcm", np.stack([ramp(), ramp()[::-1]]))
    save(pages[0], folder / "single.gif")
    out = tmp_path / "p.csv"
    code, stdout, err = run(capsys, args(ckpt, folder, "--out", out))
    assert code == 0, err
    table = pd.read_csv(out, keep_default_na=False).set_index("file")
    frames = {"anim.gif": 2, "pages.tif": 3, "cine.dcm": 2, "single.gif": 1}
    for name, n in frames.items():
        row = table.loc[str(folder / name)]
        expected = f"multi-frame file ({n} frames): only the first frame was predicted"
        assert row["status"] == "ok" and row["warning"] == ("" if n == 1 else expected), name
    assert "3 with warnings" in err
    # The first frame is the one predicted: the DICOM's equals its first frame read alone.
    assert table.loc[str(folder / "cine.dcm"), "p_covid"] == pytest.approx(
        direct_gray(
            ckpt, read_dicom(write_dicom(tmp_path / "one.dcm", ramp(), photometric="MONOCHROME2"))
        ),
        abs=1e-6,
    )


def direct_gray(ckpt: dict[str, Path], gray: np.ndarray) -> float:
    four, meta = load_checkpoint(ckpt["four"], "four_class")
    x = np.stack([preprocess_gray(gray, Preprocessing(**meta["preprocessing"]))])
    return float(predict_proba(four, x)[0, 0])


# --- never overwrite what is not ours, never read our own output (issue 22) --------------------


@pytest.mark.parametrize(
    "name, content",
    [
        ("other.csv", "patient,score\n1,0.3\n"),
        ("other.json", json.dumps({"results": [1, 2]})),
        ("list.json", json.dumps([{"file": "x", "score": 1}])),
        ("notes.csv", ""),
    ],
)
def test_out_refuses_a_file_predict_did_not_write_unless_forced(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str], name: str,
    content: str,
) -> None:  # fmt: skip
    """Watched red before the fix: a CSV with other columns was overwritten, exit 0."""
    image = save(Image.fromarray(radiograph()), tmp_path / "in" / "x.png")
    out = tmp_path / name
    out.write_text(content)
    code, stdout, err = run(capsys, args(ckpt, image, "--out", out))
    assert code == 2 and err.count("\n") == 1 and stdout == "", err
    assert f"--out {out} exists and is not an earlier output of predict" in err and "--force" in err
    assert out.read_text() == content and listing(tmp_path) == ["in", "in/x.png", name]
    assert run(capsys, args(ckpt, image, "--out", out, "--force"))[0] == 0
    assert outputs.written_by_predict(out) and str(image) in out.read_text()


def test_out_and_cam_inside_the_input_folder_are_never_read_back(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Watched red before the fix: the second run predicted its own pred.csv (an error row,
    exit 1) and the first run's overlays."""
    folder = tmp_path / "in"
    out, cams = folder / "pred.csv", folder / "cams"
    films = [save(Image.fromarray(radiograph(seed=s)), folder / f"{s}.png") for s in range(2)]
    films.append(save(Image.fromarray(radiograph(seed=7)), cams / "mine.png"))  # the user's
    (folder / ".pred.csv.0123abcd.tmp").write_text("a temporary left by a killed run")
    for attempt in range(2):
        code, _, err = run(capsys, args(ckpt, folder, "--out", out, "--cam", cams))
        assert code == 0, (attempt, err)
        assert pd.read_csv(out)["file"].tolist() == [str(f) for f in films]
    assert sorted(p.name for p in cams.iterdir()) == ["0_cam.png", "1_cam.png", "mine.png",
                                                      "mine_cam.png"]  # fmt: skip
    # pred.csv, the temporary and the three overlays; the user's own film in cams/ is read
    assert "3 of 3 files predicted" in err and "5 of predict's own outputs skipped" in err
    code, _, err = run(capsys, args(ckpt, out, "--out", out))  # only our own output given
    assert code == 2 and "only predict's own outputs" in err


# --- Ctrl-C at any moment (issue 22) ----------------------------------------------------------


class InterruptImport:
    """A meta path finder that raises KeyboardInterrupt when `name` is imported: Ctrl-C
    arriving while torch and the models' code load."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: object, target: object = None) -> None:
        if fullname == self.name:
            raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["predict", "calibrate"])
def test_ctrl_c_while_importing_is_one_line_and_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:  # fmt: skip
    """Watched red before the fix: the KeyboardInterrupt escaped cxr.__main__ (a traceback)."""
    import sys

    from cxr.__main__ import main

    monkeypatch.delitem(sys.modules, f"cxr.{command}", raising=False)
    monkeypatch.setattr(sys, "meta_path", [InterruptImport(f"cxr.{command}"), *sys.meta_path])
    with pytest.raises(SystemExit) as info:
        main([command, str(tmp_path)])
    _, err = capsys.readouterr()
    assert info.value.code == 130
    assert err == "error: interrupted (Ctrl-C); no file was left half-written\n"


# `python -m cxr ...` (its main), after touching a file once cxr.__main__ is imported: a Ctrl-C
# before that (interpreter start-up, site, runpy) reaches no code of ours and ends in Python's
# own traceback, a window of a few milliseconds that no program can close from inside.
RUN_AFTER_STARTUP = (
    "import sys; import cxr.__main__ as m; open(sys.argv[1], 'w').close(); m.main(sys.argv[2:])"
)


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.8])
def test_ctrl_c_in_the_first_second_of_a_real_run(
    tmp_path: Path, ckpt: dict[str, Path], delay: float
) -> None:
    """SIGINT to `python -m cxr predict` while it imports torch and loads the models: status
    130, one line, no traceback, no --out. Watched red before the fix (a KeyboardInterrupt
    traceback from the imports)."""
    import signal
    import sys

    image = save(Image.fromarray(radiograph()), tmp_path / "x.png")
    out, started = tmp_path / "p.csv", tmp_path.parent / f"{tmp_path.name}.started"
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = ["predict", *args(ckpt, image, "--out", out)]
    # A user's Ctrl-C reaches a program whose SIGINT is at its default. A test runner started in
    # the background of a script (`pytest &`) ignores SIGINT and its children inherit that, so
    # the child gets the default back, as a terminal would give it.
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_AFTER_STARTUP, str(started), *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)
    time.sleep(delay)
    assert proc.poll() is None, "predict finished before the interrupt: the test proves nothing"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.count("error:") == 1, stderr
    assert [line for line in stderr.splitlines() if "error:" in line] == [stderr.splitlines()[-1]]
    assert not out.exists() and listing(tmp_path) == ["x.png"]


# --- reading the next files while the models run ----------------------------------------------


def mixed_inputs(folder: Path) -> list[inputs.Input]:
    """Readable films of several sizes, an unreadable file and a missing one."""
    files = [save(Image.fromarray(radiograph(size=40 + 9 * s, seed=s)), folder / f"{s}.png")
             for s in range(7)]  # fmt: skip
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    files[3:3] = [folder / "broken.png", folder / "missing.png"]
    return [inputs.Input(f) for f in files]


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_reading_ahead_gives_every_chunk_as_read_in_turn(tmp_path: Path, workers: int) -> None:
    """Checked by hand: submitting the next chunk's files in place of this one's (an
    off-by-one in read_ahead) turns this red."""
    items = mixed_inputs(tmp_path)
    spec = Preprocessing(**PREP)
    got = list(api.read_ahead(items, spec, 4, workers))
    want = [items[start : start + 4] for start in range(0, len(items), 4)]
    assert [chunk for chunk, _ in got] == want
    for chunk, decoded in got:
        alone = api.read_inputs(chunk, spec)
        assert (decoded.where, decoded.found, decoded.errors) == (
            alone.where, alone.found, alone.errors
        )  # fmt: skip
        assert all(np.array_equal(a, b) for a, b in zip(decoded.pixels, alone.pixels, strict=True))
    assert sum(len(d.errors) for _, d in got) == 2


def test_reading_ahead_refuses_bombs_in_every_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PIL only warns between its pixel limit and twice it; decode_frames turns the warning
    into an error inside warnings.catch_warnings, which is not thread-safe. Many small files
    over a lowered limit, read by several threads: each is refused, and the filters are left as
    they were. Checked by hand: without read_ahead's own filter, files got through and a
    filter leaked (red)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30 * 30)
    items = [inputs.Input(save(Image.fromarray(radiograph(size=40, seed=s)), tmp_path / f"{s}.png"))
             for s in range(200)]  # fmt: skip
    filters = list(warnings.filters)
    for _ in range(6):
        decoded = [d for _, d in api.read_ahead(items, Preprocessing(**PREP), 8, 4)]
        assert sum(len(d.errors) for d in decoded) == len(items)
        assert all("decompression bomb" in m for d in decoded for m in d.errors.values())
    assert warnings.filters == filters


def test_predict_rows_do_not_depend_on_read_threads(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    items = mixed_inputs(tmp_path / "in")
    rows = {}
    for workers in (0, 2):
        out = tmp_path / f"pred{workers}.csv"
        code, _, _ = run(capsys, args(ckpt, tmp_path / "in", "--batch-size", 3,
                                      "--read-threads", workers, "--out", out))  # fmt: skip
        assert code == 1  # the broken file
        rows[workers] = pd.read_csv(out, keep_default_na=False)
    assert len(rows[0]) == len(items) - 1  # the missing file was never in the folder
    pd.testing.assert_frame_equal(rows[0], rows[2])


def test_loaded_classifiers_run_channels_last(ckpt: dict[str, Path]) -> None:
    """predict's classifiers hold NHWC weights (~20% faster on the CPU, docs/performance.md);
    their probabilities stay within 1e-5 of the checkpoint's as saved (the evaluate stage's).
    Checked by hand: loading without channels_last turns this red."""
    models = loading.load_models(ckpt["four"], ckpt["binary"])
    conv = models.binary.backbone.layer1[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images = np.stack([radiograph(size=32, seed=s) for s in range(5)])
    plain, _ = load_checkpoint(ckpt["binary"])
    np.testing.assert_allclose(
        predict_proba(models.binary, images), predict_proba(plain, images), atol=1e-5
    )
