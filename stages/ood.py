"""ood stage: fit the out-of-distribution gate (cxr/ood.py) for the binary checkpoint.

The Gaussian of the binary model's penultimate features is fitted on the train films, the flag
threshold set on the val films; the test films give an untouched false-flag rate. Writes the gate
(tensors + metadata with the binary checkpoint's sha256) and metrics/ood.json, which also holds
the false-flag rate, by dataset, on every other real film of the split: the train films (the
Gaussian's own: in-sample, so optimistic), adult_check, the cases and, when there are any,
the external films.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from cxr.cli import setup_logging, stage_imports, user_errors

with stage_imports():  # a Ctrl-C while these load (torch: seconds) is one line (cxr.cli)
    import numpy as np
    import pandas as pd

    from cxr import ood
    from cxr.arrays import load_split
    from cxr.atomic import write_json
    from cxr.infer import configure_cpu
    from cxr.models import load_checkpoint
    from cxr.segmenter import load_segmenter

log = logging.getLogger("ood")

FITTED = ("train", "val", "test")  # the Gaussian's films, the threshold's, the untouched check
CHECKED = ("adult_check", "cases", "external")  # every other real film: false flags only


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--binary", type=Path, required=True, help="binary checkpoint")
    parser.add_argument("--segmenter", type=Path, required=True, help="lung segmenter")
    parser.add_argument("--data", type=Path, default=Path("data/split"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("models/ood.pt"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/ood.json"))
    return parser.parse_args(argv)


def sources(table: pd.DataFrame) -> np.ndarray:
    """Each film's dataset; the cases (cases.csv has no dataset column) count as one source."""
    if "dataset" in table:
        return table["dataset"].to_numpy(dtype=str)
    return table["cohort"].to_numpy(dtype=str)


def median_distances(summary: dict, scores: np.ndarray, table: pd.DataFrame) -> None:
    """Each dataset's median feature distance beside its flag counts: how far a source sits
    from the training films' Gaussian, flagged or not (a per-source look at the gate)."""
    datasets = sources(table)
    summary["all"]["median_distance"] = round(float(np.median(scores)), 2)
    for name in set(datasets.tolist()):
        summary[name]["median_distance"] = round(float(np.median(scores[datasets == name])), 2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    with user_errors():
        p = ood.load_ood_params(args.params)
        configure_cpu(0)
        binary, meta = load_checkpoint(args.binary, task="binary")
        segmenter = load_segmenter(args.segmenter)
        features, masks, tables = {}, {}, {}
        for name in FITTED + CHECKED:
            images, tables[name] = load_split(args.data, name)
            if len(images) == 0:  # external is empty unless split.external names a source
                del tables[name]
                continue
            inputs, masks[name] = ood.model_inputs(images, meta, segmenter)
            features[name] = ood.penultimate_features(binary, inputs)
            log.info("%s: features of %d films", name, len(inputs))
        state = ood.fit_state(
            features["train"], features["val"], p, ood.sha256_of(args.binary),
            {"binary": str(args.binary), "segmenter_sha256": ood.sha256_of(args.segmenter)},
        )  # fmt: skip
        ood.save_state(args.out, state)
        metrics = {"threshold": state.threshold, **state.meta}
        for name in tables:  # val: 1 - percentile by construction; train: in-sample
            scores = state.scores(features[name])
            flags = ood.gate_scored(state, scores, masks[name])
            metrics[name] = ood.flag_summary(flags, sources(tables[name]))
            if name in ("val", "test"):
                metrics[name]["lung_shape"] = ood.lung_shape_quantiles(masks[name])
            median_distances(metrics[name], scores, tables[name])
        write_json(args.metrics, metrics)
        log.info("gate -> %s (threshold %.2f); val %.1f%%, test %.1f%% of real films flagged",
                 args.out, state.threshold, 100 * metrics["val"]["all"]["flagged_rate"],
                 100 * metrics["test"]["all"]["flagged_rate"])  # fmt: skip


if __name__ == "__main__":
    main()
