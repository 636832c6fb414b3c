"""Copies of the Xeon fold models (default_xeon, default_xeon_seed43) with their metadata's array
size corrected from 128 to 112 px: RULE.md thirteenth amendment found they trained and scored on the
112 px arrays while their params said 128. Weights unchanged."""

from pathlib import Path

import torch

out = Path("reports/oos/candidates/ensemble_xeon/models")
for seed, run in ((42, "default_xeon"), (43, "default_xeon_seed43")):
    for fold in ("hannover", "europe", "world"):
        src = Path(f"reports/oos/candidates/{run}/models/{fold}_binary.pt")
        blob = torch.load(src, map_location="cpu", weights_only=True)
        meta = blob["meta"]
        assert meta["image_size"] == 128 and meta.get("input_size") is None, meta
        meta["image_size"] = 112
        meta["preprocessing"] = dict(meta["preprocessing"], image_size=112)
        meta["note"] = (
            f"{src}: metadata array size corrected 128 -> 112 (RULE.md thirteenth amendment); weights unchanged"
        )
        dst = out / f"seed{seed}" / f"{fold}_binary.pt"
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, dst)
        print(dst)
