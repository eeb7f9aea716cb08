"""`captionlab ...` entry points; each area registers its own sub-commands."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes `register(subparsers)`, adding parsers whose `func(args) -> int` does the work.
# Heavy imports (torch, transformers) stay inside those functions so `captionlab --help` is fast.
COMMAND_MODULES = [
    "captionlab.data.commands",  # world build
    "captionlab.metrics.commands",  # evaluate
    "captionlab.models.commands",  # caption, llava, zeroshot, train
    "captionlab.attention.commands",  # attention series / faithfulness
    "captionlab.report.commands",  # report run / sweep
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(prog="captionlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; errors the user can fix print one clear line and exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from captionlab.errors import CaptionlabError

    try:
        return int(args.func(args) or 0)
    except CaptionlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
