"""`captionlab evaluate`: the course evaluator's CIDEr | CLIPScore line, plus a JSON summary and per-image tables."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CLIP = "open_clip:ViT-B-32:openai"  # the course evaluator's CLIP; the zeroshot command shares it


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `evaluate` sub-command."""
    p = sub.add_parser("evaluate", help="CIDEr + CLIPScore (+ RefCLIPScore, BLEU, ROUGE-L...) of a predictions JSON")
    p.add_argument("--pred", required=True, help="predictions JSON {file stem: caption}")
    p.add_argument("--annotations", required=True, help="ground-truth annotation JSON (e.g. p2_data/val.json)")
    p.add_argument("--images", default=None, help="image folder of the annotations (needed for CLIPScore)")
    p.add_argument("--clip", default=DEFAULT_CLIP,
                   help=f"CLIP for CLIPScore: open_clip:ARCH:TAG | hf:<id or dir> | HF CLIP dir | none "
                        f"(default {DEFAULT_CLIP}, as the course; offline use the demo CLIP dir)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated subset of CIDEr,CLIPScore,RefCLIPScore,BLEU,METEOR,ROUGE_L,SPICE, or 'all' "
                        "(default: all but METEOR, which is slow to start)")
    p.add_argument("--out", default=None, help="output folder (default: next to the predictions)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate `args.pred`, print the course line and the other metrics, write `<pred stem>.summary.json` etc."""
    from captionlab.errors import ConfigError
    from captionlab.metrics.evaluate import ALL_METRICS, CLIP_METRICS, DEFAULT_METRICS, evaluate

    if args.metrics in (None, ""):
        metrics = list(DEFAULT_METRICS)
    elif args.metrics.strip().lower() == "all":
        metrics = list(ALL_METRICS)
    else:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    clip = None if str(args.clip).lower() in ("none", "") else args.clip
    if clip is not None and any(m in CLIP_METRICS for m in metrics):
        if args.images is None:
            raise ConfigError("CLIPScore needs --images DIR (or pass --clip none / --metrics CIDEr)")
        from captionlab.models.clip import load_clip

        clip = load_clip(clip, device=args.device)
    result = evaluate(args.pred, args.annotations, args.images, clip=clip, metrics=metrics,
                      batch_size=args.batch_size,
                      params={"pred": args.pred, "annotations": args.annotations, "images": args.images,
                              "clip": args.clip, "metrics": metrics})
    print(result.line())
    s = result.summary
    extra = [k for k in ("RefCLIPScore", "Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "SPICE") if k in s]
    if extra:
        print(" | ".join(f"{k}: {s[k]:.4f}" for k in extra))
    for name, why in s["unavailable"].items():
        print(f"{name}: unavailable ({why})")
    out = Path(args.out) if args.out else Path(args.pred).resolve().parent
    paths = result.save(out, prefix=Path(args.pred).stem)
    print(f"n_images: {s['n_images']} | wrote {paths['summary']} and {paths['per_image_csv'].name}")
    return 0
