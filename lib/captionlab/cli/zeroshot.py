"""`captionlab zeroshot`: CLIP zero-shot classification of a folder into the course's `filename,label` CSV."""

from __future__ import annotations

import argparse

from captionlab.cli.evaluate import DEFAULT_CLIP  # the course's CLIP (OpenAI ViT-B/32), one definition


def _register_zeroshot(sub: argparse._SubParsersAction) -> None:
    """Add the `zeroshot` sub-command."""
    p = sub.add_parser("zeroshot", help="CLIP zero-shot classification: filename,label CSV for a folder of images")
    p.add_argument("--images", required=True, help="folder of images (e.g. p1_data/val)")
    p.add_argument("--labels", required=True, help="id2label.json ({\"0\": \"name\", ...})")
    p.add_argument("--out", required=True, help="predictions CSV to write (filename,label)")
    p.add_argument("--clip", default=DEFAULT_CLIP, help=f"CLIP spec: open_clip:<arch>:<tag> or an HF CLIP dir "
                                                        f"(default {DEFAULT_CLIP})")
    p.add_argument("--template", action="append", default=None,
                   help="prompt with an {object} slot; repeat to ensemble several (default: the built-in ensemble)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.set_defaults(func=run_zeroshot)


register = _register_zeroshot


def run_zeroshot(args: argparse.Namespace) -> int:
    """Classify `args.images`, write `args.out`, and print the accuracy when file names carry labels."""
    from captionlab.errors import ConfigError
    from captionlab.models.clip import load_clip
    from captionlab.models.zeroshot import (ENSEMBLE, list_image_files, load_id2label, run_zero_shot, template_name,
                                            write_predictions_csv)

    templates = args.template or []
    if any("{object}" not in t for t in templates):
        raise ConfigError(f"--template must contain an {{object}} slot, got {templates}")
    template = templates[0] if len(templates) == 1 else (tuple(templates) if templates else ENSEMBLE)
    load_id2label(args.labels), list_image_files(args.images)  # fail on bad inputs before loading a model
    clip = load_clip(args.clip, device=args.device)
    result = run_zero_shot(clip, args.images, args.labels, [template], batch_size=args.batch_size)
    preds = result.predictions
    write_predictions_csv(args.out, list(preds["filename"]), list(preds[template_name(template)]))
    print(f"wrote {len(preds)} predictions to {args.out}")
    row = result.table.iloc[0]
    if "label" in preds.columns:  # true labels were parsed from `<label>_<id>.png` names
        print(f"accuracy {row['accuracy']:.4f} ({int(row['correct'])}/{int(row['n'])}) with {row['template']!r}")
    return 0
