"""Checkpoints load into cxr.resnet's graph (no torchvision) and compute what torchvision's did;
a one-film predict imports none of the libraries it does not use.

Watched red by hand: with Bottleneck's stride moved from its 3x3 to its first 1x1 conv (the
original ResNet's placement) the bottleneck archs' outputs differed; with the checkpoint's tensors
assigned rather than copied, outputs differed in the last bits (the evaluate stage's metrics by
1e-8); with `import torchvision` (or pydicom) back at the top of its module the import test
named it, and named sympy with `model.to_empty(device="cpu")` back in cxr.resnet.empty_resnet.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr import ood
from cxr.config import ARCHS
from cxr.models import build_model, load_checkpoint, save_checkpoint
from cxr.resnet import empty_resnet
from tests.test_ood import tiny_segmenter
from tests.test_predict import THREADS, make_models, radiograph, save

ROOT = Path(__file__).resolve().parents[1]
# What a one-film predict used to import and never used (docs/performance.md "predict's speed");
# sympy came with materialising the meta-device graph through `Module.to_empty`.
UNUSED_BY_PREDICT = ("torchvision", "pandas", "sklearn", "scipy.stats", "pydicom", "sympy")


@pytest.mark.parametrize("arch", ARCHS)
def test_the_graph_has_torchvisions_names_and_shapes(arch: str) -> None:
    trained = build_model(arch, 4).backbone.state_dict()
    loaded = empty_resnet(arch, 4).state_dict()
    assert list(loaded) == list(trained)
    assert {k: tuple(v.shape) for k, v in loaded.items()} == {
        k: tuple(v.shape) for k, v in trained.items()
    }


# Both block kinds, shallow and deep (34 and 101 differ from these only in block counts, which
# the names-and-shapes test covers for every arch).
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet152"])
def test_a_saved_checkpoint_loads_and_gives_the_same_outputs(tmp_path: Path, arch: str) -> None:
    """The same bits as the checkpoint loaded into torchvision's network (the evaluate stage's
    path before cxr.resnet). Saved in channels-last order, as training saves: a network that
    takes those tensors as they are (`assign=True`) differs in the last bits."""
    torch.manual_seed(0)
    # zero_init_residual=False and non-trivial BN statistics: with the defaults most blocks are
    # the identity and a wrong block would go unseen.
    model = build_model(arch, 4, zero_init_residual=False).train()
    with torch.no_grad():
        model(torch.rand(8, 1, 48, 48))
    model = model.eval().to(memory_format=torch.channels_last)
    path = tmp_path / "m.pt"
    meta = {"task": "four_class", "arch": arch, "class_names": ["a", "b", "c", "d"],
            "image_size": 48, "preprocessing": {}}  # fmt: skip
    save_checkpoint(path, model, meta)
    torchvision_net = build_model(arch, 4)
    torchvision_net.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    loaded, _ = load_checkpoint(path, "four_class")
    x = torch.rand(3, 1, 48, 48)
    with torch.no_grad():
        want, got = torchvision_net.eval()(x), loaded(x)
    assert not loaded.training
    assert torch.equal(got, want), (got - want).abs().max()
    assert loaded.cam_layer is loaded.backbone.layer4[-1]


def test_a_one_film_predict_imports_no_unused_library(tmp_path: Path) -> None:
    """Both classifiers, the lung segmenter and the out-of-distribution gate, as the default
    bundle has them, in a fresh interpreter."""
    models = make_models(tmp_path / "models")
    segmenter = tiny_segmenter(tmp_path / "models" / "segmenter.pt")
    rng = np.random.default_rng(0)
    params = ood.load_ood_params(ROOT / "params.yaml")
    gate = ood.fit_state(rng.normal(size=(40, 512)), rng.normal(size=(20, 512)), params,
                         ood.sha256_of(models["binary"]))  # fmt: skip
    ood.save_state(models["binary"].parent / "ood.pt", gate)
    film = save(Image.fromarray(radiograph()), tmp_path / "film.png")
    argv = [str(a) for a in ("predict", film, "--models", models["models"], "--segmenter", segmenter,
                             *THREADS, "--out", tmp_path / "p.csv")]  # fmt: skip
    code = (
        "import sys\nfrom cxr.__main__ import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        f"print([m for m in {UNUSED_BY_PREDICT!r} if m in sys.modules])\n"
        "print('cxr.ood' in sys.modules, 'cxr.segmenter' in sys.modules)"  # gate and lungs used
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-2:] == ["[]", "True True"], done.stdout
    assert (tmp_path / "p.csv").read_text().count(",ok,") == 1
