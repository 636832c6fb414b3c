"""Tests for cxr.predict and cxr.dicom on tiny resnet18 checkpoints and synthetic radiographs."""

from __future__ import annotations

import csv
import io
import json
import struct
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
from cxr.images import Preprocessing, load_image, preprocess, preprocess_gray
from cxr.models import CHECKPOINT_FORMAT, build_model, load_checkpoint, save_checkpoint
from cxr.train import predict_proba

ROOT = Path(__file__).resolve().parents[1]
FOUR = ["covid", "viral", "bacterial", "normal"]
PREP = {"image_size": 32, "harmonise": True, "harmonise_size": 224, "jpeg_quality": 75}
# One thread: on 2 shared cores a second OpenMP thread makes these tiny batches far slower.
THREADS = ["--threads", "1"]
COLUMNS = ["file", "status", "predicted", "p_predicted", "p_covid", "p_viral", "p_bacterial",
           "p_normal", "binary_p_covid", "threshold", "covid_positive", "cam", "message"]  # fmt: skip


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
    }


def args(ckpt: dict[str, Path], *extra: object) -> list[str]:
    fixed = ["--four-class", ckpt["four"], "--binary", ckpt["binary"], *THREADS]
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
    """One of each supported kind, plus a non-image file the folder walk must skip."""
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
    (root / "notes.txt").write_text("not an image, and not named like one")
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
    assert [r["file"] for r in records] == sorted(str(p) for p in files.values())  # not notes.txt
    by_file = {Path(r["file"]): r for r in records}
    for r in records:
        assert list(r) == COLUMNS
        assert r["status"] == "ok" and r["message"] == ""
        probs = np.array([r[f"p_{c}"] for c in FOUR])
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert r["predicted"] == FOUR[int(probs.argmax())] and r["p_predicted"] == probs.max()
        assert 0.0 <= r["binary_p_covid"] <= 1.0 and r["threshold"] == 0.5
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
    fixed = ["--four-class", ckpt["four"], "--binary", ckpt["binary"], *THREADS]
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
    fixed = ["--four-class", ckpt["four"], "--binary", ckpt["binary"], *THREADS]
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


def test_empty_folder_is_a_clear_error(
    tmp_path: Path, ckpt: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    code, _, err = run(capsys, args(ckpt, tmp_path / "empty"))
    assert code == 2 and err.startswith("error: no images") and "empty" in err
    assert "Traceback" not in err


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


def test_dicom_fixture_is_a_part10_file(tmp_path: Path) -> None:
    """Guards the DICOM fixture itself: a real Part 10 file with the tags the reader uses."""
    ds = pydicom.dcmread(write_dicom(tmp_path / "x.dcm", ramp(8)))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and float(ds.RescaleSlope) == 2.0
    assert (tmp_path / "x.dcm").read_bytes()[128:132] == b"DICM"
