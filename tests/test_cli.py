"""cxr.cli.user_errors: one line for errors a user can act on, a traceback for bugs; and
cxr.cli.interrupts_held, which keeps a Ctrl-C out of torch's import.

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


# interrupts_held, in a child process (a Ctrl-C that got out would stop the test run): the
# child signals itself inside the block, runs more code, and prints what it saw.
HELD = """
import os, signal, sys
from cxr.cli import interrupts_held
if sys.argv[1] == "ignored":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
seen = []
try:
    with interrupts_held():
        os.kill(os.getpid(), signal.SIGINT)
        seen.append(sum(range(100_000)))  # plenty of bytecode after the signal
        seen.append("block ended")
    seen.append("after the block")
except KeyboardInterrupt:
    seen.append("KeyboardInterrupt")
print(seen[1:], signal.getsignal(signal.SIGINT) is signal.default_int_handler)
"""


@pytest.mark.parametrize(
    ("sigint", "seen"),
    [
        ("default", "['block ended', 'KeyboardInterrupt'] True"),  # held, raised at the end
        ("ignored", "['block ended', 'after the block'] False"),  # the program's choice stands
    ],
)
def test_a_ctrl_c_inside_interrupts_held_waits_for_the_block_to_end(sigint, seen):
    """Why it exists: a KeyboardInterrupt raised while torch's C++ extension is importing can
    abort the process (signal 6: "terminate called after throwing an instance of
    'pybind11::error_already_set'"), which tests/test_predict.py's Ctrl-C test met in about 2%
    of runs whose signal landed in torch's import (7 of 400, 0 of 400 with the block).
    Watched red with interrupts_held made a plain `yield`."""
    child = subprocess.run([sys.executable, "-c", HELD, sigint], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == seen


# A stage script in a child process that reports, at its first import of torch, whether a Ctrl-C
# would be held there, and stops (loading torch would take seconds per stage and add nothing).
AT_TORCH = """
import importlib.abc, os, runpy, signal, sys

class AtTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            held = signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            print("torch imported with Ctrl-C", "held" if held else "NOT held", flush=True)
            os._exit(0)

sys.meta_path.insert(0, AtTorch())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("stage", sorted(p.name for p in (ROOT / "stages").glob("[!_]*.py")))
def test_a_stage_imports_torch_with_ctrl_c_held(stage):
    """Every stage that imports torch does so inside cxr.cli.stage_imports; the stages that
    never import torch print their help. Watched red (session 28) with the block taken out of
    stages/train.py, and with oos_score's `from torch import nn` above it."""
    child = subprocess.run([sys.executable, "-c", AT_TORCH, f"stages/{stage}", "--help"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert child.returncode == 0, child.stderr
    assert child.stdout.startswith(("usage:", "torch imported with Ctrl-C held")), child.stdout


def test_a_ctrl_c_inside_stage_imports_is_one_line_and_status_130():
    code = (
        "import os, signal\n"
        "from cxr.cli import stage_imports\n"
        "with stage_imports():\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    sum(range(100_000))\n"
        "print('not reached')\n"
    )
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert (child.returncode, child.stdout) == (130, "")
    assert child.stderr.strip() == (
        "error: interrupted; outputs were left as they were (re-run to finish)"
    )


def test_a_stage_that_holds_ctrl_c_makes_every_later_import_inside_the_block():
    """After `with stage_imports():` no module-level import follows outside it: a Ctrl-C while
    pandas, scikit-learn or the cxr modules load is one line too (in evaluate's first two
    seconds it was a 59-line traceback, session 28). Watched red with stages/train.py's
    `from cxr.train import ...` moved below the block."""
    import ast

    for path in sorted((ROOT / "stages").glob("[!_]*.py")):
        body = ast.parse(path.read_text()).body
        blocks = [i for i, node in enumerate(body) if isinstance(node, ast.With)
                  and ast.unparse(node.items[0].context_expr) == "stage_imports()"]  # fmt: skip
        if not blocks:
            continue
        later = [node.lineno for node in body[blocks[0] + 1 :]
                 if isinstance(node, ast.Import | ast.ImportFrom)]  # fmt: skip
        assert not later, f"{path.name}: imports outside stage_imports() on lines {later}"
