"""ood stage: fit the out-of-distribution gate (cxr/ood.py) for the binary checkpoint.

The Gaussian of the binary model's penultimate features is fitted on the train films, the flag
threshold set on the val films; the test films give an untouched false-flag rate. Writes the gate
(tensors + metadata with the binary checkpoint's sha256) and metrics/ood.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from cxr import ood
from cxr.arrays import load_split
from cxr.atomic import write_json
from cxr.cli import setup_logging, user_errors
from cxr.infer import configure_cpu
from cxr.models import load_checkpoint
from cxr.segmenter import load_segmenter

log = logging.getLogger("ood")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--binary", type=Path, required=True, help="binary checkpoint")
    parser.add_argument("--segmenter", type=Path, required=True, help="lung segmenter")
    parser.add_argument("--data", type=Path, default=Path("data/split"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("models/ood.pt"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/ood.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    with user_errors():
        p = ood.load_ood_params(args.params)
        configure_cpu(0)
        binary, meta = load_checkpoint(args.binary, task="binary")
        segmenter = load_segmenter(args.segmenter)
        features, masks, tables = {}, {}, {}
        for name in ("train", "val", "test"):
            images, tables[name] = load_split(args.data, name)
            inputs, masks[name] = ood.model_inputs(images, meta, segmenter)
            features[name] = ood.penultimate_features(binary, inputs)
            log.info("%s: features of %d films", name, len(inputs))
        state = ood.fit_state(
            features["train"], features["val"], p, ood.sha256_of(args.binary),
            {"binary": str(args.binary), "segmenter_sha256": ood.sha256_of(args.segmenter)},
        )  # fmt: skip
        ood.save_state(args.out, state)
        metrics = {"threshold": state.threshold, **state.meta}
        for name in ("val", "test"):  # val: 1 - percentile by construction; test: untouched
            flags = ood.gate_batch(state, features[name], masks[name])
            metrics[name] = ood.flag_summary(flags, tables[name]["dataset"].to_numpy(dtype=str))
            metrics[name]["lung_shape"] = ood.lung_shape_quantiles(masks[name])
        write_json(args.metrics, metrics)
        log.info("gate -> %s (threshold %.2f); val %.1f%%, test %.1f%% of real films flagged",
                 args.out, state.threshold, 100 * metrics["val"]["all"]["flagged_rate"],
                 100 * metrics["test"]["all"]["flagged_rate"])  # fmt: skip


if __name__ == "__main__":
    main()
