"""A resident predict: `python -m cxr serve` loads the models once and answers
`python -m cxr predict --server ...` calls over a Unix socket.

    python -m cxr serve [--socket PATH] [--models DIR] [--threads N]      # leave it running
    python -m cxr predict --server scans/ --out predictions.csv         # any number of times

A plain `python -m cxr predict` pays for importing torch (about 2 s on a 2-core machine) and
for loading the checkpoints on every call; a one-film call is mostly that
(docs/performance.md "predict's speed"). The client side of --server imports neither: it sends
its command line and working directory, and the server runs predict's own code (cxr.predict.run)
on them, in that directory, with the models it already holds. Rows, --out, the table, the
summary and the exit status are predict's; the output comes back as it is written.

One request at a time (the models use every core; more wait their turn). The server keeps the
models of its last request loaded and loads again only when a request names other checkpoints,
or when a checkpoint file changed on disk (the bundle, a site calibration and --threshold are
read on every request, as predict does). The socket is created readable by its owner only, and
lives in the user's runtime folder by default: only the user who started the server can use it,
and it reads and writes files as that user. Ctrl-C on a client leaves the request running to
the end on the server, so --out is still written; Ctrl-C or SIGTERM on the server stops it and
removes the socket.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cxr.predict_options import add_server_options

if TYPE_CHECKING:  # torch and the models: the server's only, never imported by ask()
    from cxr.loading import Models

PROTOCOL = "cxr-serve/1"
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


# --- the client: no torch here ----------------------------------------------------------------


def ask(argv: list[str], path: Path, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Send predict's `argv` to the server at `path`, echo what it prints, and return its exit
    status (2 when there is no server)."""
    out, err = out or sys.stdout, err or sys.stderr
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError as exc:
        conn.close()
        print(
            f"error: no cxr server at {path} ({exc.strerror or exc}); start one with "
            f"`python -m cxr serve` (same --socket), or leave out --server",
            file=err,
        )
        return EXIT_USAGE
    request = {"protocol": PROTOCOL, "argv": argv, "cwd": os.getcwd()}
    try:
        with conn, conn.makefile("rwb") as stream:
            stream.write(json.dumps(request).encode() + b"\n")
            stream.flush()
            return relay(stream, out, err)
    except KeyboardInterrupt:
        print(
            "error: interrupted; the server finishes this request (and writes --out, if given) "
            "without showing it here",
            file=err,
        )
        return EXIT_INTERRUPTED


def relay(stream: IO[bytes], out: IO[str], err: IO[str]) -> int:
    """Print the server's messages as they come; return the exit status it ends with."""
    for line in stream:
        message = json.loads(line)
        if "exit" in message:
            return int(message["exit"])
        target = out if message.get("stream") == "stdout" else err
        target.write(message["text"])
        target.flush()
    print("error: the server closed the connection before finishing (see its log)", file=err)
    return 1


# --- the server -------------------------------------------------------------------------------


class Reply:
    """A text stream that sends each write to the client as one message. Once the client has
    gone (Ctrl-C), writes are dropped, so the request still runs to the end and writes --out."""

    def __init__(self, stream: IO[bytes], name: str) -> None:
        self.stream, self.name = stream, name

    def send(self, message: dict[str, Any]) -> None:
        if self.stream.closed:
            return
        try:
            self.stream.write(json.dumps(message).encode() + b"\n")
            self.stream.flush()
        except OSError:  # the client went away
            with contextlib.suppress(OSError):
                self.stream.close()

    def write(self, text: str) -> int:
        if text:
            self.send({"stream": self.name, "text": text})
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class ModelCache:
    """load_models with the last models kept: the same checkpoint files, unchanged on disk
    (size and modification time), are not loaded again. For an ensemble manifest that is the
    manifest's own file: restart the server after replacing a member checkpoint in place."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.models: Models | None = None

    @staticmethod
    def identity(*paths: Path | None) -> tuple[Any, ...]:
        def one(path: Path | None) -> Any:
            if path is None or not Path(path).exists():
                return (str(path), None)
            st = Path(path).stat()
            return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)

        return tuple(one(p) for p in paths)

    def load(self, four_class: Path, binary: Path, segmenter: Path | None = None) -> Models:
        from cxr.loading import load_models

        key = self.identity(four_class, binary, segmenter)
        if self.models is None or key != self.key:
            self.models, self.key = None, None  # a failed load leaves nothing stale behind
            self.models = load_models(four_class, binary, segmenter)
            self.key = key
        return self.models


def answer(stream: IO[bytes], cache: ModelCache) -> None:
    """Run one request: predict's own code on the client's command line, in its directory."""
    out, err = Reply(stream, "stdout"), Reply(stream, "stderr")
    code: int = 1
    try:
        request = json.loads(stream.readline() or b"null")
        if not isinstance(request, dict) or request.get("protocol") != PROTOCOL:
            raise ValueError(f"not a {PROTOCOL} request")
        with (
            contextlib.redirect_stdout(out),  # type: ignore[type-var]
            contextlib.redirect_stderr(err),  # type: ignore[type-var]
            contextlib.chdir(request["cwd"]),
        ):
            code = run_predict(list(request["argv"]), cache)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        err.write(f"error: bad request: {exc}\n")
        code = EXIT_USAGE
    out.send({"exit": code})


def run_predict(argv: list[str], cache: ModelCache) -> int:
    """predict.run's exit status; a crash is reported to the client and the server goes on."""
    from cxr.predict import run
    from cxr.predict_options import parse_args

    try:
        run(parse_args(argv), cache.load)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception:  # a bug: its traceback goes to the client, the server stays up
        traceback.print_exc()
        return 1
    return 0


def bind(path: Path) -> socket.socket:
    """A listening socket at `path`, readable by its owner only. A socket file left by a server
    that died is replaced; one that answers means a server is running there already."""
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: nobody listens
        else:
            probe.close()
            raise SystemExit(f"error: a cxr server is already running at {path}")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    server.listen()
    return server


@contextlib.contextmanager
def listening(path: Path) -> Iterator[socket.socket]:
    """bind(path) for the life of the block; the socket file is removed at the end, also on
    Ctrl-C or SIGTERM."""
    server = bind(path)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        yield server
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from cxr.bundle import default_models_dir
    from cxr.params import non_negative_int

    parser = argparse.ArgumentParser(prog="python -m cxr serve", description=__doc__.split("\n")[0])
    add_server_options(parser)
    parser.add_argument(
        "--models", type=Path, default=default_models_dir(),
        help="bundle folder whose models are loaded at start (requests may name others)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=non_negative_int, default=0, help="torch CPU threads (0 = one per core)"
    )
    return parser.parse_args(argv)


def preload(models_dir: Path, cache: ModelCache) -> None:
    """The bundle's models, loaded before the first request (a broken bundle fails here, at
    start, not on a user's first call)."""
    from cxr.loading import Given, resolve

    resolved = resolve(Given(models=models_dir))
    cache.load(resolved.four_class, resolved.binary, resolved.segmenter)


def main(argv: list[str] | None = None) -> None:
    from cxr.cli import setup_logging, user_errors
    from cxr.infer import configure_cpu

    args = parse_args(argv)
    setup_logging()  # before any request redirects stderr: the log stays on the server's
    configure_cpu(args.threads)
    cache = ModelCache()
    with user_errors():
        preload(args.models, cache)
    try:
        serve(args, cache)
    except KeyboardInterrupt:
        print("cxr serve: stopped (Ctrl-C)", file=sys.stderr)


def serve(args: argparse.Namespace, cache: ModelCache) -> None:
    """Answer requests one after another until stopped."""
    with listening(args.socket) as server:
        print(f"cxr serve: models of {args.models} loaded; listening on {args.socket}", flush=True)
        while True:
            conn, _ = server.accept()
            with conn, conn.makefile("rwb") as stream:
                answer(stream, cache)
