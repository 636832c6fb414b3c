"""Tests for cxr.fetch and stages/fetch.py on a fake mirror and a local HTTP server (no network)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.util
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from cxr import fetch
from cxr.fetch import FetchError, FileSpec

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "own/repo/0123abc"
FILES = {  # path -> content; the "true" bytes every digest below is computed from
    f"{PREFIX}/images/a.png": b"alpha image bytes",
    f"{PREFIX}/X-Ray Image DataSet/b c.png": b"bravo, a path with spaces",
    f"{PREFIX}/images/served.png": b"served over http",
    f"{PREFIX}/X-Ray Image DataSet/served space.png": b"served with a space",
    f"{PREFIX}/images/tampered.png": b"the real tampered bytes",
    f"{PREFIX}/images/missing.png": b"never served",
    f"{PREFIX}/cases/01.jpeg": b"case one",
}
MIRRORED = [
    f"{PREFIX}/images/a.png",
    f"{PREFIX}/X-Ray Image DataSet/b c.png",
    f"{PREFIX}/cases/01.jpeg",
]
SERVED = [f"{PREFIX}/images/served.png", f"{PREFIX}/X-Ray Image DataSet/served space.png"]
TAMPERED = f"{PREFIX}/images/tampered.png"
MISSING = f"{PREFIX}/images/missing.png"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def spec(path: str) -> FileSpec:
    return FileSpec(path=path, sha256=sha(FILES[path]), bytes=len(FILES[path]))


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root


def leftovers(root: Path) -> list[Path]:
    """Temp files a failed write might have left behind."""
    return [p for p in root.rglob("*") if p.name.endswith(".part")]


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens, so connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture
def mirror(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "mirror", {p: FILES[p] for p in MIRRORED})


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """HTTP server for SERVED files plus TAMPERED with wrong bytes; yields (base_url, raw paths)."""
    root = write_tree(tmp_path / "served", {p: FILES[p] for p in SERVED})
    write_tree(root, {TAMPERED: b"not what the sha256 says"})
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", requested
    httpd.shutdown()
    httpd.server_close()


def run(specs: list[FileSpec], dest: Path, **kwargs: object) -> dict[str, int]:
    kwargs = {"mirror": None, "timeout": 2.0, "retries": 0, "backoff": 0.01, **kwargs}
    return dict(fetch.fetch_files(specs, dest, **kwargs))


# ---- select_sources / resolve_mirror ---------------------------------------------------------


def test_select_sources_sample_full_and_bad_value() -> None:
    df = pd.DataFrame({"path": ["a", "b", "c"], "sample": ["1", "0", "1"]})
    assert fetch.select_sources(df, "sample")["path"].tolist() == ["a", "c"]
    assert fetch.select_sources(df, "full")["path"].tolist() == ["a", "b", "c"]
    with pytest.raises(ValueError) as err:
        fetch.select_sources(df, "tiny")
    assert "'tiny'" in str(err.value) and "sample" in str(err.value) and "full" in str(err.value)


def test_default_mirror_is_found_from_an_experiment_copy_deep_below(tmp_path: Path) -> None:
    mirror = tmp_path / "shared" / "cxr-mirror"
    repo = tmp_path / "main"
    exp_copy = repo / ".dvc" / "tmp" / "exps" / "tmpabc123"
    exp_copy.mkdir(parents=True)
    assert fetch.default_mirror(repo) == tmp_path / "shared" / "cxr-mirror"  # not there yet
    mirror.mkdir(parents=True)
    assert fetch.default_mirror(repo) == mirror
    assert fetch.default_mirror(exp_copy) == mirror


def test_find_mirror_searches_up_from_the_working_directory_then_the_repo(
    tmp_path: Path,
) -> None:
    cwd, repo = tmp_path / "work" / "sub", tmp_path / "checkouts" / "repo"
    cwd.mkdir(parents=True)
    repo.mkdir(parents=True)
    lookup = fetch.find_mirror({}, [cwd, repo])
    assert lookup.path is None and lookup.env_value == ""
    tried = list(lookup.tried)
    mirror = Path("shared") / "cxr-mirror"
    expected_first = [cwd / mirror, cwd.parent / mirror, tmp_path / mirror]
    assert tried[:3] == [p.resolve() for p in expected_first]
    assert (repo / mirror).resolve() in tried and (repo.parent / mirror).resolve() in tried
    assert len(tried) == len(set(tried))  # shared ancestors (tmp_path, /) are tried once
    assert tried == fetch.mirror_candidates([cwd, repo])

    beside_repo = repo.parent / mirror  # ../shared/cxr-mirror beside the checkout
    beside_repo.mkdir(parents=True)
    found = fetch.find_mirror({}, [cwd, repo])
    assert found.path == beside_repo.resolve() and found.tried[-1] == found.path
    above_cwd = cwd.parent / mirror  # the working directory's search comes first
    above_cwd.mkdir(parents=True)
    assert fetch.find_mirror({}, [cwd, repo]).path == above_cwd.resolve()

    env_dir = tmp_path / "env"
    env_dir.mkdir()
    by_env = fetch.find_mirror({"CXR_MIRROR": str(env_dir)}, [cwd, repo])
    assert by_env.path == env_dir and by_env.tried == ()
    with pytest.raises(ValueError, match="CXR_MIRROR.*not a directory"):
        fetch.find_mirror({"CXR_MIRROR": str(tmp_path / "absent")}, [cwd, repo])


def test_offline_without_mirror_names_every_place_looked_and_the_fix(tmp_path: Path) -> None:
    cwd, repo = tmp_path / "work", tmp_path / "checkouts" / "repo"
    cwd.mkdir()
    repo.mkdir(parents=True)
    lookup = fetch.find_mirror({}, [cwd, repo])
    with pytest.raises(FetchError) as err:
        run([spec(MIRRORED[0])], tmp_path / "out", base_url=closed_port_url(), lookup=lookup)
    msg = str(err.value)
    assert "network unreachable" in msg and "no local mirror was found" in msg
    assert "$CXR_MIRROR: not set" in msg
    for candidate in lookup.tried:
        assert f"  {candidate}: not there" in msg.splitlines()
    assert str(cwd.resolve() / "shared" / "cxr-mirror") in msg
    assert str(repo.resolve().parent / "shared" / "cxr-mirror") in msg
    assert "To fix, point CXR_MIRROR at a local copy" in msg
    assert "export CXR_MIRROR=" in msg and "../shared/cxr-mirror" in msg


def test_offline_with_an_incomplete_mirror_names_it(tmp_path: Path, mirror: Path) -> None:
    lookup = fetch.MirrorLookup(path=mirror, env_value=str(mirror))
    with pytest.raises(FetchError) as err:
        run([spec(MISSING)], tmp_path / "out", mirror=mirror, base_url=closed_port_url(),
            lookup=lookup)  # fmt: skip
    assert f"not in the mirror at {mirror}" in str(err.value)


def test_resolve_mirror(tmp_path: Path) -> None:
    env_dir, default = tmp_path / "env", tmp_path / "default"
    env_dir.mkdir()
    assert fetch.resolve_mirror({"CXR_MIRROR": str(env_dir)}, default) == env_dir
    assert fetch.resolve_mirror({}, default) is None
    default.mkdir()
    assert fetch.resolve_mirror({}, default) == default
    not_dir = tmp_path / "file.txt"
    not_dir.write_text("x")
    for bad in (not_dir, tmp_path / "absent"):
        with pytest.raises(ValueError, match="CXR_MIRROR.*not a directory"):
            fetch.resolve_mirror({"CXR_MIRROR": str(bad)}, default)


# ---- fetch_files -------------------------------------------------------------------------------


def test_mirror_hit_copies_and_verifies(tmp_path: Path, mirror: Path) -> None:
    counts = run([spec(p) for p in MIRRORED], tmp_path / "out", mirror=mirror)
    assert counts == {"mirror": 3, "downloaded": 0, "present": 0}
    for p in MIRRORED:
        assert (tmp_path / "out" / p).read_bytes() == FILES[p]


def test_download_hit_url_encodes_spaces(
    tmp_path: Path, mirror: Path, server: tuple[str, list[str]]
) -> None:
    base_url, requested = server
    counts = run([spec(p) for p in SERVED + MIRRORED], tmp_path / "out", mirror=mirror,
                 base_url=base_url)  # fmt: skip
    assert counts == {"mirror": 3, "downloaded": 2, "present": 0}
    for p in SERVED:
        assert (tmp_path / "out" / p).read_bytes() == FILES[p]
    assert f"/{PREFIX}/X-Ray%20Image%20DataSet/served%20space.png" in requested
    assert not any(" " in r for r in requested)


def test_existing_correct_file_is_skipped_and_wrong_one_replaced(
    tmp_path: Path, mirror: Path
) -> None:
    out = tmp_path / "out"
    good, bad = MIRRORED[0], MIRRORED[1]
    write_tree(out, {good: FILES[good], bad: b"stale half-written junk"})
    counts = run([spec(good), spec(bad)], out, mirror=mirror)
    assert counts == {"mirror": 1, "downloaded": 0, "present": 1}
    assert (out / bad).read_bytes() == FILES[bad]


def test_sha_mismatch_from_mirror_fails_and_leaves_nothing(tmp_path: Path, mirror: Path) -> None:
    path = MIRRORED[1]
    (mirror / path).write_bytes(b"corrupted mirror copy")
    out = tmp_path / "out"
    with pytest.raises(FetchError) as err:
        run([spec(path)], out, mirror=mirror)
    msg = str(err.value)
    assert "1 of 1 files" in msg and path in msg
    assert sha(FILES[path]) in msg and sha(b"corrupted mirror copy") in msg
    assert not (out / path).exists() and leftovers(out) == []


def test_sha_mismatch_from_download_fails_and_leaves_nothing(
    tmp_path: Path, server: tuple[str, list[str]]
) -> None:
    out = tmp_path / "out"
    with pytest.raises(FetchError) as err:
        run([spec(TAMPERED), spec(SERVED[0])], out, base_url=server[0])
    msg = str(err.value)
    assert "1 of 2 files" in msg and TAMPERED in msg
    assert sha(FILES[TAMPERED]) in msg and sha(b"not what the sha256 says") in msg
    assert not (out / TAMPERED).exists() and leftovers(out) == []
    assert (out / SERVED[0]).read_bytes() == FILES[SERVED[0]]  # the good one still landed


def test_404_fails_clearly_without_retrying(tmp_path: Path, server: tuple[str, list[str]]) -> None:
    base_url, requested = server
    with pytest.raises(FetchError) as err:
        run([spec(MISSING)], tmp_path / "out", base_url=base_url, retries=3, backoff=1.0)
    assert MISSING in str(err.value) and "404" in str(err.value)
    assert "network unreachable" not in str(err.value)
    assert len(requested) == 1


def test_connection_refused_gives_offline_message_and_fails_fast(tmp_path: Path) -> None:
    specs = [spec(p) for p in FILES]
    start = time.monotonic()
    with pytest.raises(FetchError) as err:
        # One worker, so the first file uses its 2 retries (0.1 + 0.2 s) and the rest fail fast;
        # without the shared offline flag this would take 7 x 0.3 s.
        run(specs, tmp_path / "out", base_url=closed_port_url(), workers=1, retries=2, backoff=0.1)
    elapsed = time.monotonic() - start
    msg = str(err.value)
    assert f"{len(FILES)} of {len(FILES)} files" in msg
    assert f"{len(FILES)} of {len(FILES)} files are not in a mirror" in msg
    assert "CXR_MIRROR" in msg and "network unreachable" in msg
    assert elapsed < 1.5
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_mode_not_mkstemps_0600(
    tmp_path: Path, mirror: Path, server: tuple[str, list[str]], umask: int, mode: int
) -> None:
    out = tmp_path / "out"
    sources = pd.DataFrame({"path": [MIRRORED[0], SERVED[0]],
                            "sha256": [sha(FILES[MIRRORED[0]]), sha(FILES[SERVED[0]])]})  # fmt: skip
    cases = pd.DataFrame({"path": [MIRRORED[2]], "sha256": [sha(FILES[MIRRORED[2]])]})
    old = os.umask(umask)
    try:
        counts = fetch.fetch_dataset(
            sources, cases, out, mirror=mirror, base_url=server[0], workers=2, retries=0
        )
    finally:
        os.umask(old)
    assert counts["mirror"] == 2 and counts["downloaded"] == 1
    written = [out / "manifest.csv", out / "cases.csv"]
    written += [out / fetch.IMAGES_DIR / p for p in (MIRRORED[0], SERVED[0], MIRRORED[2])]
    for path in written:
        assert path.stat().st_mode & 0o777 == mode, f"{path}: {oct(path.stat().st_mode & 0o777)}"


def test_current_umask_reads_without_changing_it() -> None:
    old = os.umask(0o027)
    try:
        assert fetch.current_umask() == 0o027
        assert fetch.file_mode() == 0o640
        assert os.umask(0o027) == 0o027  # unchanged by the reads
    finally:
        os.umask(old)


def test_unsafe_path_is_rejected() -> None:
    with pytest.raises(ValueError, match="unsafe"):
        fetch.image_relpath("own/repo/../../etc/passwd")


# ---- stages/fetch.py -----------------------------------------------------------------------


@pytest.fixture
def stage():
    spec_ = importlib.util.spec_from_file_location("stage_fetch", ROOT / "stages" / "fetch.py")
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module


def write_inputs(tmp_path: Path, dataset: str = "sample") -> list[str]:
    """sources.csv (a.png in the sample, b c.png not), cases.csv and params.yaml; returns argv."""
    rows = [(MIRRORED[0], 1), (MIRRORED[1], 0)]
    sources = pd.DataFrame({
        "path": [p for p, _ in rows],
        "sha256": [sha(FILES[p]) for p, _ in rows],
        "bytes": [len(FILES[p]) for p, _ in rows],
        "label": ["covid", "normal"],
        "sample": [s for _, s in rows],
    })  # fmt: skip
    case = MIRRORED[2]
    cases = pd.DataFrame({"case": ["case01"], "path": [case], "sha256": [sha(FILES[case])],
                          "bytes": [len(FILES[case])], "zones": ["R-lower;L-lower"]})  # fmt: skip
    sources.to_csv(tmp_path / "sources.csv", index=False)
    cases.to_csv(tmp_path / "cases.csv", index=False)
    (tmp_path / "params.yaml").write_text(f"fetch:\n  dataset: {dataset}\n")
    return ["--sources", str(tmp_path / "sources.csv"), "--cases", str(tmp_path / "cases.csv"),
            "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "raw")]  # fmt: skip


def test_stage_end_to_end_on_mirror(
    tmp_path: Path, mirror: Path, stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_MIRROR", str(mirror))
    monkeypatch.setenv("CXR_BASE_URL", closed_port_url())
    stage.main(write_inputs(tmp_path, "sample"))
    raw = tmp_path / "raw"
    manifest = pd.read_csv(raw / "manifest.csv")
    assert manifest["path"].tolist() == [MIRRORED[0]]
    assert list(manifest.columns) == ["path", "sha256", "bytes", "label", "sample", "file"]
    cases = pd.read_csv(raw / "cases.csv")
    assert cases["zones"].tolist() == ["R-lower;L-lower"]
    for table in (manifest, cases):
        for rel, digest in zip(table["file"], table["sha256"], strict=True):
            assert rel.startswith("images/")
            assert fetch.sha256_file(raw / rel) == digest
    assert not (raw / "images" / MIRRORED[1]).exists()  # not in the sample

    stage.main(write_inputs(tmp_path, "full"))
    assert len(pd.read_csv(raw / "manifest.csv")) == 2


def test_stage_offline_without_mirror_exits_1_with_one_error_line(
    tmp_path: Path, stage, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CXR_MIRROR", raising=False)
    monkeypatch.setattr(stage, "REPO_ROOT", tmp_path / "repo")  # no ../shared/cxr-mirror there
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # nor above the working directory
    monkeypatch.setenv("CXR_BASE_URL", closed_port_url())
    argv = write_inputs(tmp_path) + ["--retries", "0", "--timeout", "2"]
    with pytest.raises(SystemExit) as exit_:
        stage.main(argv)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "2 of 2 files" in error_lines[0]
    assert "point CXR_MIRROR at a local copy" in err and "$CXR_MIRROR: not set" in err
    # every place looked: from the working directory up, then from the repository up
    for start in (tmp_path / "work", tmp_path / "repo", tmp_path):
        assert f"  {start.resolve() / 'shared' / 'cxr-mirror'}: not there" in err.splitlines()
    assert not (tmp_path / "raw" / "manifest.csv").exists()


def test_stage_finds_the_mirror_above_the_working_directory(
    tmp_path: Path, mirror: Path, stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = tmp_path / "a" / "shared" / "cxr-mirror"
    found.parent.mkdir(parents=True)
    mirror.rename(found)
    (tmp_path / "a" / "work").mkdir()
    monkeypatch.delenv("CXR_MIRROR", raising=False)
    monkeypatch.setattr(stage, "REPO_ROOT", tmp_path / "b" / "repo")  # none above the repo
    monkeypatch.chdir(tmp_path / "a" / "work")
    monkeypatch.setenv("CXR_BASE_URL", closed_port_url())
    stage.main(write_inputs(tmp_path, "full"))
    assert len(pd.read_csv(tmp_path / "raw" / "manifest.csv")) == 2


def test_stage_missing_param_and_bad_dataset(
    tmp_path: Path, stage, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = write_inputs(tmp_path)
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 1\n")
    with pytest.raises(SystemExit):
        stage.main(argv)
    err = capsys.readouterr().err
    assert err.startswith("error:") and "fetch.dataset" in err and "params.yaml" in err
    (tmp_path / "params.yaml").write_text("fetch:\n  dataset: huge\n")
    with pytest.raises(SystemExit):
        stage.main(argv)
    assert "'huge'" in capsys.readouterr().err


def test_partial_files_of_a_killed_run_are_removed(tmp_path: Path, mirror: Path) -> None:
    """SIGKILL skips cleanup; the next run must not leave that junk in the DVC output."""
    out = tmp_path / "out"
    stale = out / fetch.IMAGES_DIR / "some" / ".file.png.abc123.part"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    sources = pd.DataFrame({"path": [MIRRORED[0]], "sha256": [sha(FILES[MIRRORED[0]])]})
    cases = pd.DataFrame({"path": [MIRRORED[1]], "sha256": [sha(FILES[MIRRORED[1]])]})
    fetch.fetch_dataset(sources, cases, out, mirror=mirror, workers=1)
    assert not stale.exists()
    assert (out / "manifest.csv").exists() and (out / "cases.csv").exists()


# ---- retries (urllib3's Retry) -------------------------------------------------------------


@pytest.fixture
def flaky() -> Iterator[tuple[str, list[str], list[str]]]:
    """HTTP server that answers each GET of SERVED[0] from a script of 'ok', '503' (with
    Retry-After: 2), '503-forever' or 'drop' (headers promise more bytes than are sent);
    yields (base_url, the script to fill, the monotonic times of the requests)."""
    script: list[str] = []
    requested: list[float] = []
    body = FILES[SERVED[0]]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            requested.append(time.monotonic())
            step = script.pop(0) if len(script) > 1 else script[0]
            if step.startswith("503"):
                self.send_response(503)
                self.send_header("Retry-After", "2")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body if step == "ok" else body[:5])
            if step == "drop":
                self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", script, requested
    httpd.shutdown()
    httpd.server_close()


def test_a_503_with_retry_after_is_waited_out_then_the_file_lands(tmp_path: Path, flaky) -> None:
    """Watched red with respect_retry_after_header=False (the retry came at once, not after 2 s)
    and with status_forcelist left out (the 503 was final)."""
    base_url, script, requested = flaky
    script += ["503", "ok"]
    counts = run([spec(SERVED[0])], tmp_path / "out", base_url=base_url, retries=2, backoff=0.01)
    assert counts["downloaded"] == 1 and len(requested) == 2
    # the server's Retry-After: 2, not urllib3's first backoff (0 s); timed by the server, so a
    # slow, loaded test machine cannot pass it without the wait
    assert requested[1] - requested[0] >= 1.9
    assert (tmp_path / "out" / SERVED[0]).read_bytes() == FILES[SERVED[0]]


def test_a_connection_dropped_mid_body_is_retried(tmp_path: Path, flaky) -> None:
    """Watched red with read=0 in the Retry (the short body was an error at once)."""
    base_url, script, requested = flaky
    script += ["drop", "ok"]
    counts = run([spec(SERVED[0])], tmp_path / "out", base_url=base_url, retries=1)
    assert counts["downloaded"] == 1 and len(requested) == 2
    assert (tmp_path / "out" / SERVED[0]).read_bytes() == FILES[SERVED[0]]


@pytest.mark.parametrize("step", ["503-forever", "drop"])
def test_retries_exhausted_is_one_clear_line_per_file(tmp_path: Path, flaky, step: str) -> None:
    """Watched red with raise_on_status left True (a MaxRetryError traceback-like message
    naming ResponseError, not the HTTP status) for 503-forever."""
    base_url, script, requested = flaky
    script.append(step)
    with pytest.raises(FetchError) as err:
        run([spec(SERVED[0])], tmp_path / "out", base_url=base_url, retries=1, backoff=0.01)
    assert len(requested) == 2  # the try and its one retry
    line = next(x for x in str(err.value).splitlines() if SERVED[0] in x)
    assert "retries exhausted" in line and "network unreachable" not in line
    assert ("HTTP 503 Service Unavailable" in line) == (step == "503-forever")
    assert leftovers(tmp_path / "out") == []


def test_the_suite_finds_the_mirror_where_the_pipeline_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/conftest.py's mirror is cxr.fetch's: `shared/cxr-mirror` in any folder above the
    checkout, not only beside it (a clone in /work/x/repo runs `dvc repro` from /work/shared, so
    its tests must find the same mirror, or CI=true fails them). Watched red with conftest's
    earlier `REPO.parent / "shared" / "cxr-mirror"`."""
    from tests import conftest

    mirror = tmp_path / "shared" / "cxr-mirror"
    mirror.mkdir(parents=True)
    (mirror / "sources.csv").write_text("path\n")
    monkeypatch.delenv("CXR_MIRROR", raising=False)
    monkeypatch.setattr(conftest, "REPO", tmp_path / "x" / "repo")  # two levels below
    assert conftest.mirror_path() == mirror
    monkeypatch.setenv("CXR_MIRROR", str(tmp_path / "nowhere"))  # set, but not a folder
    assert conftest.mirror_path() is None
