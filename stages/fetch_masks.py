"""fetch_masks stage: the lung-field masks of lung_masks.csv, verified, with a manifest."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from cxr import fetch  # noqa: E402
from cxr.cli import add_download_options, setup_logging, user_errors  # noqa: E402
from cxr.lung_masks import fetch_masks, read_mask_table  # noqa: E402

log = logging.getLogger("fetch_masks")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--masks", type=Path, default=Path("data/sources/lung_masks.csv"))
    p.add_argument("--out", type=Path, default=Path("data/lung_masks"))
    add_download_options(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    start = time.monotonic()
    with user_errors():
        table = read_mask_table(args.masks)
        # $CXR_MIRROR, else shared/cxr-mirror above the working directory or the repository.
        lookup = fetch.find_mirror(os.environ, fetch.search_starts(REPO_ROOT))
        log.info("%d lung masks, mirror %s", len(table), lookup.path)
        counts = fetch_masks(
            table, args.out, mirror=lookup.path, base_url=fetch.resolve_base_url(os.environ),
            workers=args.workers, timeout=args.timeout, retries=args.retries, lookup=lookup,
        )  # fmt: skip
    log.info("%d from the mirror, %d derived from their originals, %d already present",
             counts["mirror"], counts["derived"], counts["present"])  # fmt: skip
    log.info("wrote %s in %.1fs", args.out, time.monotonic() - start)


if __name__ == "__main__":
    main()
