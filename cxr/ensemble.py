"""A model that is a list of checkpoints: seed ensembles and test-time augmentation (TTA).

An ensemble is a small JSON manifest beside its checkpoints (`python -m cxr ensemble`):

    {"format": "cxr-ensemble/1", "task": "binary",
     "members": [{"path": "binary.pt", "sha256": "..."}, {"path": "binary_s2.pt", ...}],
     "tta": ["hflip", "gamma_0.8"]}

`load_model(path, task)` takes a checkpoint or a manifest and returns something every consumer
feeds the same way (predict, validate, calibrate, evaluate, gradcam, the Python API): an
`nn.Module` whose output, through softmax, is the mean probability over members x views. A
manifest of one member without TTA loads as that plain checkpoint, so it is bit for bit the
single model. Members must agree on task, classes and preprocessing (one input for all); the
sha256s pin them, so a retrained member is refused rather than silently mixed in.

Views act on the model input (float, 0-1, after the crop), not on the file, so they compose
with the lung crop and cost one extra forward pass each. The flip (hflip) is the one view the
default models were trained to be invariant to (`augment.hflip`); intensity views (gamma) model
exposure/processing differences between hospitals; zoom views model field of view. Grad-CAM of
an ensemble is the mean of its members' maps on the plain view (cxr.cam): a TTA view is
not aligned with the film, so it is not explained. The out-of-distribution gate was fitted for
one network's features: with an ensemble it reads the first member's (cxr.api).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxr.bundle import sha256_of
from cxr.errors import InputError
from cxr.models import CheckpointError, CXRNet, load_checkpoint

ENSEMBLE_FORMAT = "cxr-ensemble/1"
AGREE = ("task", "class_names", "image_size", "preprocessing")  # members must share these
VIEW_KINDS = {"gamma": (0.5, 2.0), "zoom": (0.7, 1.0)}  # allowed factor range of each kind
PLAIN_VIEWS = ("identity", "hflip")  # views without a factor


class ViewError(ValueError):
    """A test-time-augmentation view name that is not one of the known forms."""


def parse_view(name: str) -> tuple[str, float]:
    """'identity', 'hflip' (mirrored left-right) or '<kind>_<factor>' (gamma_0.8: x ** 0.8;
    zoom_0.9: the central 90%, resized back); anything else is refused with the valid forms."""
    if name in PLAIN_VIEWS:
        return name, 1.0
    kind, _, value = name.partition("_")
    try:
        factor = float(value)
    except ValueError:
        factor = math.nan
    if kind not in VIEW_KINDS or not VIEW_KINDS[kind][0] <= factor <= VIEW_KINDS[kind][1]:
        ranges = ", ".join(f"{k}_F with F in [{lo}, {hi}]" for k, (lo, hi) in VIEW_KINDS.items())
        raise ViewError(f"unknown TTA view {name!r}: use {', '.join(PLAIN_VIEWS)}, {ranges}")
    return kind, factor


def view_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The view as a function of an N x 1 x H x W input in [0, 1]."""
    kind, factor = parse_view(name)
    if kind == "hflip":
        return lambda x: x.flip(-1)
    if kind == "gamma":
        return lambda x: x.clamp(min=0.0).pow(factor)
    if kind == "zoom" and factor < 1.0:

        def zoom(x: torch.Tensor) -> torch.Tensor:
            h, w = x.shape[-2:]
            ch, cw = max(1, round(h * factor)), max(1, round(w * factor))
            top, left = (h - ch) // 2, (w - cw) // 2
            crop = x[..., top : top + ch, left : left + cw]
            return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)

        return zoom
    return lambda x: x


class Ensemble(nn.Module):
    """Members x views, averaged in probability. forward returns log(mean softmax), so a
    softmax downstream (cxr.infer.predict_proba) gives exactly the mean probability."""

    def __init__(self, members: list[CXRNet], views: list[str] | None = None) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        names = ["identity", *(v for v in views or [] if v != "identity")]
        self.view_names = names
        self._views = [view_fn(v) for v in names]

    @property
    def backbone(self) -> nn.Module:
        """The first member's network (for code that reads sizes such as `backbone.fc`)."""
        return self.members[0].backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for view in self._views:
            v = view(x)
            for member in self.members:
                p = torch.softmax(member(v).float(), dim=1)
                total = p if total is None else total + p
        assert total is not None
        return torch.log((total / (len(self._views) * len(self.members))).clamp_min(1e-12))


def write_manifest(out: Path, checkpoints: list[Path], tta: list[str]) -> dict[str, Any]:
    """Write an ensemble manifest for `checkpoints` (paths stored relative to `out`'s folder)
    after loading each and checking they agree; returns the manifest."""
    for view in tta:
        parse_view(view)
    metas = [load_checkpoint(path)[1] for path in checkpoints]
    check_agree(metas, checkpoints)
    folder = out.resolve().parent
    members = [{"path": Path(_relative(p.resolve(), folder)).as_posix(), "sha256": sha256_of(p)}
               for p in checkpoints]  # fmt: skip
    manifest = {"format": ENSEMBLE_FORMAT, "task": metas[0]["task"], "members": members,
                "tta": [v for v in tta if v != "identity"]}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out)
    return manifest


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)  # elsewhere on disk: keep it absolute


def check_agree(metas: list[dict[str, Any]], paths: list[Path]) -> None:
    """Members share task, classes and preprocessing, or the mean means nothing."""
    for meta, path in zip(metas[1:], paths[1:], strict=True):
        for key in AGREE:
            if meta.get(key) != metas[0].get(key):
                raise CheckpointError(
                    f"ensemble members disagree on {key}: {paths[0]} has {metas[0].get(key)!r}, "
                    f"{path} has {meta.get(key)!r}"
                )


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable ensemble manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != ENSEMBLE_FORMAT:
        raise CheckpointError(f"{path}: not an ensemble manifest (format {ENSEMBLE_FORMAT!r}); "
                              "write one with `python -m cxr ensemble`")  # fmt: skip
    members = manifest.get("members")
    if not isinstance(members, list) or not members:
        raise CheckpointError(f"{path}: an ensemble manifest needs a non-empty `members` list")
    return manifest


def is_manifest(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".json"


def member_paths(path: str | Path) -> list[Path]:
    """The checkpoint files of a manifest (a checkpoint: itself), each verified by sha256."""
    path = Path(path)
    return _verified_members(path, read_manifest(path)) if is_manifest(path) else [path]


def _verified_members(path: Path, manifest: dict[str, Any]) -> list[Path]:
    out = []
    for entry in manifest["members"]:
        member = path.parent / entry["path"]
        if not member.is_file():
            raise CheckpointError(f"{path}: member {member} not found")
        if sha256_of(member) != entry.get("sha256"):
            raise CheckpointError(f"{path}: member {member} has changed since the manifest was "
                                  "written (sha256 differs); write the manifest again")  # fmt: skip
        out.append(member)
    return out


def load_model(path: str | Path, task: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A checkpoint (cxr.models.load_checkpoint) or an ensemble manifest, with metadata: the
    first member's, plus `ensemble` (members and views) for a manifest."""
    path = Path(path)
    if not is_manifest(path):
        return load_checkpoint(path, task)
    manifest = read_manifest(path)
    paths = _verified_members(path, manifest)  # the manifest read once
    loaded = [load_checkpoint(p, task) for p in paths]
    metas = [meta for _, meta in loaded]
    check_agree(metas, paths)
    views = [v for v in manifest.get("tta", []) if v != "identity"]
    meta = dict(metas[0]) | {"ensemble": {"manifest": str(path), "members": [str(p) for p in paths],
                                          "tta": views}}  # fmt: skip
    if len(loaded) == 1 and not views:
        return loaded[0][0], meta  # one member, no views: exactly that checkpoint
    return Ensemble([model for model, _ in loaded], views).eval(), meta


def main(argv: list[str] | None = None) -> None:
    """`python -m cxr ensemble OUT.json CHECKPOINT... [--tta VIEW ...]`."""
    import argparse

    from cxr.cli import setup_logging, user_errors

    parser = argparse.ArgumentParser(
        prog="python -m cxr ensemble",
        description="Write an ensemble manifest: several checkpoints of one task (and optional "
        "test-time-augmentation views) used as one model by predict, validate, calibrate, "
        "evaluate and gradcam. Pass the manifest wherever a checkpoint goes.",
    )
    parser.add_argument("out", type=Path, help="the manifest to write (.json)")
    parser.add_argument("checkpoints", type=Path, nargs="+", help="member checkpoints (.pt)")
    parser.add_argument("--tta", nargs="*", default=[], metavar="VIEW",
                        help="views besides the plain film: hflip (mirrored), gamma_F (F in "
                        "0.5-2), zoom_F (F in 0.7-1); each costs one more forward pass per member")  # fmt: skip
    args = parser.parse_args(argv)
    setup_logging()
    with user_errors():
        if not is_manifest(args.out):
            raise InputError(f"{args.out}: the manifest's name must end in .json")
        manifest = write_manifest(args.out, args.checkpoints, args.tta)
        print(f"{args.out}: {manifest['task']} ensemble of {len(manifest['members'])} "
              f"checkpoint(s), views identity{''.join(', ' + v for v in manifest['tta'])}")  # fmt: skip
