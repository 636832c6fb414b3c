"""Growth: time and peak memory of split, one training epoch and predict at N synthetic films.

(Over 400 lines: the synthetic-film generator, the per-step child-process runner and the
report tables belong to one benchmark and change together; none is used elsewhere.)

    python -m cxr growth --sizes 1000,10000,100000 --out reports/growth.json

No real data is needed: N radiograph-like grey images (a body ellipse, two darker lung fields
with rib-like stripes, a spine, a smooth random texture and noise; seeded, each one different)
are written as JPEG and PNG files with a sources-like table (label, dataset, age group, patient
group), and the real code then runs on them, each step in a fresh process so that peaks of
memory do not mix:

- decode + harmonise: the split stage's own `preprocess_rows` (cxr.arrays.preprocess_files),
- near-duplicate guard: `cxr.duplicates.near_duplicate_pairs` (every pair of thumbnails is
  compared, so its time grows as N^2); planted re-encoded copies must all be found,
- group split: the stage's `resolve_duplicates`, `assign` and `check_leakage`, then
  `save_split` (timed apart as "write"),
- train: the default binary model (params.yaml train_binary) through `cxr.train.train_epoch`
  with the whole train array in memory; a full epoch takes hours at 100k on a CPU, so a fixed
  number of batches is timed after a warm-up and the epoch's time is projected from them,
- predict: `python -m cxr predict` on a sample of the files with random-init checkpoints of the
  default architecture; films/s does not depend on N (measured at each N to show it).

Writes --out (JSON) and the same path with .md (tables); the synthetic files live in --workdir
(default: a temporary folder, deleted afterwards).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1000, 10_000, 100_000)
COPY_EVERY = 500  # one planted re-encoded copy per this many films (the real mirror: ~1 in 900)
STEPS = ("decode", "near_duplicates", "group_split", "train", "predict")

# (dataset, label, age_group) and their shares, rounded from the real manifest (data/raw), so
# the strata the group split balances look like the real ones.
MIX = (
    ("kermany", "bacterial", "pediatric", 0.38),
    ("kermany", "normal", "pediatric", 0.21),
    ("kermany", "viral", "pediatric", 0.20),
    ("rsna", "normal", "adult", 0.11),
    ("ieee8023", "covid", "adult", 0.04),
    ("hannover", "covid", "adult", 0.02),
    ("nih", "normal", "adult", 0.02),
    ("nih", "pneumonia", "adult", 0.01),
    ("ieee8023", "bacterial", "adult", 0.01),
)


# --- synthetic films --------------------------------------------------------------------------


def radiograph(index: int, px: int, seed: int = 0) -> np.ndarray:
    """A px x px uint8 chest-radiograph-like picture, different for every index.

    Drawn at 128 px and enlarged, then noise added at full size: cheap enough for 100k files.
    The smooth random texture gives every picture many independent dimensions, so two different
    indices do not correlate like a re-encoded copy at the near-duplicate guard's thumbnail size.
    """
    rng = np.random.default_rng([seed, index])
    s = 128
    y, x = np.mgrid[-1 : 1 : s * 1j, -1 : 1 : s * 1j]

    def ellipse(cx: float, cy: float, ax: float, ay: float, soft: float) -> np.ndarray:
        d = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2
        return 1.0 / (1.0 + np.exp(np.clip((d - 1.0) / soft, -50, 50)))

    shift = rng.uniform(-0.08, 0.08)
    body = ellipse(
        shift, rng.uniform(-0.05, 0.1), rng.uniform(0.7, 0.92), rng.uniform(0.85, 1.05), 0.08
    )
    img = 0.1 + body * rng.uniform(0.45, 0.7)
    ribs = 0.5 + 0.5 * np.sin(
        2 * np.pi * rng.uniform(5, 9) * (y + rng.uniform(0.1, 0.3) * x**2)
        + rng.uniform(0, 2 * np.pi)
    )
    for side in (-1, 1):
        lung = ellipse(shift + side * rng.uniform(0.26, 0.42), rng.uniform(-0.2, 0.02),
                       rng.uniform(0.17, 0.28), rng.uniform(0.4, 0.62), 0.1)  # fmt: skip
        img -= lung * rng.uniform(0.22, 0.4) * (1 - rng.uniform(0.15, 0.35) * ribs)
    width = rng.uniform(0.05, 0.1)
    img += rng.uniform(0.05, 0.15) * np.exp(-((x - shift) ** 2) / (2 * width**2)) * body
    coarse = Image.fromarray(rng.normal(0, 1, (6, 6)).astype(np.float32), mode="F")
    img += rng.uniform(0.04, 0.08) * np.asarray(coarse.resize((s, s), Image.Resampling.BICUBIC))
    img += rng.uniform(-0.1, 0.1) * x + rng.uniform(-0.1, 0.1) * y
    small = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.float32), mode="F")
    big = np.asarray(small.resize((px, px), Image.Resampling.BILINEAR))
    big = big + rng.normal(0, 4, (px, px)).astype(np.float32)
    return np.clip(big, 0, 255).astype(np.uint8)


def plan(n: int, *, seed: int = 0, px: tuple[int, ...] = (512,), copy_every: int = COPY_EVERY,
         ) -> pd.DataFrame:  # fmt: skip
    """The sources-like table of n films: label, dataset, age group, patient group, file.

    Patients have 1-3 films (the real mirror: 1.7 on average), all of one dataset and label.
    Row k*copy_every + 7 is a re-encoded copy (other format, other patient id, same label) of
    row k*copy_every + 3, as the real sources hold the same picture twice; the guard must find
    each. The first `n` rows do not depend on a larger n, so one set serves every size.
    """
    rng = np.random.default_rng(seed)
    shares = np.array([m[3] for m in MIX])
    rows, group = [], 0
    while len(rows) < n:
        dataset, label, age, _ = MIX[rng.choice(len(MIX), p=shares / shares.sum())]
        for _ in range(int(rng.choice([1, 1, 1, 2, 2, 3]))):
            rows.append({"dataset": dataset, "label": label, "age_group": age,
                         "patient_id": f"{dataset}:{group}", "group_id": f"g{group:06d}"})  # fmt: skip
        group += 1
    table = pd.DataFrame(rows[:n])
    table["px"] = [px[i % len(px)] for i in range(n)]
    table["format"] = ["png" if i % 8 == 5 else "jpg" for i in range(n)]
    table["copy_of"] = -1
    for i in range(7, n, copy_every):
        j = i - 4
        for column in ("dataset", "label", "age_group", "px"):
            table.at[i, column] = table.at[j, column]
        table.at[i, "format"] = "png" if table.at[j, "format"] == "jpg" else "jpg"
        table.at[i, "patient_id"], table.at[i, "group_id"] = f"copy:{i}", f"copy{i:06d}"
        table.at[i, "copy_of"] = j
    table["file"] = [f"{i:06d}.{fmt}" for i, fmt in enumerate(table["format"])]
    table["path"] = table["file"]
    table["cohort"] = "main"
    return table


def _write_one(job: tuple[Path, int, int, str, int]) -> str:
    path, index, px, fmt, seed = job
    buf = io.BytesIO()
    img = Image.fromarray(radiograph(index, px, seed), mode="L")
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format="JPEG", quality=92)
    path.write_bytes(buf.getvalue())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def synthesise(
    folder: Path, table: pd.DataFrame, *, seed: int = 0, workers: int = 0
) -> pd.DataFrame:
    """Write every film of `table` into `folder` (in parallel); returns it with `sha256`."""
    folder.mkdir(parents=True, exist_ok=True)
    source = np.where(table["copy_of"] >= 0, table["copy_of"], np.arange(len(table)))
    jobs = [(folder / f, int(s), int(p), fmt, seed)
            for f, s, p, fmt in zip(table["file"], source, table["px"], table["format"], strict=True)]  # fmt: skip
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), desc="synthesise", unit="film", leave=False)
    hashes = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for h in pool.map(_write_one, jobs, chunksize=32):
            hashes.append(h)
            bar.update()
    bar.close()
    return table.assign(sha256=hashes)


# --- the steps, each run in its own process (python -m cxr.growth --step NAME) ------------------


def _split_modules() -> Any:
    """The split stage's module: the benchmark calls its functions, never a copy of them."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import stages.split

    return stages.split


def _params(path: Path) -> tuple[Any, Any, Any]:
    from cxr.config import load_base, load_split_params, preprocessing

    base, split = load_base(path), load_split_params(path)
    return base, split, preprocessing(base, split)


def step_decode(work: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    _, split, spec = _params(args.params)
    table = pd.read_csv(work / "sources.csv", keep_default_na=False).iloc[:n]
    start = time.perf_counter()
    images = _split_modules().preprocess_rows(table, work / "images", split, spec, args.workers)
    seconds = time.perf_counter() - start
    np.save(work / f"n{n}" / "images.npy", images)
    return {"decode_s": seconds}


def step_near_duplicates(work: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    from cxr.duplicates import near_duplicate_pairs

    _, split, _ = _params(args.params)
    images = np.load(work / f"n{n}" / "images.npy")  # in memory, as the stage holds it
    start = time.perf_counter()
    pairs = near_duplicate_pairs(images, threshold=split.near_duplicate_threshold)
    seconds = time.perf_counter() - start
    found = [[p.i, p.j] for p in pairs]
    (work / f"n{n}" / "pairs.json").write_text(json.dumps(found))
    return {"near_duplicate_s": seconds, "pairs_found": len(found)}


def step_group_split(work: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    from cxr.arrays import save_split
    from cxr.duplicates import Pair
    from cxr.splits import resolve_duplicates

    stage = _split_modules()
    base, split, _ = _params(args.params)
    table = pd.read_csv(work / "sources.csv", keep_default_na=False).iloc[:n]
    pairs = [Pair(i, j, 1.0) for i, j in json.loads((work / f"n{n}" / "pairs.json").read_text())]
    start = time.perf_counter()
    table, forced, _ = resolve_duplicates(table, pairs, set())
    table = stage.assign(table, forced, split, base.seed)
    stage.check_leakage(table, pairs, split)
    seconds = time.perf_counter() - start
    images = np.load(work / f"n{n}" / "images.npy", mmap_mode="r")
    start = time.perf_counter()
    for name in stage.OUTPUT_SPLITS:
        rows = table[table["split"] == name]
        if len(rows):
            save_split(work / f"n{n}" / "split", name, images[rows.index.to_numpy()],
                       rows.reset_index(drop=True))  # fmt: skip
    return {"group_split_s": seconds, "write_s": time.perf_counter() - start,
            "train_films": int((table["split"] == "train").sum())}  # fmt: skip


def step_train(work: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from cxr.adversary import AdversaryRun
    from cxr.arrays import load_split
    from cxr.config import load_base, load_train_params, network_input
    from cxr.data import (
        allowed_classes,
        epoch_order,
        head_targets,
        sample_weights,
        seed_everything,
        strata_for,
    )
    from cxr.infer import configure_cpu, pick_device
    from cxr.models import build_model
    from cxr.train import (
        GroupDRO,
        adversary_head,
        average_step,
        make_optimizer,
        make_scheduler,
        style_mixing,
        train_epoch,
        trained_modules,
        weight_average,
    )

    base, p = load_base(args.params), load_train_params(args.params, "train_binary")
    generator = seed_everything(base.seed, p.deterministic)
    threads = configure_cpu(p.threads)
    images, table = load_split(work / f"n{n}" / "split", "train", in_memory=True)
    device = pick_device()
    model = build_model(p.arch, len(p.class_names), weights=p.weights,
                        zero_init_residual=p.zero_init_residual,
                        input_size=network_input(base, p))  # fmt: skip
    model.to(device).to(memory_format=torch.channels_last)
    strata = strata_for(table, p.task, p.balance_by)
    steps = max(1, len(images) // p.batch_size)  # as train_model: drop_last
    # The step as train_model takes it: group DRO's loss, the adversarial head, the weight
    # average's update (as in its epochs: after every step), MixStyle's hooks, mixup and the logit
    # penalty when set.
    head = adversary_head(model, p, head_targets(table, p), device)
    optimizer = make_optimizer(trained_modules(model, head), p)
    averaged = weight_average(model, p)
    mix = style_mixing(model, p)
    kwargs = dict(
        weights=sample_weights(strata) if p.balance == "weighted_loss" else None,
        optimizer=optimizer, scheduler=make_scheduler(optimizer, p, steps),
        aug=p.augmentation(), generator=generator,
        dro=(GroupDRO(torch.from_numpy(strata), device=device)
             if p.balance == "group_dro" else None),
        adversary=(AdversaryRun(head, model.backbone.fc, p.adversary, p.epochs * steps)
                   if head is not None else None),
        average=average_step(averaged, model),
        mixup=p.mixup,
        logit_penalty=p.logit_penalty,
    )  # fmt: skip
    allowed = torch.from_numpy(allowed_classes(table, p.task))
    start = time.perf_counter()
    order = epoch_order(strata, oversample=p.oversamples, generator=generator)
    order_s = time.perf_counter() - start
    batches = order[: steps * p.batch_size].view(steps, -1)
    warmup = min(args.warmup_batches, steps - 1)
    timed = batches[warmup : warmup + args.train_batches]
    train_epoch(model, batches[:warmup], images, allowed, desc="warm-up", **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    _, _, count = train_epoch(model, timed, images, allowed, desc="timed", **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = count / (time.perf_counter() - start)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {
        "train_img_per_s": rate,
        "train_timed_batches": len(timed),
        "train_warmup_batches": warmup,
        "train_epoch_films": steps * p.batch_size,
        "train_epoch_min": (order_s + steps * p.batch_size / rate) / 60,
        "train_threads": threads,
        "train_device": where,
        "train_model": f"{p.arch} {network_input(base, p)} px batch {p.batch_size}"
        + "".join(
            f", {name}"
            for name, on in (
                ("group DRO", kwargs["dro"]),
                (f"adversary {p.adversary:g}", kwargs["adversary"]),
                ("weight average", kwargs["average"]),
                (f"MixStyle {p.mixstyle:g}", mix),
                (f"mixup {p.mixup:g}", kwargs["mixup"] or None),
                (f"logit penalty {p.logit_penalty:g}", kwargs["logit_penalty"] or None),
            )
            if on is not None
        ),
    }


def _models(folder: Path, params: Path) -> Path:
    """Random-init checkpoints of the default architectures and their bundle (no segmenter)."""
    if (folder / "bundle.json").exists():
        return folder
    import torch

    from cxr.bundle import write_bundle
    from cxr.config import load_train_params, network_input
    from cxr.models import build_model, save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    base, _, spec = _params(params)
    paths = {}
    for section in ("train_binary", "train_four_class"):
        p = load_train_params(params, section)
        torch.manual_seed(0)
        side = network_input(base, p)  # as the train stage builds it: predict then resizes too
        model = build_model(p.arch, len(p.class_names), zero_init_residual=False, input_size=side)
        paths[p.task] = folder / f"{p.task}.pt"
        meta = {"task": p.task, "arch": p.arch, "class_names": p.class_names,
                "image_size": spec.image_size, "input_size": side,
                "preprocessing": spec.to_dict()}  # fmt: skip
        save_checkpoint(paths[p.task], model, meta)
    write_bundle(folder, paths["binary"], paths["four_class"], None, 0.5, "growth benchmark")
    return folder


RATE = re.compile(r"predicted in ([\d.]+) s \(([\d.]+) images/s\)")


def step_predict(work: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    table = pd.read_csv(work / "sources.csv", keep_default_na=False).iloc[:n]
    files = [str(work / "images" / f) for f in table["file"].iloc[: args.predict_films]]
    models = _models(work / "models", args.params)
    out = work / f"n{n}" / "predictions.csv"
    timed = time_predict(files, models, out)
    return {"predict_films_per_s": timed["films_per_s"], "predict_films": len(files),
            "predict_wall_s": timed["wall_s"]}  # fmt: skip


def time_predict(
    files: list[str], models: Path, out: Path, extra: Sequence[str] = ()
) -> dict[str, float]:
    """One `python -m cxr predict` over `files` in a fresh process: predict's own films/s and
    seconds (without starting Python, torch and the models) and the wall time (with them).
    `extra`: more options (--server --socket S: the call goes to a resident server)."""
    cmd = [sys.executable, "-m", "cxr", "predict", *map(str, files), "--models", str(models),
           "--out", str(out), "--force", *extra]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"predict exited {done.returncode}:\n{done.stderr[-2000:]}")
    match = RATE.search(done.stderr)
    if not match:
        raise RuntimeError(f"no rate in predict's summary:\n{done.stderr[-2000:]}")
    return {"films": len(files), "predict_s": float(match.group(1)),
            "films_per_s": float(match.group(2)), "wall_s": round(wall, 2)}  # fmt: skip


STEP_FUNCTIONS: dict[str, Callable[[Path, int, argparse.Namespace], dict[str, Any]]] = {
    "decode": step_decode,
    "near_duplicates": step_near_duplicates,
    "group_split": step_group_split,
    "train": step_train,
    "predict": step_predict,
}


def peak_rss_mb() -> tuple[float, float]:
    """(this process, its largest finished child) peak resident memory in MB (Linux: KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, child


def run_step_here(args: argparse.Namespace) -> None:
    """The body of one step's process: run it, add its peaks, write <step>.json."""
    result = STEP_FUNCTIONS[args.step](args.workdir, args.n, args)
    own, child = peak_rss_mb()
    result |= {f"{args.step}_peak_rss_mb": own, f"{args.step}_child_peak_rss_mb": child}
    (args.workdir / f"n{args.n}" / f"{args.step}.json").write_text(json.dumps(result))


def run_step(step: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One step in a fresh Python process, so its peak memory is its own."""
    cmd = [sys.executable, "-m", "cxr.growth", "--step", step, "--n", str(n),
           "--workdir", str(args.workdir), "--params", str(args.params),
           "--workers", str(args.workers), "--train-batches", str(args.train_batches),
           "--warmup-batches", str(args.warmup_batches),
           "--predict-films", str(args.predict_films)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads((args.workdir / f"n{n}" / f"{step}.json").read_text())


# --- the report ---------------------------------------------------------------------------------


def cpu() -> dict[str, Any]:
    """The CPU the numbers were measured on: /proc/cpuinfo's model name and lscpu's counts."""
    info: dict[str, Any] = {"cores": os.cpu_count(), "machine": platform.machine()}
    with contextlib.suppress(OSError):
        info |= cpuinfo_fields(Path("/proc/cpuinfo").read_text())
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
                "L3 cache")  # fmt: skip
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in keep:
                info.setdefault("lscpu", {})[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    info.setdefault("model", platform.processor() or "unknown")
    return info


# Vector extensions that set a CPU's training speed (about 2x apart between the AVX2 and the
# AVX-512 machines this project runs on); /proc/cpuinfo's flag names.
SPEED_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "amx_tile": "AMX"}


def cpuinfo_fields(text: str) -> dict[str, Any]:
    """The first processor's model name, family, model number and speed-setting flags from
    /proc/cpuinfo. Some virtual machines name every Xeon "Intel(R) Xeon(R) Processor": the
    family and model number tell an Ice Lake (6/106) from a newer one (6/207)."""
    info: dict[str, Any] = {}
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if not key and info:
            break  # the blank line after the first processor's block
        if key == "model name":
            info["model"] = value
        elif key == "cpu family":
            info["family"] = value
        elif key == "model":
            info["model_number"] = value
        elif key == "flags":
            have = set(value.split())
            info["flags"] = [name for flag, name in SPEED_FLAGS.items() if flag in have]
    return info


def cpu_label(c: dict[str, Any]) -> str:
    """A CPU as the reports name it: model name, then family/model and its vector extensions
    where recorded (reports written before they were have the model name only)."""
    extra = []
    if "family" in c and "model_number" in c:
        extra.append(f"family {c['family']} model {c['model_number']}")
    if c.get("flags"):
        extra.append(", ".join(c["flags"]))
    label = c.get("model", "unknown")
    return f"{label} ({'; '.join(extra)})" if extra else label


def exponent(n1: int, t1: float, n2: int, t2: float) -> float:
    """k in t ~ N^k between two measured sizes."""
    return math.log(t2 / t1) / math.log(n2 / n1)


TIME_COLUMNS = (
    ("decode_s", "decode + harmonise (s)", "{:.1f}"),
    ("near_duplicate_s", "near-duplicate guard (s)", "{:.2f}"),
    ("group_split_s", "group split (s)", "{:.2f}"),
    ("write_s", "write splits (s)", "{:.2f}"),
    ("train_img_per_s", "train (img/s)", "{:.1f}"),
    ("train_epoch_min", "one epoch (min, projected)", "{:.1f}"),
    ("predict_films_per_s", "predict (films/s)", "{:.1f}"),
)
MEMORY_COLUMNS = (
    ("decode_peak_rss_mb", "decode + harmonise"),
    ("decode_child_peak_rss_mb", "its largest worker"),
    ("near_duplicates_peak_rss_mb", "near-duplicate guard"),
    ("group_split_peak_rss_mb", "group split + write"),
    ("train_peak_rss_mb", "train"),
    ("predict_child_peak_rss_mb", "predict"),
)


def table_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def markdown(report: dict[str, Any]) -> list[str]:
    """The two tables (time, peak memory) and what they were measured on, as Markdown lines."""
    sizes = report["sizes"]
    time_rows = [[f"{s['n']:,}", *(fmt.format(s[k]) for k, _, fmt in TIME_COLUMNS),
                  f"{s['pairs_found']} / {s['pairs_planted']}"] for s in sizes]  # fmt: skip
    mem_rows = [[f"{s['n']:,}", *(f"{s[k]:.0f}" for k, _ in MEMORY_COLUMNS)] for s in sizes]
    first = sizes[0]

    def per_size(key: str) -> str:
        return " / ".join(str(s[key]) for s in sizes)

    lines = table_lines(["films", *(h for _, h, _ in TIME_COLUMNS), "pairs found / planted"],
                        time_rows)  # fmt: skip
    lines += ["", "Peak resident memory (MB), each step in its own process:", ""]
    lines += table_lines(["films", *(h for _, h in MEMORY_COLUMNS)], mem_rows)
    c = report["cpu"]
    lines += [
        "",
        f"Measured on {cpu_label(c)} ({c['cores']} cores; {first['train_threads']} torch threads, "
        f"{first['train_device']}), load average {report['load_average'][0]:.1f} when it began. "
        f"Films: {report['synthetic']}.",
        f"Train: {first['train_model']} (params.yaml train_binary), one epoch projected from "
        f"{per_size('train_timed_batches')} timed batches after "
        f"{per_size('train_warmup_batches')} warm-up (per size; fewer where the train split "
        "has fewer batches), the whole train array in memory; the validation pass is not "
        "included.",
        f"Predict: `python -m cxr predict` on {per_size('predict_films')} of the films, "
        "random-init checkpoints of the default architectures; films/s does not depend on N.",
        "For scale: a Python that only imports torch, pandas and the cxr training, split and "
        f"duplicate modules peaks at {report['baseline_rss_mb']:.0f} MB.",
    ]
    for key, name in (("near_duplicate_s", "near-duplicate guard"), ("decode_s", "decode")):
        grow = [f"N^{exponent(a['n'], a[key], b['n'], b[key]):.2f} from {a['n']:,} to {b['n']:,}"
                for a, b in zip(sizes, sizes[1:], strict=False)]  # fmt: skip
        if grow:
            lines.append(f"Growth of the {name}: {', '.join(grow)}.")
    lines.append(f"Regenerate: `{report['command']}`")
    return lines


def baseline_rss_mb() -> float:
    """Peak memory of a process that only imports what the steps import."""
    code = ("import resource, torch, pandas, cxr.train, cxr.arrays, cxr.duplicates, cxr.splits; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True)  # fmt: skip
    return float(done.stdout.strip())


def measure(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Synthesise the largest size once; run every step at every size (smaller sizes are the
    first rows of the larger set)."""
    work = args.workdir
    px = tuple(args.px)
    start = time.perf_counter()
    table = plan(max(args.sizes), seed=args.seed, px=px, copy_every=args.copy_every)
    table = synthesise(work / "images", table, seed=args.seed, workers=args.workers)
    table.to_csv(work / "sources.csv", index=False)
    synthesis_s = time.perf_counter() - start
    report: dict[str, Any] = {
        "command": command,
        "cpu": cpu(),
        "load_average": list(os.getloadavg()),
        "synthetic": f"{' / '.join(map(str, px))} px grey, 7 in 8 JPEG q92 and 1 in 8 PNG, "
        f"seed {args.seed}, one re-encoded copy planted per {args.copy_every}",
        "synthesis_s": synthesis_s,
        "baseline_rss_mb": baseline_rss_mb(),
        "sizes": [],
    }
    bar = tqdm(total=len(args.sizes) * len(STEPS), desc="growth", unit="step")
    for n in args.sizes:
        (work / f"n{n}").mkdir(exist_ok=True)
        row: dict[str, Any] = {"n": n, "load_average": os.getloadavg()[0],
                               "pairs_planted": int((table["copy_of"].iloc[:n] >= 0).sum())}  # fmt: skip
        for step in STEPS:
            bar.set_postfix_str(f"{n:,} films: {step}")
            row |= run_step(step, n, args)
            bar.update()
        report["sizes"].append(row)
        shutil.rmtree(work / f"n{n}")  # arrays of this size: not needed any more
    bar.close()
    return report


def write_report(report: dict[str, Any], out: Path) -> Path:
    from cxr.atomic import write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    md = out.with_suffix(".md")
    title = ["# Growth: split, one training epoch and predict at N synthetic films", ""]
    md.write_text("\n".join(title + markdown(report)) + "\n")
    return md


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 16:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes >= 16, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cxr growth", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sizes", type=int_list, default=list(SIZES),
                        help="films per run, comma-separated (default: %(default)s)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("reports/growth.json"),
                        help="JSON report; the Markdown tables go beside it as .md")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None,
                        help="synthetic films and arrays (default: a temporary folder, deleted)")  # fmt: skip
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--px", type=int_list, default=[512],
                        help="film sizes in px, cycled over the films (e.g. 512,1024)")  # fmt: skip
    parser.add_argument("--train-batches", type=int, default=20, help="timed training batches")
    parser.add_argument("--warmup-batches", type=int, default=2)
    parser.add_argument("--predict-films", type=int, default=200)
    parser.add_argument("--copy-every", type=int, default=COPY_EVERY)
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0 = cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # one step's process
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.params = args.params.resolve()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.step:
        run_step_here(args)
        return
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m cxr growth", *argv])
    keep = args.workdir is not None
    args.workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="cxr-growth-"))).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = measure(args, command.strip())
    finally:
        if not keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    md = write_report(report, args.out)
    print("\n".join(markdown(report)))
    print(f"wrote {args.out} and {md}")


if __name__ == "__main__":
    main()
