"""A fingerprint of training: a toy run of a task's params.yaml recipe, hashed.

Run it on the parent commit and on a change, on the same machine (the same CPU kind, one
thread): the same hash means the change leaves training as it was, bit for bit, which is what
`python -m cxr.relock --write` asks to have been shown (docs/development.md). It trains the
real loop (sampling, augmentation, optimiser, schedule) for 2 epochs on 64 synthetic 32 px
films; the hash differs between CPU kinds, so compare only hashes made on one machine.

    python -m tests.toy_hash                 # train_binary's recipe
    python -m tests.toy_hash train_four_class
"""

from __future__ import annotations

import hashlib
import sys

import torch

from cxr.data import seed_everything
from cxr.models import build_model
from cxr.train import train_model
from tests.conftest import quadrant_set, repo_params


def toy_hash(section: str = "train_binary") -> str:
    p = repo_params(section, epochs=2, batch_size=8, threads=1)
    torch.set_num_threads(1)
    images, labels = quadrant_set(64)
    labels = labels % len(p.class_names)
    generator = seed_everything(0, p.deterministic)
    model = build_model(p.arch, len(p.class_names))
    train_model(model, p, train_images=images, train_labels=labels, val_images=images[:16],
                val_labels=labels[:16], generator=generator)  # fmt: skip
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


if __name__ == "__main__":
    print(toy_hash(*sys.argv[1:2]))
