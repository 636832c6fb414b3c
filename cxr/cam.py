"""Class activation maps and checks on them: where the map lies, whether it is faithful, whether
it depends on the learned weights at all. pytorch-grad-cam computes the maps.

A map here is H x W float32 in [0, 1] at the input image's size, upsampled from the target
layer's grid (the last block of `layer4`: S/32 x S/32 for a ResNet, 4 x 4 at 112 px; of
`layer3`: S/16, 7 x 7), so it is coarse by construction. Orientation: images are stored as
radiographs are read, so the patient's right is on the image's LEFT.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from pytorch_grad_cam import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import (
    ClassifierOutputTarget,
)
from torch import nn
from tqdm import tqdm

from cxr.data import to_input
from cxr.ensemble import Ensemble
from cxr.models import CXRNet, build_model

log = logging.getLogger(__name__)

METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "scorecam": ScoreCAM,
    "xgradcam": XGradCAM,
    "eigencam": EigenCAM,
}
TARGET_LAYERS = ("layer4", "layer3")
DPI = 100  # figures live in git: keep each PNG well under ~150 kB
ORIENTATION_NOTE = "R = patient's right, shown on the image's left (radiological convention)"


# --- maps -------------------------------------------------------------------------------------


def cam_class(method: str) -> type[BaseCAM]:
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {list(METHODS)}")
    return METHODS[method]


def target_layer(model: CXRNet, name: str) -> nn.Module:
    """The last residual block of ResNet stage `name` (layer4 = `model.cam_layer`)."""
    if name not in TARGET_LAYERS:
        raise ValueError(f"unknown target layer {name!r}; choose one of {list(TARGET_LAYERS)}")
    return getattr(model.backbone, name)[-1]


def compute_cams(
    model: CXRNet,
    images: np.ndarray,
    targets: list[int] | None = None,
    *,
    method: str = "gradcam",
    batch_size: int,
    layer: str,
) -> np.ndarray:
    """N x H x W maps in [0, 1] for uint8 N x H x W images, on the last block of `layer`.

    `layer` and `batch_size` have no default: the pipeline's come from params.yaml (gradcam), so
    a second value here could only contradict them.

    `targets` are class indices (None: each image's predicted class). Every map is min-max
    scaled by pytorch-grad-cam, so maps show where, not how much; compare them by rank or share.
    """
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"{len(targets)} targets for {len(images)} images")
    if isinstance(model, Ensemble):  # the mean of the members' maps on the plain film
        maps = [compute_cams(m, images, targets, method=method, batch_size=batch_size, layer=layer)
                for m in model.members]  # fmt: skip
        return np.mean(maps, axis=0)
    layers = [target_layer(model, layer)]
    cam = cam_class(method)(model=model, target_layers=layers)  # also sets eval()
    cam.batch_size = batch_size  # ScoreCAM's masked forward passes per batch
    device = next(model.parameters()).device
    out = np.zeros(images.shape, dtype=np.float32)
    try:
        # The hooks need a graph even if the caller is in no_grad/inference mode or froze the
        # weights: an input that requires grad guarantees the target layer's output has one.
        with torch.inference_mode(False), torch.enable_grad():
            for start in tqdm(range(0, len(images), batch_size), desc=method, leave=False):
                stop = start + batch_size
                x = to_input(images[start:stop]).to(device).requires_grad_(True)
                batch_targets = None
                if targets is not None:
                    batch_targets = [ClassifierOutputTarget(int(t)) for t in targets[start:stop]]
                out[start:stop] = cam(input_tensor=x, targets=batch_targets)
    finally:
        cam.activations_and_grads.release()  # not `with cam:`, whose exit swallows IndexError
        model.zero_grad(set_to_none=True)
    return np.clip(out, 0.0, 1.0)


def random_twin(arch: str, num_classes: int, seed: int, input_size: int | None = None) -> CXRNet:
    """A same-architecture network with random weights (the model-randomisation baseline).

    zero_init_residual=False: with zeroed last BNs every residual block starts as the identity,
    a degenerate network rather than a random one.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch, num_classes, weights="none", zero_init_residual=False,
                            input_size=input_size)  # fmt: skip
    return model.eval()


def overlay(image: np.ndarray, cam: np.ndarray, image_weight: float = 0.55) -> np.ndarray:
    """uint8 H x W x 3: the radiograph under a jet-coloured map."""
    gray = np.repeat((image.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    return show_cam_on_image(gray, cam, use_rgb=True, image_weight=image_weight)
