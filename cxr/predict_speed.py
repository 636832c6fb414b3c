"""predict's speed on real radiographs, by image size, and its start-up time.

    python -m cxr predict-speed --raw data/raw --models models --out reports/predict_speed.json

Builds folders of real films from the fetch stage's images (`data/raw`, so it needs no network
and no mirror): 224 px JPEGs (Kermany), 1024 px PNGs (NIH), the largest ieee8023 JPEGs (1-2.8k
px) and 2,500 px PNGs of several MB (ieee8023 films scaled up with Lanczos and saved as 8-bit
PNG: real content at the size a hospital's export has), and one folder that mixes them all.
Each folder is predicted by `python -m cxr predict` in a fresh process, as a user runs it; the
films/s is predict's own count (decode, harmonise, segmenter, both classifiers, the gate), the
wall time includes starting Python, importing torch and loading the models. Start-up is the
wall time of a one-film call, the cost that dominates it. Writes JSON and the same path as .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.growth import ROOT, cpu, cpu_label, time_predict

BIG_SIDE = 2500  # px, the long side of the scaled-up PNGs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cxr predict-speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--raw", type=Path, default=Path("data/raw"), help="fetch stage output")
    parser.add_argument("--models", type=Path, default=Path("models"), help="the model bundle")
    parser.add_argument("--out", type=Path, default=Path("reports/predict_speed.json"))
    parser.add_argument("--films", type=int, default=40, help="films per size class")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each folder (best kept)")
    parser.add_argument("--start-repeats", type=int, default=7,
                        help="one-film calls timed (the median is reported: start-up varies "
                             "by a second from call to call on a shared 2-core machine)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.films, args.repeats, args.start_repeats) < 1:
        parser.error("--films, --repeats and --start-repeats must be >= 1")
    return args


def pick(manifest: pd.DataFrame, rng: np.random.Generator, n: int, mask: pd.Series) -> list[str]:
    """`n` files of the rows under `mask` (all of them when there are fewer)."""
    files = manifest.loc[mask, "file"].to_numpy(dtype=str)
    return sorted(rng.choice(files, size=min(n, len(files)), replace=False).tolist())


def build_folders(raw: Path, work: Path, n: int, seed: int) -> dict[str, list[Path]]:
    """Size class -> the films copied (or made) for it under `work/<class>/`."""
    from PIL import Image

    manifest = pd.read_csv(raw / "manifest.csv", keep_default_na=False)
    rng = np.random.default_rng(seed)
    ext = manifest["file"].str.rsplit(".", n=1).str[-1].str.lower()
    ieee = manifest["dataset"] == "ieee8023"
    chosen = {
        "224 px JPEG (kermany)": pick(manifest, rng, n, manifest["dataset"] == "kermany"),
        "1024 px PNG (nih)": pick(manifest, rng, n, manifest["dataset"] == "nih"),
        "1-2.8k px JPEG (ieee8023)": pick(
            manifest, rng, n, ieee & ext.isin(["jpg", "jpeg"]) & (manifest["width"] >= 1000)
        ),
    }
    folders: dict[str, list[Path]] = {}
    for i, (name, files) in enumerate(chosen.items()):
        folder = work / f"class{i}"
        folder.mkdir(parents=True)
        folders[name] = []
        for j, rel in enumerate(files):
            dest = folder / f"{j:03d}{Path(rel).suffix.lower()}"
            shutil.copyfile(raw / rel, dest)
            folders[name].append(dest)
    big = work / "class3"
    big.mkdir()
    folders[f"{BIG_SIDE} px PNG (ieee8023, scaled up)"] = []
    for j, rel in enumerate(pick(manifest, rng, n, ieee & (manifest["width"] >= 600))):
        with Image.open(raw / rel) as im:
            grey = im.convert("L")
            scale = BIG_SIDE / max(grey.size)
            grey = grey.resize((round(grey.width * scale), round(grey.height * scale)),
                               Image.Resampling.LANCZOS)  # fmt: skip
            dest = big / f"{j:03d}.png"
            grey.save(dest)
            folders[f"{BIG_SIDE} px PNG (ieee8023, scaled up)"].append(dest)
    mixed = work / "mixed"
    mixed.mkdir()
    folders["mixed (all of the above)"] = []
    for files in list(folders.values())[:4]:
        for f in files:
            dest = mixed / f"{f.parent.name}_{f.name}"
            shutil.copyfile(f, dest)
            folders["mixed (all of the above)"].append(dest)
    return folders


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    folders = build_folders(args.raw, work, args.films, args.seed)
    # Python writes no bytecode cache under PYTHONDONTWRITEBYTECODE, so every start compiles
    # this project's modules again (about 0.3-0.5 s here): a user's Python caches by default.
    result: dict[str, Any] = {"cpu": cpu(), "films_per_class": args.films,
                              "repeats": args.repeats, "classes": {},
                              "bytecode_cache": not os.environ.get("PYTHONDONTWRITEBYTECODE")}  # fmt: skip
    for name, files in folders.items():
        runs = [time_predict(files, args.models, work / "out.csv") for _ in range(args.repeats)]
        best = max(runs, key=lambda r: r["films_per_s"])
        mb = sum(f.stat().st_size for f in files) / len(files) / 1e6
        result["classes"][name] = best | {"mean_file_mb": round(mb, 2),
                                          "all_runs_films_per_s": [r["films_per_s"] for r in runs]}  # fmt: skip
    one = folders["1024 px PNG (nih)"][:1]
    starts = [
        time_predict(one, args.models, work / "one.csv")["wall_s"]
        for _ in range(args.start_repeats)
    ]
    result["one_film_wall_s"] = statistics.median(starts)
    result["one_film_wall_s_runs"] = starts
    result["server"] = measure_server(args, work, one, folders["mixed (all of the above)"])
    return result


def measure_server(
    args: argparse.Namespace, work: Path, one: list[Path], mixed: list[Path]
) -> dict[str, Any]:
    """The same calls sent to a resident `python -m cxr serve` (cxr.serve): its own start-up
    (Python, torch, the models) once, then a one-film call and the mixed folder per repeat."""
    sock = Path(tempfile.mkdtemp(prefix="cxrs")) / "s.sock"  # a socket path must be short
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxr", "serve", "--socket", str(sock), "--models", str(args.models)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"cxr serve exited {proc.returncode}:\n{proc.stderr.read()}")
            time.sleep(0.05)
        started = time.perf_counter() - start
        extra = ["--server", "--socket", str(sock)]
        calls = [time_predict(one, args.models, work / "one.csv", extra)["wall_s"]
                 for _ in range(args.repeats)]  # fmt: skip
        runs = [time_predict(mixed, args.models, work / "out.csv", extra)
                for _ in range(args.repeats)]  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(sock.parent, ignore_errors=True)
    return {"start_s": round(started, 2), "one_film_wall_s": min(calls),
            "one_film_wall_s_runs": calls,
            "mixed": max(runs, key=lambda r: r["films_per_s"])}  # fmt: skip


def markdown(r: dict[str, Any], command: str) -> str:
    c = r["cpu"]
    lines = ["# predict: films per second by image size, and start-up", "",
             "| films | mean file (MB) | n | films/s (predict's count) | wall incl. start-up (s) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, v in r["classes"].items():
        lines.append(f"| {name} | {v['mean_file_mb']:.2f} | {v['films']} | {v['films_per_s']:.1f} "
                     f"| {v['wall_s']:.1f} |")  # fmt: skip
    lines += ["", f"One-film call (start-up: Python, torch, the models, one film): "
              f"{r['one_film_wall_s']:.1f} s wall{_spread(r.get('one_film_wall_s_runs', []))}.", ""]  # fmt: skip
    if r.get("bytecode_cache") is False:
        lines += ["Python wrote no bytecode cache (PYTHONDONTWRITEBYTECODE was set): every call "
                  "compiled the project's modules again.", ""]  # fmt: skip
    if "server" in r:  # absent from runs before cxr.serve existed
        v = r["server"]
        lines += ["With a resident server (`python -m cxr serve`, started once in "
                  f"{v['start_s']:.1f} s; calls with `predict --server`): one-film call "
                  f"{v['one_film_wall_s']:.2f} s wall; the mixed folder {v['mixed']['films_per_s']:.1f} "
                  f"films/s, {v['mixed']['wall_s']:.1f} s wall.", ""]  # fmt: skip
    lines += [f"Measured on {cpu_label(c)} ({c.get('cores')} cores), best of "
              f"{r['repeats']} runs per folder.", f"Regenerate: `{command}`"]  # fmt: skip
    return "\n".join(lines) + "\n"


def _spread(runs: list[float]) -> str:
    """' (median of 7 calls, 2.5-3.1 s)'; nothing for the older reports' best of 2."""
    if len(runs) < 3:
        return ""
    return f" (median of {len(runs)} calls, {min(runs):.1f}-{max(runs):.1f} s)"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (args.raw / "manifest.csv").exists():
        sys.exit(f"error: {args.raw}/manifest.csv not found: run `dvc repro fetch` first")
    with tempfile.TemporaryDirectory(prefix="predict-speed-") as tmp:
        result = measure(args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    command = "python -m cxr predict-speed " + " ".join(argv if argv is not None else sys.argv[2:])
    args.out.with_suffix(".md").write_text(markdown(result, command.strip()))
    print(markdown(result, command.strip()))


if __name__ == "__main__":
    main()
