"""`captionlab train` and `python -m captionlab.cli.train` (the form `accelerate launch -m` runs on every process)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    """`captionlab train --params params/demo.yaml [-p key=value ...]`."""
    p = sub.add_parser("train", help="train the PEFT captioner from a params file (+ key=value overrides)")
    add_train_arguments(p)
    p.set_defaults(func=run_train)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by `captionlab train` and `python -m captionlab.cli.train`."""
    parser.add_argument("--params", default=None, help="params YAML (default params/demo.yaml)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting by its params name (rank=8, lr=3e-4); fields without one "
                             "as train.<field> / captioner.<field> (train.max_steps=10)")
    parser.add_argument("--out-dir", default=None, help="output directory (train.out_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out-dir")


def run_train(args: argparse.Namespace) -> int:
    """Train from a params file plus overrides; the main process prints the best and last epoch as JSON."""
    from captionlab.params import prepare_world
    from captionlab.train import configs_from_params, load_train_params, train

    cfg = load_train_params(args.params, args.param)
    cap, tr, root = configs_from_params(cfg)
    if cfg.world == "demo" and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        built = prepare_world(cfg, ["clip", "gpt2"])  # the explicit build step (cached after the first run)
        print(f"demo world: {built['world']} (prepared: data + clip, gpt2)", file=sys.stderr)
    if args.out_dir:
        tr.out_dir = args.out_dir
    if args.resume:
        tr.resume = True
    history = train(cap, tr, root)
    if os.environ.get("RANK", "0") != "0":
        return 0
    last = history["epochs"][-1] if history["epochs"] else {}
    print(json.dumps({"out_dir": tr.out_dir, "world_size": history["world_size"], "best": history["best"],
                      "last": {k: v for k, v in last.items() if k != "examples"}}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m captionlab.cli.train --params FILE [-p key=value ...]` (also under accelerate launch)."""
    from captionlab.cli import run

    parser = argparse.ArgumentParser(prog="captionlab.cli.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    return run(run_train, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
