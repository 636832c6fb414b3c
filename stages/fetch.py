"""Stage fetch: the selected chest X-rays and the 19 case studies, verified, with manifests."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so `python stages/fetch.py` works without installing cxr
    sys.path.insert(0, str(REPO_ROOT))

from cxr import fetch  # noqa: E402
from cxr.cli import add_download_options, setup_logging, user_errors  # noqa: E402
from cxr.params import ParamsError, load_params  # noqa: E402

log = logging.getLogger("stages.fetch")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sources", type=Path, default=Path("data/sources/sources.csv"))
    p.add_argument("--cases", type=Path, default=Path("data/sources/cases.csv"))
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--out", type=Path, default=Path("data/raw"))
    add_download_options(p)
    return p.parse_args(argv)


def load_dataset_param(path: Path) -> str:
    """fetch.dataset from the params file (its value is checked by select_sources)."""
    params = load_params(path)  # a missing or malformed file: ParamsError naming it
    dataset = (
        params.get("fetch", {}).get("dataset") if isinstance(params.get("fetch"), dict) else None
    )
    if dataset is None:
        raise ParamsError(
            f"{path} has no fetch.dataset; add `fetch: {{dataset: sample}}` (or full)"
        )
    return str(dataset)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    start = time.monotonic()
    # user_errors: a failed fetch, a bad param or Ctrl-C is one `error:` line, no traceback;
    # verified files stay in place (a re-run skips them) and no manifest is written.
    with user_errors():
        dataset = load_dataset_param(args.params)
        sources = fetch.select_sources(fetch.read_table(args.sources), dataset)
        cases = fetch.read_table(args.cases)
        # $CXR_MIRROR, else shared/cxr-mirror above the working directory or the repository.
        lookup = fetch.find_mirror(os.environ, fetch.search_starts(REPO_ROOT))
        mirror = lookup.path
        log.info("%s: %d images + %d cases, mirror %s", dataset, len(sources), len(cases), mirror)
        counts = fetch.fetch_dataset(
            sources, cases, args.out, mirror=mirror, base_url=fetch.resolve_base_url(os.environ),
            workers=args.workers, timeout=args.timeout, retries=args.retries, lookup=lookup,
        )  # fmt: skip
    log.info("%(mirror)d from the mirror, %(downloaded)d downloaded, %(present)d already present",
             counts)  # fmt: skip
    log.info("wrote %s in %.1fs", args.out, time.monotonic() - start)


if __name__ == "__main__":
    main()
