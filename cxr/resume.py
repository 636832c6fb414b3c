"""Resume state for long runs: written after every epoch, read back after a crash or `kill -9`.

A resume file holds what the next epoch needs to continue exactly where the last one ended:
model, optimizer and scheduler state, every random number generator (the torch Generator that
draws epoch orders and augmentation included), the epoch, the best epoch so far with its
weights, and the history. It is plain data (tensors, numbers, strings, lists, dicts) read with
`torch.load(..., weights_only=True)`, and it carries a fingerprint of the params and data it
belongs to: a file from another configuration is ignored, with a log line, and training starts
over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr import distributed
from cxr.distributed import World

log = logging.getLogger(__name__)

RESUME_FORMAT = "cxr-resume/1"


@dataclass(frozen=True)
class ResumeFile:
    """Where the state goes, and the fingerprint a file there must carry to be used."""

    path: Path
    fingerprint: str


def file_digest(path: Path) -> str:
    """sha256 of a file, read in blocks (never mapped into this process's memory)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fingerprint(config: dict[str, Any], files: list[Path]) -> str:
    """One digest of a JSON-able configuration and the contents of some files."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for path in files:
        h.update(f"{Path(path).name}:{file_digest(Path(path))}".encode())
    return h.hexdigest()


def capture_rng() -> dict[str, Any]:
    """The global generators (Python, NumPy, torch CPU and CUDA) as plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(resume: ResumeFile, state: dict[str, Any]) -> None:
    """Write atomically: a crash while writing leaves the previous epoch's file intact."""
    resume.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = resume.path.with_name(resume.path.name + ".tmp")
    torch.save({"format": RESUME_FORMAT, "fingerprint": resume.fingerprint} | state, tmp)
    tmp.replace(resume.path)


def load(resume: ResumeFile) -> dict[str, Any] | None:
    """The saved state if there is one for this configuration, else None (and say why)."""
    if not resume.path.exists():
        return None
    try:
        state = torch.load(resume.path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable for any reason: starting over is always safe
        log.warning("%s: unreadable (%s); starting from epoch 1", resume.path, exc)
        return None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        log.warning("%s: not a cxr resume file; starting from epoch 1", resume.path)
        return None
    if state.get("fingerprint") != resume.fingerprint:
        log.warning("%s was written for other params or data; starting from epoch 1", resume.path)
        return None
    return state


def remove(path: Path) -> None:
    """A finished run leaves no resume file behind."""
    Path(path).unlink(missing_ok=True)
    Path(path).with_name(Path(path).name + ".tmp").unlink(missing_ok=True)


@dataclass(frozen=True)
class TrainingState:
    """The live objects a training run's resume file saves and restores (the loop's own
    bookkeeping, cxr.train.LoopState, travels beside them as a plain dict)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator


def save_training(resume: ResumeFile, loop: dict[str, Any], state: TrainingState) -> None:
    """After an epoch: the loop's bookkeeping, the model, optimizer, scheduler, the epoch-order
    generator and every global generator, atomically (`save`)."""
    save(
        resume,
        {
            "loop": loop,
            "model": state.model.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "generator": state.generator.get_state(),
            "rng": capture_rng(),
        },
    )


def restore_training(resume: ResumeFile, world: World, state: TrainingState) -> dict | None:
    """Load a resume file's state into `state` and return the loop's bookkeeping; None (state
    untouched) when there is no usable file. Rank 0 reads the file and sends it to the others,
    so only rank 0 needs the disk."""
    saved = load(resume) if world.is_main else None
    saved = distributed.object_from_main(saved, world)
    if saved is None:
        return None
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.generator.set_state(saved["generator"])
    restore_rng(saved["rng"])
    return saved["loop"]
