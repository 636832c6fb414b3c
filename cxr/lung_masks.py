"""Fetch the V7 Labs lung-field masks named in lung_masks.csv, verified by sha256.

The mirror holds derived masks (`lung-masks/<id>.png`: the original mask squashed to 224 x 224
by nearest neighbour, so it lies on the harmonised image pixel for pixel). From the mirror they
are copied; without it, the original (`origin`) is downloaded from raw.githubusercontent.com,
checked against `origin_sha256`, and the same derivation is redone here and checked against
`mask_sha256`. Every copy and download goes through cxr.fetch (temp file, hash, rename).
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from cxr import fetch
from cxr.errors import FetchError, InputError
from cxr.images import decode

log = logging.getLogger(__name__)

MASK_SIZE = 224  # the harmonised image's side (split.harmonise_size)
MASK_VALUES = {0, 127, 255}  # background, ignore (device or markup over the lung), lung
MANIFEST_NAME = "manifest.csv"
COLUMNS = ("image_path", "mask", "mask_sha256", "origin", "origin_sha256")


def read_mask_table(path: Path) -> pd.DataFrame:
    """lung_masks.csv as text, checked for the columns this module needs."""
    table = fetch.read_table(path, required=COLUMNS)
    for name in table["mask"]:
        fetch.image_relpath(name)  # refuses absolute paths and '..' before anything is written
    return table


def squash_mask(mask: np.ndarray, size: int = MASK_SIZE) -> np.ndarray:
    """Nearest-neighbour resize to size x size: the images' squash, with no blended values."""
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L")
    return np.asarray(img.resize((size, size), Image.Resampling.NEAREST), dtype=np.uint8)


def encode_png(mask: np.ndarray) -> bytes:
    """PNG bytes as the mirror's masks were written (8-bit gray, PIL `optimize=True`):
    re-encoding a mirror mask this way gives its exact bytes, so its sha256 can be checked."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L").save(
        buf, format="PNG", optimize=True
    )
    return buf.getvalue()


def derive_mask(data: bytes, name: str = "<bytes>", size: int = MASK_SIZE) -> bytes:
    """An original mask file -> the derived 224 px PNG bytes (see the module docstring).

    Values must already be 0 / 127 / 255 after conversion to 8-bit gray; anything else would
    need a mapping we cannot guess, so it is an error naming the file.
    """
    gray = np.asarray(decode(data, name).convert("L"), dtype=np.uint8)
    found = set(np.unique(gray).tolist())
    if not found <= MASK_VALUES:
        raise InputError(
            f"{name}: mask values {sorted(found - MASK_VALUES)[:5]} are not background 0, "
            "ignore 127 or lung 255; is it a V7 semantic mask?"
        )
    return encode_png(squash_mask(gray, size))


def _specs(table: pd.DataFrame, path: str, digest: str) -> list[fetch.FileSpec]:
    return [
        fetch.FileSpec(path=str(p), sha256=str(h).lower())
        for p, h in zip(table[path], table[digest], strict=True)
    ]


def _derive_all(
    rows: pd.DataFrame,
    out: Path,
    *,
    mirror: Path | None,
    base_url: str,
    lookup: fetch.MirrorLookup | None,
    **kw: Any,
) -> None:
    """Download (or copy) the originals of `rows`, derive their masks, and move verified copies
    into `out`. A derived mask whose sha256 differs from lung_masks.csv stops the run, naming
    the mask, its origin and both digests; nothing unverified reaches `out`."""
    with tempfile.TemporaryDirectory(prefix="lung-masks-") as tmp:
        origins, derived = Path(tmp) / "origins", Path(tmp) / "derived"
        origin_specs = _specs(rows, "origin", "origin_sha256")
        fetch.fetch_files(
            origin_specs, origins, mirror=mirror, base_url=base_url, lookup=lookup, **kw
        )
        failures = []
        for row in rows.to_dict("records"):
            data = derive_mask((origins / row["origin"]).read_bytes(), row["origin"])
            got = hashlib.sha256(data).hexdigest()
            if got != row["mask_sha256"].lower():
                failures.append(
                    f"  {row['mask']} (derived from {row['origin']}): expected sha256 "
                    f"{row['mask_sha256']}, got {got}"
                )
                continue
            (derived / row["mask"]).parent.mkdir(parents=True, exist_ok=True)
            (derived / row["mask"]).write_bytes(data)
        if failures:
            raise FetchError(
                f"{len(failures)} of {len(rows)} derived lung masks do not match lung_masks.csv "
                "(a changed original, or a different resize or PNG encoder):\n"
                + "\n".join(failures[:5])
            )
        # The verified copy into place is cxr.fetch's: temp file, hash, rename.
        fetch.fetch_files(_specs(rows, "mask", "mask_sha256"), out, mirror=derived, **kw)


def fetch_masks(
    table: pd.DataFrame,
    out: Path,
    *,
    mirror: Path | None,
    base_url: str = fetch.DEFAULT_BASE_URL,
    workers: int = 8,
    timeout: float = 30.0,
    retries: int = 3,
    lookup: fetch.MirrorLookup | None = None,
) -> Counter[str]:
    """Every mask of `table` into `out/<mask>`, then `out/manifest.csv` (the table plus `file`,
    the mask's path relative to `out`). Counts by origin: mirror / derived / present.
    `lookup` (cxr.fetch.find_mirror) lets an offline failure say where the mirror was sought.

    The manifest is removed first and written last: its presence means every mask is there.
    """
    out.mkdir(parents=True, exist_ok=True)
    fetch.remove_stale_parts(out)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    kw = {"workers": workers, "timeout": timeout, "retries": retries}
    specs = _specs(table, "mask", "mask_sha256")
    present = [(out / s.path).is_file() and fetch.sha256_file(out / s.path) == s.sha256
               for s in specs]  # fmt: skip
    in_mirror = [mirror is not None and (mirror / s.path).is_file() for s in specs]
    counts: Counter[str] = Counter(present=sum(present))
    copy = [s for s, p, m in zip(specs, present, in_mirror, strict=True) if m and not p]
    if copy:
        counts["mirror"] = fetch.fetch_files(copy, out, mirror=mirror, **kw)["mirror"]
    derive = ~np.asarray(present, dtype=bool) & ~np.asarray(in_mirror, dtype=bool)
    if derive.any():
        log.info("%d masks not in the mirror: deriving them from their originals", derive.sum())
        _derive_all(table[derive], out, mirror=mirror, base_url=base_url, lookup=lookup, **kw)
        counts["derived"] = int(derive.sum())
    fetch.write_csv_atomic(table.assign(file=table["mask"]), out / MANIFEST_NAME)
    return counts
