"""`python -m cxr <command>` (or the `cxr` console script): bench | predict."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("bench", "predict")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m cxr {{{'|'.join(commands)}}} [options]  (--help for each)")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from cxr.bench import main as run
    else:
        from cxr.predict import main as run
    run(rest)


if __name__ == "__main__":
    main()
