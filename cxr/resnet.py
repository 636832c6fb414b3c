"""The torchvision ResNets' inference graph, for loading a checkpoint without torchvision.

Why this exists: `import torchvision` costs 1-1.5 s of a one-film `python -m cxr predict` on a
2-core CPU, most of it `torch._dynamo`, which torchvision's `ops` import whatever model is asked
for (docs/performance.md). A checkpoint is only a state_dict, so rebuilding the network needs the
graph, not the library. Training, ImageNet weights and weights from a file still use torchvision
itself (cxr.models.build_model); this module only *loads*: its modules are made on the meta device
and given uninitialised memory (no random init, which torchvision spends ~0.2 s on for two
ResNet-18s), which the checkpoint's tensors then fill.

Module names, shapes and the order of operations are torchvision's (`torchvision.models.resnet`,
v0.29), so a state_dict moves between the two unchanged and gives the same outputs bit for bit:
tests/test_resnet.py checks the names and shapes for every arch in cxr.config.ARCHS and the
outputs for both block kinds, shallow and deep (ResNet-18, -50, -152). The stem takes one channel,
as every cxr checkpoint's does (cxr.models.adapt_conv1_to_gray).
"""

from __future__ import annotations

import torch
from torch import nn

# arch -> (block, blocks per stage): torchvision's resnet18 ... resnet152.
LAYOUTS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(_conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv(c_in, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(c_in, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv(c_in, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, stride)  # stride on the 3x3, as torchvision (v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, planes * 4, 1)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet with a one-channel stem (attribute names kept: conv1, bn1, relu,
    maxpool, layer1-4, avgpool, fc)."""

    def __init__(self, arch: str, num_classes: int) -> None:
        super().__init__()
        kind, blocks = LAYOUTS[arch]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in = 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), start=1):
            stage = []
            for j in range(count):
                stage.append(block(c_in, planes, 2 if (j == 0 and i > 1) else 1))
                c_in = planes * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def empty_resnet(arch: str, num_classes: int) -> ResNet:
    """The graph in uninitialised CPU memory: every tensor must come from a strict
    `load_state_dict`. The tensors are copied in, not assigned (`assign=True`): training saves
    channels-last weights, and a network holding them as saved runs other kernels, whose sums
    differ from the evaluate stage's in the last bits."""
    with torch.device("meta"):
        model = ResNet(arch, num_classes)
    # Each tensor made from its shape: `model.to_empty` goes through torch.empty_like on meta
    # tensors, whose Python decompositions import sympy (0.5 s of a one-film predict's start).
    for module in model.modules():
        for name, t in module.named_parameters(recurse=False):
            fresh = torch.empty(t.shape, dtype=t.dtype)
            setattr(module, name, nn.Parameter(fresh, requires_grad=t.requires_grad))
        for name, t in module.named_buffers(recurse=False):
            module.register_buffer(name, torch.empty(t.shape, dtype=t.dtype))
    return model
