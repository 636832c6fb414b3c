"""Build a ResNet for N classes with its input contract; save and load checkpoints.

Input contract: a float tensor N x 1 x S x S with values in [0, 1] (uint8 / 255), S the
preprocessed arrays' size (base.image_size). The network normalises inside itself, and resizes to
its own input size when that differs (a task's `input_size`), so every caller (train, evaluate,
gradcam, predict) feeds the same arrays and both travel with the weights.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxr.config import ARCHS, recorded_params
from cxr.resnet import empty_resnet

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cxr-checkpoint/1"
# ImageNet's RGB mean/std averaged over channels: right for a grayscale input fed to a conv1
# whose RGB filters were summed (see adapt_conv1_to_gray).
GRAY_MEAN, GRAY_STD = 0.449, 0.226


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used, with the reason."""


class CXRNet(nn.Module):
    """Normalisation + a ResNet with a one-channel stem: torchvision's where a model is built to
    train, cxr.resnet's copy of its graph where a checkpoint is loaded.

    `input_size` (None: whatever size comes in) is the side the backbone sees: the two tasks
    share one set of preprocessed arrays but need not share an input size
    (`train_<task>.input_size`), so a network trained smaller than its arrays resizes them
    itself, identically in every caller.
    """

    def __init__(
        self,
        backbone: nn.Module,
        mean: float = GRAY_MEAN,
        std: float = GRAY_STD,
        input_size: int | None = None,
    ):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))
        self.backbone = backbone
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((self.resize(x) - self.mean) / self.std)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """x at the backbone's input size; antialiased, so a smaller input is an area-like
        average of the array, not a sampling of every few pixels."""
        side = self.input_size
        if side is None or tuple(x.shape[-2:]) == (side, side):
            return x
        return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True,
                             align_corners=False)  # fmt: skip

    @property
    def cam_layer(self) -> nn.Module:
        """The last residual block: Grad-CAM's default target layer."""
        return self.backbone.layer4[-1]


def adapt_conv1_to_gray(backbone: nn.Module) -> None:
    """Replace the RGB stem by a one-channel one.

    Summing the RGB filters gives exactly the response to a gray image replicated to three
    channels, at a third of the stem's input memory traffic; with random weights it is simply
    a fresh one-channel conv.
    """
    old = backbone.conv1
    new = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    with torch.no_grad():
        new.weight.copy_(old.weight.sum(dim=1, keepdim=True))
    backbone.conv1 = new


def _imagenet_backbone(arch: str) -> nn.Module:
    import torchvision  # only where a model is built to train: loading needs none (cxr.resnet)

    try:
        return torchvision.models.get_model(arch, weights="DEFAULT")
    except Exception as exc:  # urllib/ssl/http errors differ by platform; all mean the same
        raise CheckpointError(
            f"could not get ImageNet weights for {arch} ({type(exc).__name__}: {exc}). They are "
            "downloaded on first use and need a network; set weights: none, or download them "
            "elsewhere and set weights: <path to the .pth state_dict>."
        ) from exc


def _state_dict_backbone(arch: str, path: Path) -> nn.Module:
    state = load_state_dict_file(path)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # one of our own checkpoints
        state = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
    import torchvision

    backbone = torchvision.models.get_model(arch, weights=None)
    if "conv1.weight" in state and state["conv1.weight"].shape[1] == 1:
        adapt_conv1_to_gray(backbone)
    own = backbone.state_dict()
    # The classifier head differs in size between tasks; everything else must fit.
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.startswith("fc.")]
    missing += [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(
            f"{path} does not fit a {arch}: {len(missing)} tensors missing, extra or of the wrong shape "
            f"(e.g. {missing[:3]}). Is it a {arch} state_dict?"
        )
    backbone.load_state_dict(usable, strict=False)
    return backbone


def build_model(
    arch: str,
    num_classes: int,
    *,
    weights: str = "none",
    zero_init_residual: bool = True,
    input_size: int | None = None,
) -> CXRNet:
    """A ResNet for `num_classes` grayscale classes, from random init, ImageNet or a file,
    seeing `input_size` px (None: the arrays' own size)."""
    _check_arch(arch)
    if weights == "none":
        import torchvision

        # Zero-initialising each block's last BN makes a deep ResNet start as a shallow one;
        # measured to matter a lot for ResNet-152 trained from scratch on a few hundred images.
        backbone = torchvision.models.get_model(
            arch, weights=None, zero_init_residual=zero_init_residual
        )
    elif weights == "imagenet":
        backbone = _imagenet_backbone(arch)
    else:
        backbone = _state_dict_backbone(arch, Path(weights))
    if backbone.conv1.in_channels != 1:
        adapt_conv1_to_gray(backbone)
    if backbone.fc.out_features != num_classes:
        backbone.fc = nn.Linear(backbone.fc.in_features, num_classes)
    return CXRNet(backbone, input_size=input_size)


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise CheckpointError(f"unknown arch {arch!r}; choose one of {list(ARCHS)}")


def load_state_dict_file(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True: a file that needs arbitrary code is refused."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: file not found")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    # torch.save writes a zip archive (PK..), older versions a bare pickle (protocol byte 0x80).
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise CheckpointError(f"{path}: not a readable PyTorch file (unknown format)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: it is not a plain checkpoint (it would need to run "
            f"arbitrary code to unpickle: {str(exc).splitlines()[0]})"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch file ({exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def save_state(path: Path, model: nn.Module, meta: dict[str, Any], fmt: str) -> None:
    """state_dict (on the CPU) + plain metadata under a format tag, written atomically: a
    crash mid-write leaves the previous file, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": fmt, "state_dict": state, "meta": meta}, tmp)
    tmp.replace(path)


def read_state(path: str | Path, fmt: str, what: str, how: str) -> tuple[dict, dict[str, Any]]:
    """(state_dict, meta) of a file `save_state` wrote with `fmt`; anything else is refused,
    naming `what` was expected and `how` to make one."""
    path = Path(path)
    blob = load_state_dict_file(path)
    if blob.get("format") != fmt or "meta" not in blob:
        raise CheckpointError(
            f"{path}: not a {what} (format {blob.get('format')!r}, expected {fmt!r}); {how}"
        )
    return blob["state_dict"], blob["meta"]


def load_weights(model: nn.Module, state: dict, path: str | Path, described: str) -> nn.Module:
    """Load `state` into `model` (strict) and switch to eval; a mismatch names the file."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match {described}: {exc}") from exc
    return model.eval()


def classifier_meta(
    p: Any, spec: dict[str, Any], model: CXRNet, seed: int, training: dict[str, Any]
) -> dict[str, Any]:
    """What every classifier checkpoint says about itself (the train stage's and the
    out-of-source folds' alike): `p` a cxr.config.TrainParams, `spec` the preprocessing dict."""
    return {
        "task": p.task,
        "arch": p.arch,
        "class_names": p.class_names,
        "image_size": spec["image_size"],  # the arrays' side, which callers feed
        "input_size": model.input_size or spec["image_size"],  # the backbone's
        "preprocessing": spec,
        "normalisation": {
            "mean": float(model.mean),
            "std": float(model.std),
            "input": "uint8/255, 1 channel",
        },
        "params": recorded_params(p),  # (a key left off since is not recorded)
        "seed": seed,
        "training": training,
    }


def save_checkpoint(path: Path, model: CXRNet, meta: dict[str, Any]) -> None:
    """A classifier checkpoint: state_dict + metadata (arch, task, classes, preprocessing)."""
    save_state(path, model, meta, CHECKPOINT_FORMAT)


def load_checkpoint(path: str | Path, task: str | None = None) -> tuple[CXRNet, dict[str, Any]]:
    """Rebuild the model a checkpoint describes; `task` guards against the wrong one."""
    state, meta = read_state(path, CHECKPOINT_FORMAT, "cxr checkpoint", "train one with dvc repro")
    if task is not None and meta.get("task") != task:
        raise CheckpointError(f"{path}: a {meta.get('task')!r} checkpoint, expected {task!r}")
    # Checkpoints written before `input_size` existed saw their arrays' own size.
    _check_arch(meta["arch"])
    # The graph without torchvision or random init (cxr.resnet: a one-film predict starts faster);
    # the same module names as build_model's, so its state_dict loads as it was saved.
    backbone = empty_resnet(meta["arch"], len(meta["class_names"]))
    model = CXRNet(backbone, input_size=meta.get("input_size"))
    return load_weights(model, state, path, meta["arch"]), meta
