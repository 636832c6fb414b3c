"""gradcam stage: class activation maps of the four-class model on the case studies and the test
split, with checks on the maps (border share, faithfulness, model randomisation)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np
import pandas as pd

from cxr import cam
from cxr.arrays import load_split
from cxr.cli import setup_logging, user_errors
from cxr.config import load_base, load_gradcam_params
from cxr.data import seed_everything
from cxr.infer import configure_cpu, predict_proba
from cxr.models import load_checkpoint

log = logging.getLogger("gradcam")
METRIC_IMAGES = 64  # test images for the map checks: enough for a mean, cheap on 2 cores


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/four_class.pt"))
    parser.add_argument("--data", type=Path, default=Path("data/split"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("plots/gradcam"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/gradcam.json"))
    return parser.parse_args(argv)


def label_indices(table: pd.DataFrame, names: list[str], path: Path) -> np.ndarray:
    unknown = sorted(set(table["label"]) - set(names))
    if unknown:
        raise ValueError(f"{path}/test.csv: labels {unknown} are not the model's classes {names}")
    return table["label"].map(names.index).to_numpy()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    with user_errors():
        base, p = load_base(args.params), load_gradcam_params(args.params)
        seed_everything(base.seed)
        configure_cpu(0)
        model, meta = load_checkpoint(args.model, task="four_class")
        names, size = list(meta["class_names"]), int(meta["image_size"])
        test_x, test_table = load_split(args.data, "test")
        case_x, cases = load_split(args.data, "cases")
        if test_x.shape[1:] != (size, size) or case_x.shape[1:] != (size, size):
            raise ValueError(f"{args.data} holds {test_x.shape[1]} px images, the model {size} px")
        # Galleries and per-class checks need one true class: images of unknown type
        # (`pneumonia`) are left out here.
        known = test_table["label"].isin(names).to_numpy()
        test_x, test_table = test_x[known], test_table[known].reset_index(drop=True)
        labels = label_indices(test_table, names, args.data)
        run = {"method": p.method, "batch_size": p.batch_size}

        log.info("%s maps of %d cases", p.method, len(case_x))
        case_prob = predict_proba(model, case_x)
        case_pred = case_prob.argmax(1)
        case_cams = cam.compute_cams(model, case_x, case_pred.tolist(), **run)
        rows = cam.write_case_figures(case_x, case_cams, case_prob, cases, names, args.out)

        test_prob = predict_proba(model, test_x)
        test_pred = test_prob.argmax(1)
        gallery = cam.pick_gallery(labels, test_pred, p.gallery_per_group, base.seed)
        checked = cam.sample_indices(len(test_x), METRIC_IMAGES, base.seed)
        shown = [idx for groups in gallery.values() for idx in groups.values()]
        needed = np.unique(np.concatenate([checked, *shown])).astype(int)
        log.info("%s maps of %d test images", p.method, len(needed))
        test_cams = np.zeros(test_x.shape, dtype=np.float32)
        test_cams[needed] = cam.compute_cams(
            model, test_x[needed], test_pred[needed].tolist(), **run
        )
        links = cam.write_galleries(
            test_x, test_cams, test_prob, labels, gallery, names, args.out, method=p.method
        )
        cam.write_cases_page(rows, args.out / "index.md", method=p.method, galleries=links)

        log.info("map checks on %d test images and the %d cases", len(checked), len(case_x))
        test = (test_x[checked], test_cams[checked], test_pred[checked])
        twin = cam.random_twin(meta["arch"], len(names), base.seed)
        metrics = cam.map_checks(model, twin, test, (case_x, case_cams, case_pred),
                                 labels[checked], names, p, seed=base.seed)  # fmt: skip
        args.metrics.parent.mkdir(parents=True, exist_ok=True)
        args.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("figures -> %s; checks -> %s", args.out, args.metrics)


if __name__ == "__main__":
    main()
