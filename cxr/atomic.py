"""Write to a temporary file beside the target, then rename: readers never see half a file."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def temporary_name(path: Path) -> Path:
    """Hidden and random, so it never clobbers a user's file and folder walks skip it."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def is_temporary_of(candidate: Path, path: Path) -> bool:
    """Whether `candidate` is a name `temporary_name(path)` could have produced."""
    name, prefix = candidate.name, f".{path.name}."
    token = name[len(prefix) : -len(".tmp")]
    return (
        candidate.parent == path.parent
        and name.startswith(prefix)
        and name.endswith(".tmp")
        and len(token) == 8
        and all(c in "0123456789abcdef" for c in token)
    )


@contextlib.contextmanager
def atomic_open(path: Path, binary: bool = False) -> Iterator[IO[Any]]:
    """A file written beside `path` (UTF-8 text, or bytes) and renamed over it when the block
    succeeds.

    A failed or interrupted write (Ctrl-C included) removes its temporary file and leaves any
    earlier `path` as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666: the umask applies
    try:
        if binary:
            with open(fd, "wb") as fh:
                yield fh
        else:
            with open(fd, "w", encoding="utf-8", newline="") as fh:
                yield fh
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: Path, blob: Any) -> None:
    """`blob` as indented JSON, written atomically."""
    with atomic_open(path) as fh:
        fh.write(json.dumps(blob, indent=2) + "\n")
