"""Score saved models on one out-of-source fold's films, without training.

    python stages/oos_score.py --fold europe --params P --four-class M.json --out DIR

Writes `<out>/<fold>.csv` in the fold stage's format (held-out and internal-validation rows with
the models' probabilities), so stages/oos_report.py pools it like a trained fold. The models are
those a fold kept (`stages/oos.py --models`), or an ensemble / test-time-augmentation manifest of
them (`python -m cxr ensemble`): this is how TTA and ensembles are compared on held-out places
without training again. A model trained on the fold's films would be scored on what it saw, so
use only a fold's own models with its name. `--adapt-bn`: each checkpoint's BatchNorm statistics
re-estimated on the fold's held-out films before they are scored (cxr.adapt; no labels used);
its internal-validation films are scored by the checkpoint as it is.
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
    from torch import nn

    from cxr.adapt import adapt_batchnorm
    from cxr.config import load_base, load_split_params, preprocessing
    from cxr.ensemble import load_model
    from cxr.errors import InputError
    from cxr.infer import configure_cpu, predict_proba
    from cxr.lungs import crop_inputs
    from cxr.models import CXRNet
    from cxr.oos import fold_rows, pool_masks, pool_table, scored_frame
    from cxr.oos_params import load_oos_params
    from cxr.params import ParamsError

log = logging.getLogger("oos_score")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fold", required=True, help="a name from oos.folds in --params")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/split"))
    parser.add_argument("--lungs", type=Path, default=Path("data/lungs"))
    parser.add_argument("--binary", type=Path, help="binary checkpoint or ensemble manifest")
    parser.add_argument(
        "--four-class", type=Path, help="four-class checkpoint or ensemble manifest"
    )
    parser.add_argument("--out", type=Path, required=True, help="writes <out>/<fold>.csv")
    parser.add_argument("--adapt-bn", action="store_true",
                        help="re-estimate BatchNorm statistics on the held-out films first")  # fmt: skip
    args = parser.parse_args(argv)
    if args.binary is None and args.four_class is None:
        parser.error("give --binary, --four-class or both")
    return args


def score(model: nn.Module, images: np.ndarray, out: np.ndarray, val: np.ndarray,
          adapt: bool) -> np.ndarray:  # fmt: skip
    """Probabilities of the films `out | val` selects, in their order; with `adapt`, the
    held-out films (`out`) by the model adapted to them (cxr.adapt), the others by the model."""
    rows = np.flatnonzero(out | val)
    if not adapt:
        return predict_proba(model, images[rows], batch_size=32)
    if not isinstance(model, CXRNet):
        raise InputError("--adapt-bn adapts one checkpoint, not an ensemble or TTA manifest")
    held = out[rows]
    probs = np.empty((len(rows), model.backbone.fc.out_features), dtype=np.float32)
    probs[held] = predict_proba(adapt_batchnorm(model, images[rows[held]]), images[rows[held]])
    probs[~held] = predict_proba(model, images[rows[~held]], batch_size=32)
    return probs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    with user_errors():
        folds = {f.name: f for f in load_oos_params(args.params).folds}
        if args.fold not in folds:
            raise ParamsError(f"--fold {args.fold!r} is not in oos.folds ({sorted(folds)})")
        spec = preprocessing(load_base(args.params), load_split_params(args.params)).to_dict()
        models = {task: load_model(path, task) for task, path in
                  (("binary", args.binary), ("four_class", args.four_class)) if path is not None}  # fmt: skip
        for task, (_, meta) in models.items():
            if meta.get("preprocessing") != spec:
                raise InputError(f"the {task} model was trained with preprocessing "
                                 f"{meta.get('preprocessing')}, --params gives {spec}")  # fmt: skip
        configure_cpu(0)
        images, table = pool_table(args.data, spec["image_size"])
        images = crop_inputs(images, lambda: pool_masks(args.lungs, table), spec)
        _, val, out = fold_rows(table, folds[args.fold])
        probs = {task: score(model, images, out, val, args.adapt_bn)
                 for task, (model, _) in models.items()}  # fmt: skip
        names = models["four_class"][1]["class_names"] if "four_class" in models else []
        frame = scored_frame(table, out, val, probs, names, args.fold)
        args.out.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.out / f"{args.fold}.csv", index=False, float_format="%.6f")
        log.info("fold %s: %d films scored -> %s", args.fold, len(frame), args.out)


if __name__ == "__main__":
    main()
