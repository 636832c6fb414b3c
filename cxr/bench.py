"""Training throughput: the pipeline's loop against raw forward+backward on random tensors.

    python -m cxr bench --arch resnet152 --image-size 112 --batch-size 16

Both measurements run in one process on the same model, batch size, image size and device
(CUDA when present, with the training loop's bf16 autocast; else the CPU), so their ratio says
how much the data path (gather from a host array, copy to the device, uint8->float, batched
augmentation, optimizer step) costs on top of the model itself.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from cxr.config import TrainParams, load_train_params
from cxr.infer import autocast, configure_cpu, pick_device
from cxr.models import build_model
from cxr.params import non_negative_int
from cxr.train import make_optimizer, train_epoch


def _clock(device: torch.device) -> float:
    """Wall time once the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def raw_throughput(model: nn.Module, batch: int, size: int, steps: int, warmup: int) -> float:
    """Images/s of forward+backward alone on a random channels_last tensor already on the device."""
    device = next(model.parameters()).device
    x = torch.rand(batch, 1, size, size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, model.backbone.fc.out_features, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            start = _clock(device)
        model.zero_grad(set_to_none=True)
        with autocast(device):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
    return batch * steps / (_clock(device) - start)


def pipeline_throughput(
    model: nn.Module, p: TrainParams, batch: int, size: int, steps: int, warmup: int
) -> float:
    """Images/s of `train_epoch`, the loop the training stage runs, on uint8 images in host memory
    (as the stage's memory-mapped split: gathered per batch, copied to the device), with the
    optimizer and augmentation of the training params `p`."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    n = batch * (steps + warmup)
    images = torch.randint(0, 256, (n, size, size), dtype=torch.uint8, generator=gen).numpy()
    num_classes = model.backbone.fc.out_features
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    allowed = labels[:, None] == torch.arange(num_classes)[None, :]
    batches = torch.randperm(n, generator=gen).view(-1, batch)
    optimizer = make_optimizer(model, p)
    kwargs = dict(
        weights=None, optimizer=optimizer, scheduler=None,
        aug=p.augmentation(), generator=gen, desc="bench",
    )  # fmt: skip
    train_epoch(model, batches[:warmup], images, allowed, **kwargs)
    start = _clock(device)
    _, _, count = train_epoch(model, batches[warmup:], images, allowed, **kwargs)
    return count / (_clock(device) - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cxr bench", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet152")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--params", type=Path, default=Path("params.yaml"),
        help="its train_four_class section sets the optimizer and augmentation",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; best kept")
    parser.add_argument(
        "--threads", type=non_negative_int, default=0, help="torch CPU threads (0 = one per core)"
    )
    parser.add_argument("--json", type=Path, help="also append the result as one JSON line here")
    args = parser.parse_args(argv)
    configure_cpu(args.threads)
    p = load_train_params(args.params, "train_four_class")
    torch.manual_seed(0)
    device = pick_device()
    model = build_model(args.arch, 4).to(device, memory_format=torch.channels_last)
    shape = (args.arch, args.batch_size, args.image_size, args.steps)
    # Alternate the two and keep each one's best round, so neither pays for the other's
    # warm-up or for a burst of load from elsewhere on the machine.
    raw, pipe = 0.0, 0.0
    for _ in range(args.rounds):
        raw = max(raw, raw_throughput(model, *shape[1:3], args.steps, args.warmup))
        pipe = max(pipe, pipeline_throughput(model, p, *shape[1:3], args.steps, args.warmup))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.arch} {args.image_size}px batch {args.batch_size}, {args.steps} timed batches, "
          f"{where}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"raw forward+backward: {raw:8.2f} img/s")
    print(f"pipeline training:    {pipe:8.2f} img/s")
    print(f"ratio:                {pipe / raw:8.3f}")
    if args.json:
        record = {
            "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
            "steps": args.steps, "rounds": args.rounds, "device": where,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "raw_images_per_second": round(raw, 2), "pipeline_images_per_second": round(pipe, 2),
            "ratio": round(pipe / raw, 4),
        }  # fmt: skip
        with args.json.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
