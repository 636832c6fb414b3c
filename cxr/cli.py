"""Shared plumbing for the stage scripts: logging setup, user-facing error handling and the
command-line options more than one stage takes."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator

# A missing or unreadable file a user named (an input path, a params file): its message names
# the path, which is all there is to fix. Other OSErrors (a full disk, a broken pipe) and every
# ValueError, KeyError, ... from NumPy, pandas, torch or our own code are bugs or surprises
# whose traceback says where: they keep it.
FILE_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError)


def is_user_error(exc: BaseException) -> bool:
    """An error a user can act on: one of the project's own error types (any exception class
    defined in the `cxr` package: ParamsError, CheckpointError, InputError, FetchError,
    LeakageError, ImageError, ...), whose messages say what was wrong and what to do, or a
    file error naming the user's path (FILE_ERRORS)."""
    own = any(c.__module__.split(".")[0] == "cxr" for c in type(exc).__mro__)
    return own or isinstance(exc, FILE_ERRORS)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Ctrl-C held back while the block runs, then raised as KeyboardInterrupt when it ends.

    For importing torch: a KeyboardInterrupt raised while torch's C++ extension sets itself up
    cannot get back to Python and aborts the process ("terminate called after throwing an
    instance of 'pybind11::error_already_set'", signal 6), in place of the one line and status
    130 that `python -m cxr` promises. Here the signal only sets a flag, and the interrupt comes
    when the block ends (torch's import: about a second on 2 cores). Outside the main
    thread, or when SIGINT is not Python's own handler (ignored, or the program's), nothing
    changes."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):  # fmt: skip
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors a user can act on (`is_user_error`) into `error: <message>` and exit status
    1; anything else propagates with its traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print(
            "error: interrupted; outputs were left as they were (re-run to finish)", file=sys.stderr
        )
        sys.exit(130)
    except Exception as exc:
        if not is_user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


@contextlib.contextmanager
def stage_imports() -> Iterator[None]:
    """Around a stage script's imports (torch, pandas, its cxr modules: seconds on 2 cores): a
    Ctrl-C while they load ends the stage as one inside main does, with one line and status 130
    (user_errors), when the block ends; not with a traceback, nor with the C++ abort that
    interrupts_held explains when the Ctrl-C lands in torch's import."""
    with user_errors(), interrupts_held():
        yield


def add_download_options(parser: argparse.ArgumentParser) -> None:
    """The fetch stages' operational knobs, not params: they change how fast, never what is
    fetched (so they are not in params.yaml and do not re-run a stage)."""
    parser.add_argument("--workers", type=int, default=8, help="parallel downloads")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request")
    parser.add_argument("--retries", type=int, default=3, help="retries per download")
