"""gradcam stage: class activation maps of the four-class model on the case studies and the test
split, with checks on the maps (border share, faithfulness on validation and test, model
randomisation, where the maps lie against the predicted lungs and the radiologists' zones)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from cxr.cli import setup_logging, stage_imports, user_errors

with stage_imports():  # a Ctrl-C while these load (torch: seconds) is one line (cxr.cli)
    import numpy as np
    import pandas as pd

    from cxr import cam, cam_figures, faithfulness, zone_scores
    from cxr.arrays import load_split
    from cxr.config import load_base, load_gradcam_params
    from cxr.data import seed_everything
    from cxr.ensemble import load_model
    from cxr.errors import InputError
    from cxr.infer import configure_cpu, predict_proba
    from cxr.lungs import crop_inputs, load_lung_masks

log = logging.getLogger("gradcam")
METRIC_IMAGES = 64  # test images for the map checks: enough for a mean, cheap on 2 cores


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=Path("models/four_class.pt"))
    parser.add_argument("--data", type=Path, default=Path("data/split"))
    parser.add_argument("--lungs", type=Path, default=Path("data/lungs"), help="segment output")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("plots/gradcam"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/gradcam.json"))
    return parser.parse_args(argv)


def label_indices(table: pd.DataFrame, names: list[str], path: Path) -> np.ndarray:
    unknown = sorted(set(table["label"]) - set(names))
    if unknown:
        raise InputError(f"{path}/test.csv: labels {unknown} are not the model's classes {names}")
    return table["label"].map(names.index).to_numpy()


def cropped(images: np.ndarray, masks: np.ndarray, prep: dict) -> tuple[np.ndarray, np.ndarray]:
    """Images as the model saw them (cxr.lungs.crop_inputs) and their masks cropped alike."""
    lung_pixels = masks.astype(np.uint8) * 255
    return crop_inputs(images, masks, prep), crop_inputs(lung_pixels, masks, prep) > 127


class Inputs(NamedTuple):
    """What the maps are drawn on, as the model sees it (cropped when it was trained cropped).
    Test keeps known-class images only: galleries and per-class checks need one true class."""

    test: tuple[np.ndarray, pd.DataFrame, np.ndarray]  # images, table, lung masks
    cases: tuple[np.ndarray, pd.DataFrame, np.ndarray]
    val: np.ndarray


def load_inputs(args: argparse.Namespace, meta: dict) -> Inputs:
    names, size = list(meta["class_names"]), int(meta["image_size"])
    test_x, test_table = load_split(args.data, "test")
    case_x, cases = load_split(args.data, "cases")
    val_x, val_table = load_split(args.data, "val")
    if test_x.shape[1:] != (size, size) or case_x.shape[1:] != (size, size):
        raise InputError(f"{args.data} holds {test_x.shape[1]} px images, the model {size} px")
    prep = meta.get("preprocessing", {})
    test_x, test_lungs = cropped(test_x, load_lung_masks(args.lungs, "test", test_table), prep)
    case_x, case_lungs = cropped(case_x, load_lung_masks(args.lungs, "cases", cases), prep)
    val_x = crop_inputs(val_x, lambda: load_lung_masks(args.lungs, "val", val_table), prep)
    known = test_table["label"].isin(names).to_numpy()  # `pneumonia` (type unknown) left out
    test = (test_x[known], test_table[known].reset_index(drop=True), test_lungs[known])
    return Inputs(test, (case_x, cases, case_lungs), val_x)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    with user_errors():
        base, p = load_base(args.params), load_gradcam_params(args.params)
        seed_everything(base.seed)
        configure_cpu(0)
        model, meta = load_model(args.model, task="four_class")  # checkpoint or ensemble
        names = list(meta["class_names"])
        inputs = load_inputs(args, meta)
        (test_x, test_table, test_lungs), (case_x, cases, case_lungs) = inputs.test, inputs.cases
        labels = label_indices(test_table, names, args.data)
        run = {"method": p.method, "batch_size": p.batch_size, "layer": p.target_layer}

        # The cases are COVID-19 films: their maps explain the COVID-19 class (see case_target).
        covid = cam_figures.case_target(names)
        log.info("%s maps (%s) of %d cases, for %s", p.method, p.target_layer, len(case_x),
                 names[covid])  # fmt: skip
        case_prob = predict_proba(model, case_x)
        case_targets = np.full(len(case_x), covid)
        case_cams = cam.compute_cams(model, case_x, case_targets.tolist(), **run)
        scores = zone_scores.case_zone_scores(case_cams, case_lungs, cases["zones"].tolist())
        for score, k in zip(scores, case_prob.argmax(1), strict=True):
            score["predicted"] = names[k]  # beside the map's class in metrics/gradcam.json
        rows = cam_figures.write_case_figures(case_x, case_cams, case_prob, cases, names, args.out,
                                      target=covid, lung_masks=case_lungs, scores=scores)  # fmt: skip

        # Every test image: the in-lung share per predicted class needs more than a sample.
        test_prob = predict_proba(model, test_x)
        test_pred = test_prob.argmax(1)
        log.info("%s maps of %d test images", p.method, len(test_x))
        test_cams = cam.compute_cams(model, test_x, test_pred.tolist(), **run)
        gallery = cam_figures.pick_gallery(labels, test_pred, p.gallery_per_group, base.seed)
        links = cam_figures.write_galleries(
            test_x, test_cams, test_prob, labels, gallery, names, args.out, method=p.method
        )
        cam_figures.write_cases_page(rows, args.out / "index.md", method=p.method, galleries=links,
                             layer=p.target_layer)  # fmt: skip

        # Validation images: what the target layer may be chosen on (never test).
        val_x = inputs.val[cam_figures.sample_indices(len(inputs.val), METRIC_IMAGES, base.seed)]
        val_pred = predict_proba(model, val_x).argmax(1)
        val = (val_x, cam.compute_cams(model, val_x, val_pred.tolist(), **run), val_pred)
        checked = cam_figures.sample_indices(len(test_x), METRIC_IMAGES, base.seed)
        log.info("map checks on %d val, %d test images and the %d cases", len(val_x),
                 len(checked), len(case_x))  # fmt: skip
        test = (test_x[checked], test_cams[checked], test_pred[checked])
        twin = cam.random_twin(meta["arch"], len(names), base.seed, meta.get("input_size"))
        metrics = faithfulness.map_checks(model, twin, test, (case_x, case_cams, case_targets),
                                 labels[checked], names, p, seed=base.seed, val=val)  # fmt: skip
        metrics["cases_map_class"] = names[covid]
        metrics["lungs"] = zone_scores.lung_checks(
            (test_cams, test_lungs, test_pred), names, scores, cases["case"].tolist(),
            bootstrap=p.bootstrap, seed=base.seed,
        )  # fmt: skip
        args.metrics.parent.mkdir(parents=True, exist_ok=True)
        args.metrics.write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("figures -> %s; checks -> %s", args.out, args.metrics)


if __name__ == "__main__":
    main()
