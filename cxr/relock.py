"""Record edited code in dvc.lock and oos/dvc.lock when the stages' outputs are not here.

`dvc commit` records a change that leaves a stage's outputs as they were, but it needs those
outputs (arrays, models) in the workspace, and this project has no DVC remote: a clone holds
the committed metrics, not the models, and a re-run on another CPU kind makes other bits. For a
change shown not to alter what a stage makes (a refactor, a comment, an option that is off by
default: docs/development.md says how to show it), this writes the md5 and size of each changed
code dependency (cxr/, stages/) into both locks, as `dvc commit` would. Text substitution, so
the files keep DVC's layout; outputs and params are never touched: a change that alters what a
stage makes needs `dvc repro`.

    python -m cxr.relock            # list the code deps whose md5 a lock does not record; exit 1 if any
    python -m cxr.relock --write    # record them
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ("dvc.lock", "oos/dvc.lock")  # both pipelines run from the repository root
CODE = ("cxr/", "stages/")


@dataclass(frozen=True)
class Stale:
    lock: str
    stage: str
    path: str
    md5: str  # the file's, now
    size: int


def stale_code_deps(root: Path = ROOT) -> list[Stale]:
    """Every code dependency whose file differs from what its lock records. A recorded code
    file that is gone is an error (its stage's deps in dvc.yaml need editing), not a record."""
    stale = []
    for lock in LOCKS:
        for name, stage in yaml.safe_load((root / lock).read_text())["stages"].items():
            for dep in stage.get("deps", []):
                path = dep["path"]
                if not path.startswith(CODE) or "md5" not in dep:
                    continue
                if not (root / path).is_file():
                    raise FileNotFoundError(
                        f"{lock}: stage {name} depends on {path}, which is gone"
                    )
                data = (root / path).read_bytes()
                md5 = hashlib.md5(data).hexdigest()
                if md5 != dep["md5"]:
                    stale.append(Stale(lock, name, path, md5, len(data)))
    return stale


def record(root: Path = ROOT) -> list[Stale]:
    """Write the stale code deps' md5 and size into their locks; returns what was written."""
    stale = stale_code_deps(root)
    for lock in sorted({s.lock for s in stale}):
        text = (root / lock).read_text()
        for path, md5, size in sorted({(s.path, s.md5, s.size) for s in stale if s.lock == lock}):
            # a dep entry as DVC writes it: path, hash, md5, size, one per line
            entry = re.compile(
                rf"(- path: {re.escape(path)}\n\s+hash: md5\n\s+md5: )[0-9a-f]{{32}}(\n\s+size: )\d+"
            )
            text, n = entry.subn(rf"\g<1>{md5}\g<2>{size}", text)
            if not n:
                raise ValueError(f"{lock}: no entry for {path} in DVC's layout; use dvc commit")
        (root / lock).write_text(text)
    left = stale_code_deps(root)
    if left:
        raise ValueError(f"still not recorded: {', '.join(f'{s.lock}:{s.path}' for s in left)}")
    return stale


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="record the changed code deps")
    args = parser.parse_args(argv)
    found = record(root) if args.write else stale_code_deps(root)
    for s in found:
        print(f"{s.lock}: {s.stage}: {s.path}{' (recorded)' if args.write else ''}")
    if not found:
        print("every code dependency is recorded")
    return 1 if found and not args.write else 0


if __name__ == "__main__":
    sys.exit(main())
