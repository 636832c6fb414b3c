"""train_binary / train_four_class stage: one script, the params section picks the task.

Runs as one process (`python stages/train.py ...`) or as several under torchrun (dvc.yaml's
cmd: `torchrun --standalone --nproc-per-node ${train_*.processes} stages/train.py ...`, or
multi-node, see README "Scaling out"); rank 0 logs and writes every output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from cxr.cli import setup_logging, stage_imports, user_errors

with stage_imports():  # a Ctrl-C while these load (torch: seconds) is one line (cxr.cli)
    import numpy as np
    import pandas as pd
    from dvclive import Live

    from cxr import distributed, resume
    from cxr.arrays import load_split
    from cxr.config import (
        BaseParams,
        TrainParams,
        load_base,
        load_split_params,
        load_train_params,
        network_input,
        preprocessing,
        recorded_params,
    )
    from cxr.data import (
        allowed_classes,
        head_targets,
        labels_for,
        seed_everything,
        strata_for,
    )
    from cxr.distributed import World
    from cxr.infer import configure_cpu
    from cxr.lungs import crop_inputs, load_lung_masks
    from cxr.models import build_model, classifier_meta, save_checkpoint
    from cxr.train import EpochResult, train_model

# Metrics of this run only, not recorded in the checkpoint.
RUN_ONLY = ("wall_seconds", "train_images_per_second", "resumed_from_epoch")

log = logging.getLogger("train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--section", required=True, choices=["train_binary", "train_four_class"])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/split"))
    parser.add_argument("--model", type=Path, required=True, help="checkpoint to write")
    parser.add_argument("--metrics", type=Path, required=True, help="training summary JSON")
    parser.add_argument("--plots", type=Path, required=True, help="dvclive directory (curves)")
    parser.add_argument(
        "--lungs", type=Path, default=Path("data/lungs"), help="segment stage masks (crop: lungs)"
    )
    parser.add_argument(
        "--resume",
        type=Path,
        help="resume state, written after every epoch and removed when the run ends; "
        "a re-run after a crash continues from it",
    )
    return parser.parse_args(argv)


def log_epoch(live: Live, res: EpochResult) -> None:
    """Per-epoch curves as dvclive TSVs (plots/<stage>/plots/metrics/{train,val}/...)."""
    live.step = res.epoch
    live.log_metric("train/loss", res.train_loss, plot=True)
    live.log_metric("train/accuracy", res.train_accuracy, plot=True)
    live.log_metric("val/loss", res.val_loss, plot=True)
    live.log_metric("val/accuracy", res.val_accuracy, plot=True)
    live.log_metric("val/macro_f1", res.val_macro_f1, plot=True)
    live.log_metric("images_per_second", res.images_per_second, plot=True)
    live.make_summary()


@contextlib.contextmanager
def epoch_logger(plots: Path, world: World) -> Iterator[Callable[[EpochResult], None] | None]:
    """dvclive on rank 0; the other ranks log nothing."""
    if not world.is_main:
        yield None
        return
    with Live(str(plots), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        yield lambda res: log_epoch(live, res)


def resume_file(path: Path | None, data: Path, lungs: Path, base: BaseParams, p: TrainParams,
                world: World) -> resume.ResumeFile | None:  # fmt: skip
    """Where to keep the resume state, with the fingerprint of everything that shapes the run:
    the task's params, seed and image size, the number of processes, the train/val files and,
    when the inputs are cropped to the lungs, the train/val lung masks."""
    if path is None:
        return None
    folders = [data] + ([lungs] if base.crop != "none" else [])
    files = [f / f"{n}.{ext}" for f in folders for n in ("train", "val") for ext in ("npy", "csv")]
    if p.weights not in ("none", "imagenet"):
        files.append(Path(p.weights))
    config = {"params": recorded_params(p), "base": asdict(base), "processes": world.size}
    return resume.ResumeFile(path, resume.fingerprint(config, files))


def training_rows(
    images: np.ndarray, table: pd.DataFrame, p: TrainParams
) -> tuple[np.ndarray, pd.DataFrame]:
    """Leave out images of unknown type when the partial-label loss is off."""
    if p.partial_labels or p.task == "binary":
        return images, table
    keep = labels_for(table, p.task) >= 0
    log.info("partial_labels: false, leaving out %d image(s) of unknown type", (~keep).sum())
    return images[keep], table[keep].reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    with user_errors(), distributed.session() as world:
        if not world.is_main:
            logging.getLogger().setLevel(logging.WARNING)  # one log, rank 0's
        base, p = load_base(args.params), load_train_params(args.params, args.section)
        spec = preprocessing(base, load_split_params(args.params))
        generator = seed_everything(base.seed, p.deterministic)
        threads = configure_cpu(distributed.threads_per_process(p.threads, world))
        if p.processes != world.local_size:
            log.warning("%s.processes is %d but %d process(es) run on this machine (started "
                        "without torchrun?)", args.section, p.processes, world.local_size)  # fmt: skip
        train_x, train_table = load_split(args.data, "train")
        val_x, val_table = load_split(args.data, "val")
        train_x = crop_inputs(train_x, lambda: load_lung_masks(args.lungs, "train", train_table),
                              spec.to_dict())  # fmt: skip
        val_x = crop_inputs(val_x, lambda: load_lung_masks(args.lungs, "val", val_table),
                            spec.to_dict())  # fmt: skip
        train_x, train_table = training_rows(train_x, train_table, p)
        if train_x.shape[1] != spec.image_size:
            raise ValueError(
                f"{args.data} holds {train_x.shape[1]} px images, params say {spec.image_size}"
            )
        model = build_model(
            p.arch,
            len(p.class_names),
            weights=p.weights,
            zero_init_residual=p.zero_init_residual,
            input_size=network_input(base, p),
        )
        log.info("%s: %s on %d train / %d val images, %d process(es) on %s", p.task, p.arch,
                 len(train_x), len(val_x), world.size, world.device)  # fmt: skip
        with epoch_logger(args.plots, world) as on_epoch:
            result = train_model(
                model,
                p,
                train_images=train_x,
                train_labels=labels_for(train_table, p.task),
                train_allowed=allowed_classes(train_table, p.task),
                train_strata=strata_for(train_table, p.task, p.balance_by),
                val_images=val_x,
                val_labels=labels_for(val_table, p.task),
                val_allowed=allowed_classes(val_table, p.task),
                generator=generator,
                on_epoch=on_epoch,
                world=world,
                resume=resume_file(args.resume, args.data, args.lungs, base, p, world),
                train_sources=head_targets(train_table, p),
            )
        if not world.is_main:
            return
        summary = result.summary() | {"threads": threads, "processes": world.size}
        # How this run went (its time, a resume) goes to the metrics only: identical training
        # then writes a byte-identical checkpoint, and nothing downstream re-runs for it.
        training = {k: v for k, v in summary.items() if k not in RUN_ONLY}
        meta = classifier_meta(p, spec.to_dict(), model, base.seed, training)
        save_checkpoint(args.model, model, meta)
        args.metrics.parent.mkdir(parents=True, exist_ok=True)
        args.metrics.write_text(json.dumps(summary, indent=2) + "\n")
        if args.resume is not None:
            resume.remove(args.resume)  # only now: the checkpoint is safely written
        log.info("best epoch %d: %s -> %s", result.best_epoch, result.summary()["val"], args.model)


if __name__ == "__main__":
    main()
