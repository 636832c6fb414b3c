"""Fetch the chest X-ray images named in sources.csv / cases.csv, verified by sha256.

(Over 400 lines: finding the mirror, downloading with retries and writing verified files
atomically are one guarantee, "a file in place has the expected bytes"; the helpers are private
and each short.)

Each file is taken from a local mirror (a folder laid out like raw.githubusercontent.com) when it
is there, and downloaded otherwise. Either way the bytes are hashed while they are written to a temp
file beside the destination, and only a file with the expected digest is moved into place, so an
interrupted or failed run never leaves a half-written or wrong image behind, and a re-run skips
the files that are already correct. Files get the mode the user's umask gives (0644 under umask
022), not mkstemp's private 0600.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import pandas as pd
import urllib3
from tqdm import tqdm
from urllib3.exceptions import ConnectTimeoutError, HTTPError, MaxRetryError, NewConnectionError
from urllib3.util import Retry

from cxr.errors import FetchError, InputError

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/"
DATASETS = ("sample", "full")
IMAGES_DIR = "images"
MANIFEST_NAME = "manifest.csv"
CASES_NAME = "cases.csv"
CHUNK_SIZE = 1 << 20
MAX_LISTED_FAILURES = 5
MIRROR_ENV = "CXR_MIRROR"
MIRROR_SUBPATH = Path("shared") / "cxr-mirror"
# Origins reported per file, in the order they are logged.
ORIGINS = ("mirror", "downloaded", "present")
# A busy or briefly broken server is worth another try; any other 4xx is final.
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_REDIRECTS = 5
RETRY_AFTER_MAX = 300  # seconds; a longer Retry-After is cut to this, not waited out


class _FileError(Exception):
    """A single file failed; `offline` marks network-unreachable failures for the summary."""

    def __init__(self, reason: str, *, offline: bool = False) -> None:
        super().__init__(reason)
        self.offline = offline


@dataclass(frozen=True)
class FileSpec:
    """One file to fetch: its URL tail / mirror path, and the digest and size it must have."""

    path: str
    sha256: str
    bytes: int | None = None


@dataclass
class _Context:
    """What every worker shares: where to look, how hard to try, and the offline flag."""

    mirror: Path | None
    base_url: str
    http: urllib3.PoolManager  # thread-safe; its Retry does every download's retrying
    offline: threading.Event
    cancel: threading.Event
    mode: int = 0o644  # permission bits of each written file (file_mode(), read before the workers)


@dataclass(frozen=True)
class MirrorLookup:
    """Where the mirror was looked for and what was found, so an offline failure can say so."""

    path: Path | None
    env_value: str = ""  # $CXR_MIRROR as set; "" = unset
    tried: tuple[Path, ...] = ()  # candidate folders that were checked, nearest first

    def describe(self) -> str:
        """The places looked, one per line, for the offline error."""
        if self.env_value:
            return f"  ${MIRROR_ENV}={self.env_value!r}"
        lines = [f"  ${MIRROR_ENV}: not set"]
        lines += [
            f"  {folder}: {'found' if folder == self.path else 'not there'}"
            for folder in self.tried
        ]
        return "\n".join(lines)


def select_sources(df: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Rows of sources.csv for `dataset`: "sample" (the small default subset) or "full"."""
    if dataset == "full":
        return df.reset_index(drop=True)
    if dataset == "sample":
        keep = pd.to_numeric(df["sample"], errors="coerce") == 1
        return df[keep].reset_index(drop=True)
    raise InputError(f"fetch.dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")


def _env_mirror(env: Mapping[str, str]) -> Path | None:
    """$CXR_MIRROR as a folder, None when unset; set but not a folder is an error, not a silent
    fall-back to a long download."""
    value = env.get(MIRROR_ENV, "")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise InputError(
            f"{MIRROR_ENV}={value!r} is not a directory; point it at the cxr-mirror folder "
            "(see its README) or unset it to download"
        )
    return path


def resolve_mirror(env: Mapping[str, str], default: Path) -> Path | None:
    """The mirror folder: $CXR_MIRROR if set, else `default` if it exists, else None (download)."""
    path = _env_mirror(env)
    if path is not None:
        return path
    return default if default.is_dir() else None


def mirror_candidates(starts: Iterable[Path]) -> list[Path]:
    """`shared/cxr-mirror` in each start folder and every folder above it, nearest first, each
    once: `../shared/cxr-mirror` beside a checkout, and still found from the temporary copies
    that `dvc exp run --queue` / `--temp` run in (`.dvc/tmp/exps/...`), several levels down."""
    seen: dict[Path, None] = {}
    for start in starts:
        resolved = start.resolve()
        for folder in (resolved, *resolved.parents):
            seen.setdefault(folder / MIRROR_SUBPATH, None)
    return list(seen)


def default_mirror(start: Path) -> Path:
    """The nearest existing candidate above `start` (see mirror_candidates); the path beside
    `start` (`../shared/cxr-mirror`) when none exists."""
    for candidate in mirror_candidates([start]):
        if candidate.is_dir():
            return candidate
    return start.resolve().parent / MIRROR_SUBPATH


def search_starts(repo_root: Path) -> list[Path]:
    """Where the search for the mirror starts: the working directory, then the repository."""
    try:
        cwd = [Path.cwd()]
    except OSError:  # the working directory was deleted
        cwd = []
    return [*cwd, repo_root]


def find_mirror(env: Mapping[str, str], starts: Sequence[Path]) -> MirrorLookup:
    """$CXR_MIRROR if set (it must exist), else the first existing of mirror_candidates(starts),
    else no mirror; the result also records every place looked, for the offline error."""
    value = env.get(MIRROR_ENV, "")
    if value:
        return MirrorLookup(path=_env_mirror(env), env_value=value)
    tried: list[Path] = []
    for candidate in mirror_candidates(starts):
        tried.append(candidate)
        if candidate.is_dir():
            return MirrorLookup(path=candidate, tried=tuple(tried))
    return MirrorLookup(path=None, tried=tuple(tried))


def current_umask() -> int:
    """The process umask. Read from /proc where there is one, without changing it: fetch threads
    create files meanwhile. Elsewhere set (to the strict 077) and restore at once."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permission bits of a file created now under the user's umask (0o644 under 022)."""
    return 0o666 & ~current_umask()


def resolve_base_url(env: Mapping[str, str]) -> str:
    """The download base URL: $CXR_BASE_URL or raw.githubusercontent.com, ending in '/'."""
    url = env.get("CXR_BASE_URL", "") or DEFAULT_BASE_URL
    return url if url.endswith("/") else url + "/"


def read_table(path: Path, required: Iterable[str] = ("path", "sha256")) -> pd.DataFrame:
    """Read a sources/cases CSV as text, so the manifest copies every value unchanged."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{path} lacks column(s) {', '.join(missing)}; is it the right CSV?")
    return df


def file_specs(df: pd.DataFrame) -> list[FileSpec]:
    """FileSpecs for the rows of a sources/cases table."""
    sizes = df["bytes"] if "bytes" in df.columns else [None] * len(df)
    return [
        FileSpec(path=str(p), sha256=str(h).lower(), bytes=int(b) if b not in (None, "") else None)
        for p, h, b in zip(df["path"], df["sha256"], sizes, strict=True)
    ]


def image_relpath(path: str) -> str:
    """Where a file lands relative to the output dir; keeps the URL layout so names never clash."""
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or any(p in ("..", ".") for p in parts):
        raise InputError(f"unsafe file path {path!r} in the sources table")
    return f"{IMAGES_DIR}/{path}"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large files need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_files(
    specs: Iterable[FileSpec],
    dest_dir: Path,
    *,
    mirror: Path | None,
    base_url: str = DEFAULT_BASE_URL,
    workers: int = 8,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
    lookup: MirrorLookup | None = None,
) -> Counter[str]:
    """Fetch every spec to `dest_dir/<path>`; return counts by origin (mirror/downloaded/present).

    Raises FetchError listing the failures after trying every file, so one bad file does not hide
    the others. `lookup` (from find_mirror) lets an offline failure name where the mirror was
    looked for.
    """
    unique = list({s.path: s for s in specs}.values())
    ctx = _Context(
        mirror=mirror,
        base_url=base_url,
        http=http_pool(timeout=timeout, retries=retries, backoff=backoff, workers=workers),
        offline=threading.Event(),
        cancel=threading.Event(),
        mode=file_mode(),  # here, before the workers start creating files
    )
    counts: Counter[str] = Counter({o: 0 for o in ORIGINS})
    failures: list[tuple[str, _FileError]] = []
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fetch")
    try:
        futures = {pool.submit(_fetch_one, s, dest_dir / s.path, ctx): s for s in unique}
        for future in tqdm(as_completed(futures), total=len(futures), unit="file", desc="fetch"):
            spec = futures[future]
            try:
                origin = future.result()
            except _FileError as exc:
                log.debug("failed %s: %s", spec.path, exc)
                failures.append((spec.path, exc))
            else:
                counts[origin] += 1
    except BaseException:
        # Ctrl-C: stop the workers between chunks so they delete their temp files and exit.
        ctx.cancel.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        raise FetchError(_failure_message(failures, len(unique), lookup))
    return counts


def fetch_dataset(
    sources: pd.DataFrame,
    cases: pd.DataFrame,
    out: Path,
    *,
    mirror: Path | None,
    base_url: str = DEFAULT_BASE_URL,
    workers: int = 8,
    timeout: float = 30.0,
    retries: int = 3,
    lookup: MirrorLookup | None = None,
) -> Counter[str]:
    """Fetch the selected sources and all cases into `out/images`, then write both manifests.

    The manifests are removed first and written last, so their presence means the images they list
    are all there and verified.
    """
    sources, cases = _with_file_column(sources), _with_file_column(cases)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(out / IMAGES_DIR)
    for name in (MANIFEST_NAME, CASES_NAME):
        (out / name).unlink(missing_ok=True)
    counts = fetch_files(
        file_specs(sources) + file_specs(cases),
        out / IMAGES_DIR,
        mirror=mirror,
        base_url=base_url,
        workers=workers,
        timeout=timeout,
        retries=retries,
        lookup=lookup,
    )
    write_csv_atomic(sources, out / MANIFEST_NAME)
    write_csv_atomic(cases, out / CASES_NAME)
    return counts


def remove_stale_parts(folder: Path) -> int:
    """Delete temp files a killed run left behind (SIGKILL skips cleanup), so they never end up
    in the output; returns how many."""
    stale = list(folder.rglob(".*.part")) if folder.exists() else []
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d partial file(s) left by an interrupted run", len(stale))
    return len(stale)


def write_csv_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write a CSV via a temp file and os.replace, so readers never see a partial manifest."""
    data = df.to_csv(index=False).encode("utf-8")
    _write_atomic(path, lambda fh: fh.write(data), mode=file_mode())


def _with_file_column(df: pd.DataFrame) -> pd.DataFrame:
    """Copy of `df` with `file`: the image path relative to the output dir."""
    return df.assign(file=[image_relpath(p) for p in df["path"]])


def _fetch_one(spec: FileSpec, dest: Path, ctx: _Context) -> str:
    """Make `dest` a verified copy of `spec`; return where it came from."""
    try:
        return _fetch_or_skip(spec, dest, ctx)
    except OSError as exc:  # disk full, permissions, odd request errors: report with the others
        raise _FileError(f"{type(exc).__name__}: {exc}") from exc


def _fetch_or_skip(spec: FileSpec, dest: Path, ctx: _Context) -> str:
    """Skip a correct existing file, else copy from the mirror, else download."""
    if dest.is_file() and sha256_file(dest) == spec.sha256:
        return "present"
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = ctx.mirror / spec.path if ctx.mirror is not None else None
    if source is not None and source.is_file():
        with open(source, "rb") as src:
            _write_verified(
                dest, spec, lambda fh: _copy_stream(src, fh, ctx), where=str(source), mode=ctx.mode
            )
        return "mirror"
    _download(spec, dest, ctx)
    return "downloaded"


def http_pool(*, timeout: float, retries: int, backoff: float, workers: int) -> urllib3.PoolManager:
    """Connections for the downloads, with urllib3's Retry in place of a hand-written loop.

    Each of connection errors, read errors (a connection dropped mid-body included: the body is
    read inside the request, so Retry sees it) and RETRY_STATUS responses gets `retries` more
    tries, waiting a server's Retry-After (429, 503) or else 0, 2, 4, ... x `backoff` seconds.
    """
    retry = Retry(
        total=None,  # counted per kind below, so following a redirect uses up no retry
        connect=retries,
        read=retries,
        status=retries,
        other=retries,
        redirect=MAX_REDIRECTS,
        allowed_methods={"GET"},
        status_forcelist=RETRY_STATUS,
        backoff_factor=backoff,
        respect_retry_after_header=True,
        retry_after_max=RETRY_AFTER_MAX,
        raise_on_status=False,  # the last response comes back, and _get names its status
    )
    return urllib3.PoolManager(maxsize=max(1, workers), retries=retry, timeout=timeout)


def _download(spec: FileSpec, dest: Path, ctx: _Context) -> None:
    """Download (retried by ctx.http's Retry) into a verified file; fail fast once the network
    is known down."""
    if ctx.offline.is_set():
        raise _FileError("network unreachable (skipped after earlier failures)", offline=True)
    url = ctx.base_url + urllib.parse.quote(spec.path)
    try:
        _write_verified(dest, spec, lambda fh: _get(url, fh, ctx), where=url, mode=ctx.mode)
    except MaxRetryError as exc:
        offline = isinstance(exc.reason, NewConnectionError | ConnectTimeoutError)
        if offline:
            ctx.offline.set()
        reason = _short(exc.reason or exc)
        reason = f"network unreachable ({reason})" if offline else f"{reason}, retries exhausted"
        raise _FileError(f"{reason} from {ctx.base_url}", offline=offline) from exc
    except HTTPError as exc:
        raise _FileError(f"{_short(exc)} from {ctx.base_url}") from exc


def _short(exc: Exception) -> str:
    """The useful part of a urllib3 error ('[Errno 111] Connection refused'), not 5 lines."""
    match = re.search(r"\[Errno [-\d]+\] [^)'\]\"]+", str(exc))
    if match:
        return match.group(0)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _get(url: str, fh: BinaryIO, ctx: _Context) -> str:
    """One GET (with its retries) into `fh`; a status still bad after the retries is an error."""
    resp = ctx.http.request("GET", url)
    if resp.status in RETRY_STATUS:
        raise _FileError(f"HTTP {resp.status} {resp.reason} for {url}, retries exhausted")
    if resp.status != 200:
        raise _FileError(f"HTTP {resp.status} {resp.reason} for {url}")
    data = memoryview(resp.data)
    return _hash_chunks(
        (data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)), fh, ctx
    )


def _copy_stream(src: BinaryIO, fh: BinaryIO, ctx: _Context) -> str:
    """Copy a local file into `fh`, hashing the same bytes."""
    return _hash_chunks(iter(lambda: src.read(CHUNK_SIZE), b""), fh, ctx)


def _hash_chunks(chunks: Iterable[bytes], fh: BinaryIO, ctx: _Context) -> str:
    """Write chunks to `fh` and hash them in one pass; stop promptly on Ctrl-C."""
    digest = hashlib.sha256()
    for chunk in chunks:
        if ctx.cancel.is_set():
            raise _FileError("cancelled")
        digest.update(chunk)
        fh.write(chunk)
    return digest.hexdigest()


def _write_verified(
    dest: Path, spec: FileSpec, fill: Callable[[BinaryIO], str], *, where: str, mode: int
) -> None:
    """Fill a temp file, check its sha256 against `spec`, and only then move it onto `dest`."""

    def fill_and_check(fh: BinaryIO) -> None:
        actual = fill(fh)
        if actual != spec.sha256:
            size = fh.tell()
            expected_size = f" ({spec.bytes} bytes)" if spec.bytes is not None else ""
            raise _FileError(
                f"sha256 mismatch for {spec.path} from {where}: expected {spec.sha256}"
                f"{expected_size}, got {actual} ({size} bytes)"
            )

    _write_atomic(dest, fill_and_check, mode=mode)


def _write_atomic(dest: Path, fill: Callable[[BinaryIO], object], *, mode: int) -> None:
    """Run `fill` on a temp file next to `dest`, give it `mode`, then os.replace; delete the temp
    on any failure. mkstemp makes the temp 0600 whatever the umask, hence the chmod."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _failure_message(
    failures: list[tuple[str, _FileError]], total: int, lookup: MirrorLookup | None = None
) -> str:
    """One message for all failures: how many, the first few with reasons, and what to do."""
    failures = sorted(failures, key=lambda f: f[0])
    lines = [f"{len(failures)} of {total} files could not be fetched and verified:"]
    lines += [f"  {path}: {exc}" for path, exc in failures[:MAX_LISTED_FAILURES]]
    if len(failures) > MAX_LISTED_FAILURES:
        lines.append(f"  ... and {len(failures) - MAX_LISTED_FAILURES} more")
    offline = sum(exc.offline for _, exc in failures)
    if not offline:
        return "\n".join(lines)
    if lookup is None:
        lines.append(
            f"{offline} of {total} files are not in a mirror and could not be downloaded "
            f"(network unreachable). Point {MIRROR_ENV} at a local copy of the mirror (see README) "
            "or check your connection."
        )
    elif lookup.path is not None:
        lines.append(
            f"{offline} of {total} files are not in the mirror at {lookup.path} and could not be "
            f"downloaded (network unreachable). The mirror looks incomplete: point {MIRROR_ENV} "
            "at a complete copy (see README) or check your connection."
        )
    else:
        lines += [
            f"{offline} of {total} files could not be downloaded (network unreachable), and no "
            "local mirror was found. Looked for it in:",
            lookup.describe(),
            f"To fix, point {MIRROR_ENV} at a local copy of the mirror "
            f"(export {MIRROR_ENV}=/path/to/cxr-mirror; see README), or put the mirror at "
            f"../{MIRROR_SUBPATH.as_posix()} beside the repository, or restore the network "
            "connection; then re-run.",
        ]
    return "\n".join(lines)
