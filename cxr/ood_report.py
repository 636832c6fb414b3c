"""`python -m cxr ood-report`: how well the out-of-distribution gate (cxr/ood.py) tells inputs
that are not frontal chest radiographs from those that are.

For each probe kind (cxr/ood_probes.py: rotated, upside down, inverted, one lung, two films side
by side, a colour photograph, a CT-like slice, a lateral-like film) built from every film of a
split (default test), the share the gate flags (detection rate), by reason; and for the real
films of that split the share flagged (false-flag rate), by dataset. Models come from --models:
binary.pt, segmenter.pt and ood.pt (refused unless fitted for that binary.pt).

--lungs-only checks the lung shape alone, with the limits of --params and the segmenter: what the
limits were chosen with (reports/ood_lung_shape_val.json), before any binary model exists.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from cxr import ood
from cxr.arrays import load_split
from cxr.atomic import write_json
from cxr.cli import setup_logging, user_errors
from cxr.config import load_base, load_split_params, preprocessing
from cxr.images import Preprocessing
from cxr.infer import configure_cpu
from cxr.models import load_checkpoint
from cxr.ood_probes import CONTROL, KINDS, build_probes
from cxr.params import non_negative_int
from cxr.segmenter import load_segmenter

log = logging.getLogger("ood-report")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cxr ood-report", description=__doc__)
    parser.add_argument("--models", type=Path, default=Path("models"),
                        help="folder with binary.pt, segmenter.pt and ood.pt")  # fmt: skip
    parser.add_argument("--split", type=Path, default=Path("data/split"), help="split arrays")
    parser.add_argument("--name", default="test", help="which split's films (default test)")
    parser.add_argument("--out", type=Path, default=Path("reports/ood.json"))
    parser.add_argument("--limit", type=non_negative_int, default=0,
                        help="probe only the first N films (0 = all); real films: always all")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn probes")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="0 = one per core")
    parser.add_argument("--lungs-only", action="store_true",
                        help="lung-shape rules only (ood.* of --params; no binary.pt, ood.pt)")  # fmt: skip
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="--lungs-only: the ood limits")  # fmt: skip
    return parser.parse_args(argv)


def flags_for(
    state: ood.OodState, images: np.ndarray, binary: Any, meta: dict, segmenter: tuple
) -> tuple[list[list[str]], np.ndarray]:
    """The gate's reasons for preprocessed images, through predict's path (segment, crop);
    `binary` None: the lung shape alone."""
    inputs, masks = ood.model_inputs(images, meta, segmenter)
    features = None if binary is None else ood.penultimate_features(binary, inputs)
    return ood.gate_batch(state, features, masks), masks


def report(
    state: ood.OodState,
    films: np.ndarray,
    datasets: np.ndarray,
    binary: Any,
    meta: dict,
    segmenter: tuple,
    *,
    limit: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """False flags on every real film (by dataset) and detection per probe kind."""
    spec = Preprocessing(**meta["preprocessing"])
    flags, masks = flags_for(state, films, binary, meta, segmenter)
    real = ood.flag_summary(flags, datasets)
    probed = films[:limit] if limit else films
    probes = {}
    for kind in KINDS:
        images = build_probes(probed, kind, spec, seed=seed)
        summary = ood.flag_summary(
            flags_for(state, images, binary, meta, segmenter)[0], np.full(len(images), kind)
        )["all"]
        key = "flagged_rate" if kind == CONTROL else "detection_rate"
        probes[kind] = {**summary, key: summary.pop("flagged_rate")}
        log.info("%s: %d of %d flagged", kind, summary["flagged"], summary["n"])
    return {"threshold": state.threshold, "real_films": real,
            "real_lung_shape": ood.lung_shape_quantiles(masks),
            "probes": probes}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    with user_errors():
        configure_cpu(args.threads)
        segmenter = load_segmenter(args.models / "segmenter.pt")
        films, table = load_split(args.split, args.name, in_memory=True)
        if args.lungs_only:
            binary, state = None, ood.lungs_only_state(ood.load_ood_params(args.params))
            meta = {
                "preprocessing": preprocessing(
                    load_base(args.params), load_split_params(args.params)
                ).to_dict()
            }
        else:
            binary_path = args.models / "binary.pt"
            state = ood.load_state(args.models / "ood.pt", binary=binary_path)
            binary, meta = load_checkpoint(binary_path, task="binary")
        result = report(state, films, table["dataset"].to_numpy(dtype=str), binary, meta,
                        segmenter, limit=args.limit, seed=args.seed)  # fmt: skip
        result = {"split": f"{args.split}/{args.name}", "models": str(args.models),
                  "checks": "lung shape only" if args.lungs_only else "features and lung shape",
                  "probed_films": min(args.limit or len(films), len(films)), **result}  # fmt: skip
        write_json(args.out, result)
        log.info("real films flagged: %.1f%%; report -> %s",
                 100 * result["real_films"]["all"]["flagged_rate"], args.out)  # fmt: skip


if __name__ == "__main__":
    main()
