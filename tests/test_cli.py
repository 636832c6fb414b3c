"""cxr.cli.user_errors: one line for errors a user can act on, a traceback for bugs.

Watched red before the fix: with every ValueError and OSError turned into one line,
test_a_bug_keeps_its_traceback failed (a ValueError from inside NumPy became `error: ...`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr.cli import is_user_error, user_errors
from cxr.errors import FetchError, InputError, LeakageError
from cxr.models import CheckpointError
from cxr.params import ParamsError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "error",
    [
        ParamsError("params.yaml: train_binary.arch missing"),
        CheckpointError("m.pt: file not found"),
        InputError("data/split holds 64 px images, the model 112 px"),
        FetchError("2 file(s) failed"),
        LeakageError("group g1 in train and test"),
        FileNotFoundError(2, "No such file or directory", "data/split/test.npy"),
        PermissionError(13, "Permission denied", "models/binary.pt"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_users_mistake_is_one_line_and_exit_1(error, capsys):
    with pytest.raises(SystemExit) as exc, user_errors():
        raise error
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err == f"error: {error}\n"


@pytest.mark.parametrize(
    "bug",
    [
        lambda: np.zeros(-1),  # ValueError from deep inside NumPy
        lambda: 1 / 0,
        lambda: {}["missing"],
        lambda: int("x"),  # a plain ValueError of our own making would look the same
        lambda: (_ for _ in ()).throw(OSError(28, "No space left on device")),
    ],
    ids=["numpy-ValueError", "ZeroDivisionError", "KeyError", "int-ValueError", "ENOSPC"],
)
def test_a_bug_keeps_its_traceback(bug):
    with pytest.raises(Exception) as exc, user_errors():
        bug()
    assert not isinstance(exc.value, SystemExit)
    assert not is_user_error(exc.value)


def test_a_subclass_of_a_project_error_defined_elsewhere_is_still_ours():
    class Custom(InputError):
        pass

    assert is_user_error(Custom("x"))
    assert not is_user_error(ValueError("x"))


def test_a_stage_prints_one_line_for_a_user_error_and_a_traceback_for_a_bug(tmp_path):
    """Through a real stage script: a missing params file (the user's) is `error: ...`; a bug
    (the split arrays' loader replaced by one that divides by zero) is a traceback."""
    missing = subprocess.run(
        [sys.executable, "stages/evaluate.py", "--binary", "b.pt", "--four-class", "f.pt",
         "--params", str(tmp_path / "nope.yaml")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error: params file not found")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    code = (
        "import sys; sys.argv[0] = 'stages/evaluate.py'; from stages import evaluate as s; "
        "s.load_splits = lambda d: 1 / 0; "
        f"s.main(['--binary', 'b.pt', '--four-class', 'f.pt', '--params', r'{tmp_path}/params.yaml'])"
    )
    bug = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert bug.returncode == 1 and "Traceback" in bug.stderr
    assert bug.stderr.strip().splitlines()[-1] == "ZeroDivisionError: division by zero"
