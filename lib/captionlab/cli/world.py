"""`captionlab world build|info`: generate the demo world (and optionally its tiny models), show what is built."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEMO_MODELS = ("clip", "gpt2", "llava")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `world` command group."""
    world = sub.add_parser("world", help="build or inspect the demo world (seeded shapes dataset + tiny models)")
    wsub = world.add_subparsers(dest="world_command", metavar="ACTION")
    build = wsub.add_parser("build", help="generate the demo world in the course layout")
    build.add_argument("--root", type=Path, default=None, help="output directory (default: the cache's demo/seed<S>)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="rebuild even if an up-to-date world exists")
    build.add_argument("--models", nargs="*", choices=DEMO_MODELS, default=None, metavar="NAME",
                       help="also train the tiny demo models: the ones named, or all (clip, gpt2, llava)")
    build.add_argument("--rehearsal", action="store_true",
                       help="build the rehearsal world instead: hw3_data-shaped photos + random-weight checkpoints "
                            "at the real shapes (params/rehearsal.yaml; {cache}/rehearsal, ~2.6 GB)")
    build.set_defaults(func=_build)
    info = wsub.add_parser("info", help="print a built world's world.json summary and its models")
    info.add_argument("--root", type=Path, default=None)
    info.add_argument("--seed", type=int, default=0)
    info.set_defaults(func=_info)
    world.set_defaults(func=lambda args: (world.print_help(), 1)[1])


def _root(args: argparse.Namespace) -> Path:
    from captionlab.demo import world_root

    return args.root if args.root is not None else world_root(args.seed)


def _build(args: argparse.Namespace) -> int:
    from captionlab.data import world
    from captionlab.demo import ensure_models, ensure_world

    if args.rehearsal:
        from captionlab.data.rehearsal import ensure_rehearsal

        root = ensure_rehearsal(args.root, force=args.force)
        print(f"rehearsal world: {root} (data: {root / 'hw3_data'}, models: {root / 'models'})")
        return 0
    root = _root(args)
    if args.force:
        world.build_world(root, seed=args.seed)
    else:
        ensure_world(args.seed, root)
    info = world.world_info(root)
    print(f"world: {root} (generator v{info['generator_version']}, seed {info['seed']}, "
          f"built in {info['build_seconds']} s)")
    if args.models is not None:
        for name, path in ensure_models(args.models or DEMO_MODELS, args.seed, root).items():
            print(f"model {name}: {path}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from captionlab.data import world
    from captionlab.demo import MARKER
    from captionlab.errors import DataError

    root = _root(args)
    try:
        info = world.world_info(root)
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from None
    print(f"world: {root}")
    for key in ("generator_version", "seed", "image_size", "build_seconds"):
        print(f"  {key}: {info.get(key)}")
    print("  sizes: " + ", ".join(f"{k}={v}" for k, v in info["sizes"].items()))
    print("  vocab: " + "; ".join(f"{k}: {' '.join(v)}" for k, v in info["vocab"].items() if k != "relations"))
    for name in DEMO_MODELS:
        marker = root / "models" / name / MARKER
        if marker.exists():
            m = json.loads(marker.read_text())
            print(f"  model {name}: v{m.get('version')} ({m.get('seconds')} s) {marker.parent}")
        else:
            print(f"  model {name}: not built")
    return 0
