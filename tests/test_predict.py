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

from cxr import predict
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
           "p_normal", "binary_p_covid", "threshold", "covid_positive", "cam", "warning",
           "message"]  # fmt: skip


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


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    metrics = d / "binary.json"
    metrics.write_text(json.dumps({"threshold": {"value": 0.5, "method": "youden"}}))
    return {
        "four": make_checkpoint(d / "four_class.pt", "four_class", seed=1),
        "binary": make_checkpoint(d / "binary.pt", "binary", seed=2),
        "metrics": metrics,
        "segmenter": d / "no-segmenter.pt",  # absent: the lung check is tested on its own
    }


def args(ckpt: dict[str, Path], *extra: object) -> list[str]:
    fixed = ["--four-class", ckpt["four"], "--binary", ckpt["binary"], *THREADS,
             "--segmenter", ckpt["segmenter"]]  # fmt: skip
    return [str(a) for a in (*extra, *fixed, "--threshold-from", ckpt["metrics"])]


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


def test_threshold_comes_from_the_metrics_file(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    image = save(Image.fromarray(radiograph()), tmp_path / "x.png")
    fixed = ["--four-class", ckpt["four"], "--binary", ckpt["binary"], *THREADS,
             "--segmenter", ckpt["segmenter"]]  # fmt: skip
    for value, positive in ((0.0, True), (1.0, False)):
        metrics = tmp_path / f"t{value}.json"
        metrics.write_text(json.dumps({"threshold": {"value": value}}))
        out = tmp_path / "p.json"
        argv = [str(a) for a in (image, *fixed, "--threshold-from", metrics, "--out", out)]
        assert run(capsys, argv)[0] == 0
        assert json.loads(out.read_text())[0]["covid_positive"] is positive


@pytest.mark.parametrize("content", [None, {"threshold": 0.4}, {"auc": 0.9}, "not json"])
def test_missing_threshold_is_a_usage_error_unless_given(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str], content: object
) -> None:
    image = save(Image.fromarray(radiograph()), tmp_path / "x.png")
    metrics = tmp_path / "binary.json"
    if content is not None:
        metrics.write_text(content if isinstance(content, str) else json.dumps(content))
    fixed = ["--four-class", ckpt["four"], "--binary", ckpt["binary"], *THREADS,
             "--segmenter", ckpt["segmenter"]]  # fmt: skip
    base = [str(a) for a in (image, *fixed)]
    code, _, err = run(capsys, [*base, "--threshold-from", str(metrics)])
    assert code == 2 and err.startswith("error: ") and "--threshold" in err
    assert run(capsys, [*base, "--threshold-from", str(metrics), "--threshold", "0.5"])[0] == 0


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
        argv = args(ckpt, image)
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


@pytest.mark.mirror
def test_real_radiographs_from_the_mirror(
    tmp_path: Path,
    ckpt: dict[str, Path],
    reference: tuple,
    mirror: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Real adult radiographs (Hannover PNG, ieee8023); no mirror: skip, or fail if CI=true."""
    sources = pd.read_csv(mirror / "sources.csv", keep_default_na=False)
    picks = [
        sources[(sources["sample"] == 1) & (sources["dataset"] == d)].iloc[0]
        for d in ("hannover", "ieee8023")
    ]
    files = [mirror / row["path"] for row in picks]
    out = tmp_path / "pred.json"
    code, _, err = run(capsys, args(ckpt, *files, "--out", out))
    assert code == 0, err
    for record, path in zip(json.loads(out.read_text()), files, strict=True):
        assert record["status"] == "ok" and record["file"] == str(path)
        want_four, want_covid = direct(reference, load_image(path))
        np.testing.assert_allclose([record[f"p_{c}"] for c in FOUR], want_four, atol=1e-5)
        assert record["binary_p_covid"] == pytest.approx(want_covid, abs=1e-5)


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
    out.write_text("old content that is longer than nothing" * 100)
    image = save(Image.fromarray(radiograph()), tmp_path / "in" / "x.png")
    assert run(capsys, args(ckpt, image, "--out", out))[0] == 0
    assert [r["file"] for r in json.loads(out.read_text())] == [str(image)]
    assert listing(tmp_path) == ["in", "in/x.png", "pred.json"]


# --- file names that are not UTF-8 ------------------------------------------------------------


def test_printable_escapes_only_the_bytes_that_are_not_utf8() -> None:
    assert predict.printable(os.fsdecode(b"scan\xff\xfe.png")) == "scan\\xff\\xfe.png"
    assert predict.printable("röntgen/Ωmega.png") == "röntgen/Ωmega.png"
    assert predict.printable("lone \ud800 surrogate") == "lone \\ud800 surrogate"


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
        fh.truncate(predict.MAX_FILE_BYTES + 1)
    at_cap = save(Image.fromarray(radiograph(seed=2)), tmp_path / "at_cap.png")
    with open(at_cap, "ab") as fh:  # PNG ignores bytes after IEND: exactly at the cap is fine
        fh.truncate(predict.MAX_FILE_BYTES)
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
        found = predict.sanity_warnings(original, pixels)
        return [kind for warning in found for kind in WARNING_KINDS if warning.startswith(kind)]

    assert predict.MIN_PIXEL_STD == 5.0
    assert kinds(square, flat) == []
    flatter = flat.copy()
    flatter[0, 0] = 0  # std just under 5
    assert kinds(square, flatter) == ["near-constant"]
    assert (predict.MAX_ASPECT_RATIO, predict.MIN_SIDE) == (3.0, 64)
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
    out.write_text("yesterday's predictions\n")

    def interrupt(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "predict_chunk", interrupt)
    code, stdout, err = run(capsys, args(ckpt, image, "--out", out))
    assert code == 130 and "Traceback" not in err and stdout == ""
    assert "after 0 of 1 files; nothing was finished, nothing written" in err
    assert out.read_text() == "yesterday's predictions\n" and listing(tmp_path) == [
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

    monkeypatch.setattr(predict, "segment", fake_segment)
    monkeypatch.setattr(predict, "load_segmenter_for", lambda spec, path: ("stub", {}))


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


def test_crop_parity_between_training_arrays_and_predict(
    tmp_path: Path, ckpt: dict[str, Path], stub_segmenter
) -> None:
    """The same file, through the split stage's preprocessing + cxr.lungs.crop_inputs (what
    training reads) and through predict: identical model input."""
    from cxr.lungs import crop_inputs

    path = tmp_path / "film.png"
    Image.fromarray(radiograph(200, seed=5)).save(path)
    models = predict.load_models(ckpt["four"], ckpt["binary"], ckpt["segmenter"])
    spec = dataclasses.replace(models.spec, crop="lungs", crop_margin=0.1)
    models = dataclasses.replace(models, spec=spec)
    _, batch = predict.predict_chunk([predict.Input(path)], models, 0.5, 4)
    array = preprocess_file(path, spec)  # what the split stage stores for this file
    trained_on = crop_inputs(array[None], two_lungs(spec.image_size)[None], spec.to_dict())
    assert np.array_equal(batch, trained_on)
    assert not np.array_equal(batch[0], array)  # the crop did something


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
