"""`python -m cxr <command>` (or the `cxr` script): bench | predict | serve | calibrate | validate | ood-report | growth | predict-speed | ensemble."""

from __future__ import annotations

import importlib
import sys

from cxr.cli import interrupts_held

# command -> module whose main(argv) runs it; imported only when chosen (torch takes seconds).
COMMANDS = {
    "bench": "cxr.bench",
    "predict": "cxr.predict_options",  # torch only without --server (then cxr.predict)
    "serve": "cxr.serve",
    "calibrate": "cxr.calibrate",
    "validate": "cxr.validate",
    "ood-report": "cxr.ood_report",
    "growth": "cxr.growth",
    "predict-speed": "cxr.predict_speed",
    "ensemble": "cxr.ensemble",
}
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> None:
    # Ctrl-C at any moment, imports and model loading included, is one line and status 130;
    # the commands catch it themselves where they have rows to save, and write files
    # atomically, so nothing is left half-written.
    try:
        run(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); no file was left half-written", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def run(argv: list[str]) -> None:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m cxr {{{'|'.join(COMMANDS)}}} [options]  (--help for each)")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    with interrupts_held():  # most commands import torch as they load: see interrupts_held
        command = importlib.import_module(COMMANDS[argv[0]])
    command.main(argv[1:])


if __name__ == "__main__":
    main()
