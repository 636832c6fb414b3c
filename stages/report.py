"""report stage: reports/summary.md and reports/model_card.md from the committed metrics.

Reads what evaluate wrote (metrics/<task>.json), the split counts (metrics/data.json), the
checkpoints' training metadata and the reference runs, and writes the two Markdown reports. Kept
apart from evaluate so that evaluating a model never depends on other experiments' results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from cxr.cli import setup_logging, stage_imports, user_errors

with stage_imports():  # a Ctrl-C while these load (torch: seconds) is one line (cxr.cli)
    from cxr.config import load_evaluate_params
    from cxr.errors import InputError
    from cxr.models import load_checkpoint
    from cxr.report import read_reference_runs, write_model_card, write_summary

TASKS = ("binary", "four_class")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", type=Path, required=True, help="binary checkpoint")
    parser.add_argument("--four-class", type=Path, required=True, help="four-class checkpoint")
    parser.add_argument("--metrics", type=Path, default=Path("metrics"), help="reads <task>.json")
    parser.add_argument("--data-counts", type=Path, default=Path("metrics/data.json"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    parser.add_argument(
        "--reference", type=Path, default=None,
        help="folder of reference runs (<run>/binary.json, four_class.json, run.yaml) to compare with",
    )  # fmt: skip
    return parser.parse_args(argv)


def read_json(path: Path, hint: str) -> dict:
    if not path.is_file():
        raise InputError(f"{path} not found: {hint}")
    return json.loads(path.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    with user_errors():
        p = load_evaluate_params(args.params)
        results = {
            task: read_json(args.metrics / f"{task}.json", "run the evaluate stage first")
            for task in TASKS
        }
        metas = {
            task: load_checkpoint(path, task=task)[1]
            for task, path in zip(TASKS, (args.binary, args.four_class), strict=True)
        }
        data_counts = read_json(args.data_counts, "run the split stage first")
        references = read_reference_runs(args.reference) if args.reference else []
        write_summary(args.reports / "summary.md", results, metas, data_counts, p, references)
        write_model_card(args.reports / "model_card.md", results, metas, data_counts, p, references)


if __name__ == "__main__":
    main()
