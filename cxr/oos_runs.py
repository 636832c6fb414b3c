"""What the out-of-source run scripts (oos/candidate.sh, oos/seeds.sh, oos/tta.sh) read from a
run's params.yaml, through the same checks as the stages, so that a bad file stops a script
with one line naming the key before an hour of training, not a traceback after it.

    python -m cxr.oos_runs plan PARAMS            # prints "FOLD,FOLD,... TASK,..."
    python -m cxr.oos_runs with-seed PARAMS SEED OUT   # PARAMS with base.seed = SEED, to OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from cxr.cli import user_errors
from cxr.oos_params import load_oos_params
from cxr.params import ParamsError


def plan(params: Path) -> str:
    """The folds and tasks a run trains, comma-joined, in params.yaml's order."""
    p = load_oos_params(params)
    return f"{','.join(fold.name for fold in p.folds)} {','.join(p.tasks)}"


def with_seed(params: Path, seed: int, out: Path) -> None:
    """A copy of a run's params.yaml with another base.seed (oos/seeds.sh: one run per seed)."""
    load_oos_params(params)  # the same checks before a run is set up from it
    raw = yaml.safe_load(params.read_text())
    if not isinstance(raw.get("base"), dict):
        raise ParamsError(f"{params}: base missing")
    raw["base"]["seed"] = seed
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cxr.oos_runs", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_plan = sub.add_parser("plan", help="print the run's folds and tasks")
    p_plan.add_argument("params", type=Path)
    p_seed = sub.add_parser("with-seed", help="write the run's params.yaml with another seed")
    p_seed.add_argument("params", type=Path)
    p_seed.add_argument("seed", type=int)
    p_seed.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    with user_errors():
        if args.command == "plan":
            print(plan(args.params))
        else:
            with_seed(args.params, args.seed, args.out)


if __name__ == "__main__":
    main()
