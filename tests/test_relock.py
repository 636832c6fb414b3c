"""cxr.relock: recording edited code in both locks when the outputs are not here."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from cxr import relock

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The locks and the code they record, copied."""
    for folder in ("cxr", "stages"):
        shutil.copytree(
            ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    (tmp_path / "oos").mkdir()
    for lock in relock.LOCKS:
        shutil.copy(ROOT / lock, tmp_path / lock)
    return tmp_path


def recorded(root: Path, lock: str, path: str) -> list[tuple[str, int]]:
    stages = yaml.safe_load((root / lock).read_text())["stages"].values()
    return [(d["md5"], d["size"]) for s in stages for d in s.get("deps", []) if d["path"] == path]


def test_an_edited_code_file_is_listed_then_recorded_in_every_stage_of_both_locks(repo: Path):
    assert relock.stale_code_deps(repo) == []
    before = {lock: (repo / lock).read_text() for lock in relock.LOCKS}
    with open(repo / "cxr" / "config.py", "a") as fh:
        fh.write("# a comment changes no output\n")
    data = (repo / "cxr" / "config.py").read_bytes()
    stale = relock.stale_code_deps(repo)
    assert {s.lock for s in stale} == set(relock.LOCKS) and {s.path for s in stale} == {
        "cxr/config.py"
    }
    assert (
        len(stale) == sum(len(recorded(repo, lock, "cxr/config.py")) for lock in relock.LOCKS) > 2
    )

    assert relock.record(repo) == stale
    assert relock.stale_code_deps(repo) == []
    for lock in relock.LOCKS:
        entries = recorded(repo, lock, "cxr/config.py")
        assert set(entries) == {(hashlib.md5(data).hexdigest(), len(data))}
        # nothing else in the file moved: only the md5 and size lines of those entries
        changed = [
            (old, new)
            for old, new in zip(
                before[lock].splitlines(), (repo / lock).read_text().splitlines(), strict=True
            )
            if old != new
        ]
        assert len(changed) == 2 * len(entries)
        assert all(old.split(":")[0] == new.split(":")[0] for old, new in changed)
        assert {old.split(":")[0].strip() for old, _ in changed} == {"md5", "size"}


def test_check_mode_exits_1_naming_the_file_and_writes_nothing(repo: Path, capsys):
    with open(repo / "stages" / "split.py", "a") as fh:
        fh.write("# edited\n")
    lock = (repo / "dvc.lock").read_text()
    assert relock.main([], root=repo) == 1
    assert "dvc.lock: split: stages/split.py" in capsys.readouterr().out
    assert (repo / "dvc.lock").read_text() == lock
    assert relock.main(["--write"], root=repo) == 0
    assert "stages/split.py (recorded)" in capsys.readouterr().out
    assert relock.main([], root=repo) == 0


def test_toy_hash_repeats_and_moves_with_the_recipe(monkeypatch):
    """tests/toy_hash.py, the fingerprint docs/development.md asks for before a relock: the same
    run twice gives the same hash, another learning rate another."""
    from tests import toy_hash

    first = toy_hash.toy_hash()
    assert len(first) == 16 and toy_hash.toy_hash() == first
    real = toy_hash.repo_params
    monkeypatch.setattr(toy_hash, "repo_params", lambda section, **kw: real(section, **kw, lr=3e-3))
    assert toy_hash.toy_hash() != first


def test_a_recorded_code_file_that_is_gone_is_an_error_not_a_record(repo: Path):
    (repo / "cxr" / "errors.py").unlink()
    lock = (repo / "dvc.lock").read_text()
    with pytest.raises(
        FileNotFoundError, match=r"dvc.lock: stage \w+ depends on cxr/errors.py, which is gone"
    ):
        relock.record(repo)
    assert (repo / "dvc.lock").read_text() == lock
