"""`captionlab attention series|faithfulness`: attention figures and per-layer grounding reports from the CLI."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def load_model(path: str | os.PathLike) -> Any:
    """A PEFT captioner checkpoint dir (captioner.json) or an HF LLaVA dir / hub id, loaded for capture."""
    from captionlab.errors import ConfigError

    p = Path(path)
    if (p / "captioner.json").exists() or (p.is_file() and (p.parent / "captioner.json").exists()):
        from captionlab.models.captioner import load_captioner

        return load_captioner(p)
    if p.exists() and not (p / "config.json").exists():
        raise ConfigError(f"{p}: neither a captioner checkpoint (captioner.json) nor an HF LLaVA dir (config.json)")
    from captionlab.models.llava import load_llava

    return load_llava(str(path))


def _layers(value: str) -> Any:
    if value == "all":
        return "all"
    items = [int(v) for v in value.split(",")]
    return items[0] if len(items) == 1 else items


def _heads(value: str) -> Any:
    return value if value in ("mean", "max") else int(value)


def _images(args: argparse.Namespace) -> list[Path]:
    from captionlab.data.images import list_images

    paths: list[Path] = []
    for item in args.images:
        p = Path(item)
        paths += [Path(x) for x in list_images(p)] if p.is_dir() else [p]
    return paths[: args.limit] if args.limit else paths


def run_series(args: argparse.Namespace) -> int:
    """Capture and save one attention series PNG per image (+ per-word frames with --frames)."""
    from captionlab.attention.capture import capture
    from captionlab.attention.figures import save_series
    from captionlab.attention.widgets import save_frames

    model = load_model(args.model)
    kw: dict[str, Any] = {"layer": _layers(args.layer), "heads": _heads(args.heads), "unit": args.unit,
                          "rollout": args.rollout}
    if args.max_new_tokens:
        kw["max_new_tokens"] = args.max_new_tokens
    results = capture(model, _images(args), prompt=args.prompt, **kw)
    for res in results:
        path = save_frames(res, args.out)[-1] if args.frames else save_series(res, args.out, cols=args.cols)
        print(f"{path}\t{res.caption}")
    return 0


def run_faithfulness(args: argparse.Namespace) -> int:
    """Per-layer pointing game / mass share on annotated images; writes a CSV (and the per-word CSV)."""
    from captionlab.attention.faithfulness import layer_report, load_annotated, method_report
    from captionlab.utils import atomic_path

    paths, objects, masks = load_annotated(args.images[0], args.masks, args.objects, args.limit or None)
    model = load_model(args.model)
    if args.methods:
        captions = None
        if args.captions:
            from captionlab.data import load_predictions
            from captionlab.errors import DataError

            preds = load_predictions(args.captions)
            missing = [p.stem for p in paths if p.stem not in preds]
            if missing:
                raise DataError(f"{args.captions}: no caption for {len(missing)} images, e.g. {missing[:3]}")
            captions = [preds[p.stem] for p in paths]
        summary, words = method_report(model, paths, objects, masks, captions=captions,
                                       methods=args.methods.split(","), layers=_layers(args.layers),
                                       heads=_heads(args.heads), prompt=args.prompt)
    else:
        summary, words = layer_report(model, paths, objects, masks, layers=_layers(args.layers),
                                      heads=_heads(args.heads), prompt=args.prompt, words=True)
    out = Path(args.out)
    with atomic_path(out, suffix=".csv") as tmp:
        summary.to_csv(tmp, index=False)
    with atomic_path(out.with_name(out.stem + "_words.csv"), suffix=".csv") as tmp:
        words.to_csv(tmp, index=False)
    print(summary.to_string(index=False))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `attention series` and `attention faithfulness`."""
    parser = subparsers.add_parser("attention", help="attention maps over image patches (series, faithfulness)")
    sub = parser.add_subparsers(dest="attention_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="captioner checkpoint dir or HF LLaVA dir / hub id")
        p.add_argument("--images", nargs="+", required=True, help="image files or a directory")
        p.add_argument("--heads", default="mean", help="mean | max | head index (default mean)")
        p.add_argument("--prompt", default=None, help="LLaVA instruction (default: the project's caption prompt)")
        p.add_argument("--limit", type=int, default=0, help="first N images only")

    s = sub.add_parser("series", help="one PNG per image: the image and one overlay per word")
    common(s)
    s.add_argument("--out", required=True, help="output directory (<image stem>.png)")
    s.add_argument("--layer", default="-1", help="layer index, comma list to average, or 'all' (default -1)")
    s.add_argument("--unit", choices=["words", "tokens"], default="words")
    s.add_argument("--cols", type=int, default=5)
    s.add_argument("--max-new-tokens", type=int, default=0)
    s.add_argument("--rollout", action="store_true", help="attention rollout over all layers (L x the memory)")
    s.add_argument("--frames", action="store_true", help="also one PNG per word (static widget fallback)")
    s.set_defaults(func=run_series)

    f = sub.add_parser("faithfulness", help="per-layer pointing game vs the random-point baseline (CSV)")
    common(f)
    f.add_argument("--masks", required=True, help="directory of <stem>.png label masks")
    f.add_argument("--objects", required=True, help="objects JSON {stem: [{id, colour, shape, ...}]}")
    f.add_argument("--layers", default="all", help="'all' or a comma list of layer indices")
    f.add_argument("--methods", default="", help="comma list of raw,rollout,grad,relevancy: teacher-forced "
                   "explanations with a deletion test (default: generation-time raw attention only)")
    f.add_argument("--captions", default="", help="with --methods: predictions JSON {stem: caption} to explain "
                   "(default: the model's own greedy captions)")
    f.add_argument("--out", required=True, help="summary CSV path (per-word rows go to <out>_words.csv)")
    f.set_defaults(func=run_faithfulness)
