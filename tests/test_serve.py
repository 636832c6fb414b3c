"""Tests for cxr.serve: a resident predict server and `predict --server`, on tiny checkpoints."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from cxr import serve
from tests.test_predict import args, make_models, radiograph, run, save

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("served")
    return make_models(d) | {"segmenter": d / "no-segmenter.pt"}


@pytest.fixture(scope="module")
def server(models: dict[str, Path]) -> Iterator[Path]:
    """`python -m cxr serve` in its own process on a short socket path (a Unix socket's path is
    limited to ~107 bytes); stopped with SIGTERM at the end, which must remove the socket."""
    folder = Path(tempfile.mkdtemp(prefix="cxrs"))
    sock, log = folder / "s.sock", folder / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cxr", "serve", "--socket", str(sock), "--models",
             str(models["models"]), "--threads", "1"],
            stdout=fh, stderr=subprocess.STDOUT, env=ENV, cwd=folder,
        )  # fmt: skip
    deadline = time.monotonic() + 180
    while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sock.exists(), log.read_text()
    assert sock.stat().st_mode & 0o777 == 0o600  # the owner's only
    yield sock
    proc.terminate()
    proc.wait(timeout=60)
    assert not sock.exists(), "SIGTERM left the socket behind"
    shutil.rmtree(folder)


def films(folder: Path) -> Path:
    for seed in range(3):
        save(Image.fromarray(radiograph(size=48 + 8 * seed, seed=seed)), folder / f"f{seed}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder


def ask(argv: list[str], sock: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = serve.ask(argv, sock, out, err)
    return code, out.getvalue(), err.getvalue()


def test_the_server_gives_predicts_rows_table_and_status(
    server: Path, models: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Relative paths resolve in the client's directory; --out, the table, the summary and the
    exit status (1: one unreadable file) are those of predict run here."""
    films(tmp_path / "films")
    monkeypatch.chdir(tmp_path)
    code, out, err = ask(["--server", *args(models, "films", "--out", "served.csv")], server)
    local_code, local_out, _ = run(capsys, args(models, "films", "--out", "local.csv"))
    assert (code, out) == (local_code, local_out) == (1, local_out)
    assert (tmp_path / "served.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
    assert "3 of 4 files predicted" in err and "predictions in served.csv" in err
    assert "f0.png" in out and "broken.png" in out


def test_the_client_does_not_import_torch(server: Path, models: dict[str, Path], tmp_path: Path):
    """What makes a call fast: `python -m cxr predict --server` never imports torch (nor NumPy)."""
    image = save(Image.fromarray(radiograph()), tmp_path / "x.png")
    code = (
        "import sys\nfrom cxr.__main__ import main\ntry:\n    main(sys.argv[1:])\n"
        "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules, "
        "'numpy' in sys.modules, file=sys.stderr)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "predict", "--server", "--socket", str(server),
         *args(models, image.name)],
        capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.stderr.splitlines()[-1] == "exit 0 False False", proc.stderr
    assert "x.png" in proc.stdout


def test_usage_errors_come_back_and_the_server_goes_on(
    server: Path, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = ask(["--server", *args(models, "x.png")], server)
    assert code == 2 and "no images to predict (x.png: no such file or folder)" in err
    with socket.socket(socket.AF_UNIX) as conn:  # not a request at all
        conn.connect(str(server))
        conn.sendall(b"hello\n")
        reply = conn.makefile("rb").read().decode()
    assert "bad request" in reply and json.loads(reply.splitlines()[-1]) == {"exit": 2}
    save(Image.fromarray(radiograph()), tmp_path / "x.png")
    assert ask(["--server", *args(models, "x.png")], server)[0] == 0


def test_a_client_that_leaves_still_gets_its_out_written(
    server: Path, models: dict[str, Path], tmp_path: Path
) -> None:
    """Ctrl-C on the client: the server runs the request to the end and writes --out."""
    films(tmp_path / "films")
    argv = ["--server", *args(models, "films", "--out", "left.csv")]
    request = {"protocol": serve.PROTOCOL, "argv": argv, "cwd": str(tmp_path)}
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(server))
        conn.sendall(json.dumps(request).encode() + b"\n")
    deadline = time.monotonic() + 120
    while not (tmp_path / "left.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len((tmp_path / "left.csv").read_text().splitlines()) == 1 + 4


def test_no_server_is_a_clear_usage_error(tmp_path: Path) -> None:
    code, out, err = ask(["x.png"], tmp_path / "none.sock")
    assert code == 2 and out == ""
    assert f"no cxr server at {tmp_path / 'none.sock'}" in err and "python -m cxr serve" in err


def test_models_are_loaded_again_only_when_their_files_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[tuple[Path, ...]] = []
    monkeypatch.setattr("cxr.loading.load_models", lambda *paths: loads.append(paths) or paths)
    four, binary = (tmp_path / "four.pt", tmp_path / "binary.pt")
    four.write_bytes(b"4")
    binary.write_bytes(b"2")
    cache = serve.ModelCache()
    cache.load(four, binary, None)
    cache.load(four, binary, None)
    assert len(loads) == 1
    os.utime(binary, ns=(0, 10**9))  # the same path, a new file
    cache.load(four, binary, None)
    cache.load(binary, four, None)  # other checkpoints named
    assert len(loads) == 3


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = Path(tempfile.mkdtemp(prefix="cxrs")) / "s.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))  # a server that died: the file stays, nobody listens
    dead.close()
    with serve.listening(path) as live:
        assert path.exists() and live.getsockname() == str(path)
        with pytest.raises(SystemExit, match="already running"):
            serve.bind(path)
    assert not path.exists()
    path.parent.rmdir()
