"""`captionlab ...` entry points: every command-line parser of the project lives in this package.

The library never imports `captionlab.cli` (a test checks it); each module here exposes `register(subparsers)`
and keeps heavy imports (torch, transformers) inside the command functions so `captionlab --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

# Each module exposes `register(subparsers)`, adding parsers whose `func(args) -> int` does the work.
COMMAND_MODULES = [
    "captionlab.cli.world",  # world build | info
    "captionlab.cli.evaluate",  # evaluate
    "captionlab.cli.models",  # caption, llava
    "captionlab.cli.train",  # train
    "captionlab.cli.zeroshot",  # zeroshot
    "captionlab.cli.attention",  # attention series / faithfulness
    "captionlab.cli.report",  # report run / sweep
    "captionlab.cli.workers",  # workers status / stop
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(prog="captionlab", description="captionlab: caption, evaluate, train and "
                                     "report (the course's hw3 contracts, the demo world, the report notebooks)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; errors the user can fix print one clear line and exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    return run(args.func, args)


def run(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Call a command function; a CaptionlabError (user-fixable) prints one `error:` line and gives exit code 2."""
    from captionlab.errors import CaptionlabError

    try:
        return int(func(args) or 0)
    except CaptionlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
