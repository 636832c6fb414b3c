"""The predict-speed benchmark's film folders and page (cxr/predict_speed.py); the timed runs
themselves are a measurement, made by hand (reports/predict_speed.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cxr import predict_speed


def fake_raw(root: Path) -> Path:
    rows = []
    for dataset, ext, width in (("kermany", "jpeg", 224), ("nih", "png", 1024),
                                ("ieee8023", "jpg", 1200), ("ieee8023", "png", 640),
                                ("ieee8023", "jpg", 400)):  # fmt: skip
        for i in range(3):
            rel = f"images/{dataset}/{width}_{i}.{ext}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(i).integers(0, 256, (width, width), dtype=np.uint8)
            Image.fromarray(pixels).save(root / rel)
            rows.append({"file": rel, "dataset": dataset, "width": width})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def test_folders_hold_each_size_class_and_a_mix(tmp_path: Path) -> None:
    """Watched red with the big class's films left at their own size (scale 1)."""
    raw = fake_raw(tmp_path / "raw")
    folders = predict_speed.build_folders(raw, tmp_path / "work", n=2, seed=0)
    sizes = {name: [Image.open(f).size for f in files] for name, files in folders.items()}
    assert all(s == (224, 224) for s in sizes["224 px JPEG (kermany)"])
    assert all(s == (1024, 1024) for s in sizes["1024 px PNG (nih)"])
    assert all(s == (1200, 1200) for s in sizes["1-2.8k px JPEG (ieee8023)"])
    big = sizes[f"{predict_speed.BIG_SIDE} px PNG (ieee8023, scaled up)"]
    assert len(big) == 2 and all(max(s) == predict_speed.BIG_SIDE for s in big)
    assert len(folders["mixed (all of the above)"]) == 8


def test_page_names_the_cpu_and_every_class() -> None:
    result = {"cpu": {"model": "Some CPU", "cores": 2}, "repeats": 2, "one_film_wall_s": 4.2,
              "classes": {"a": {"mean_file_mb": 0.1, "films": 3, "films_per_s": 12.5,
                                "wall_s": 9.0}}}  # fmt: skip
    page = predict_speed.markdown(result, "python -m cxr predict-speed")
    assert "Some CPU (2 cores)" in page and "| a | 0.10 | 3 | 12.5 | 9.0 |" in page
    assert "4.2 s wall" in page


def test_page_gives_the_server_calls_when_measured() -> None:
    """Watched red with the server's line left out of the page."""
    result = {"cpu": {"model": "Some CPU", "cores": 2}, "repeats": 2, "one_film_wall_s": 4.2,
              "classes": {}, "server": {"start_s": 7.5, "one_film_wall_s": 0.31,
                                        "mixed": {"films_per_s": 18.25, "wall_s": 6.6}}}  # fmt: skip
    page = predict_speed.markdown(result, "python -m cxr predict-speed")
    assert "started once in 7.5 s" in page and "one-film call 0.31 s wall" in page
    assert "mixed folder 18.2 films/s, 6.6 s wall" in page


def test_page_gives_the_median_start_up_and_a_python_without_bytecode_cache() -> None:
    """The one-film call varies by about a second between calls here: the page gives the median
    of the calls and their range, and says when Python could not cache its bytecode (every
    start then compiles the project again). Watched red with the range left out of the line."""
    runs = [3.1, 2.5, 2.9, 2.7, 4.0]
    result = {"cpu": {"model": "Some CPU", "cores": 2}, "repeats": 2, "classes": {},
              "one_film_wall_s": 2.9, "one_film_wall_s_runs": runs, "bytecode_cache": False}  # fmt: skip
    page = predict_speed.markdown(result, "python -m cxr predict-speed")
    assert "2.9 s wall (median of 5 calls, 2.5-4.0 s)" in page
    assert "PYTHONDONTWRITEBYTECODE" in page
    result["bytecode_cache"] = True
    assert "PYTHONDONTWRITEBYTECODE" not in predict_speed.markdown(result, "x")
