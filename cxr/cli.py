"""Shared plumbing for the stage scripts: logging setup, user-facing error handling and the
command-line options more than one stage takes."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator

from cxr.errors import FetchError, LeakageError

# Errors a user can act on (bad params, missing or corrupt inputs, failed downloads, leaks; the
# library's own errors subclass ValueError or are listed): one line, exit 1, no traceback.
# Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FetchError, LeakageError)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's expected errors into `error: <message>` and exit status 1."""
    try:
        yield
    except KeyboardInterrupt:
        print(
            "error: interrupted; outputs were left as they were (re-run to finish)", file=sys.stderr
        )
        sys.exit(130)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def add_download_options(parser: argparse.ArgumentParser) -> None:
    """The fetch stages' operational knobs, not params: they change how fast, never what is
    fetched (so they are not in params.yaml and do not re-run a stage)."""
    parser.add_argument("--workers", type=int, default=8, help="parallel downloads")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request")
    parser.add_argument("--retries", type=int, default=3, help="retries per download")
