"""Model sub-commands: `caption` (the course's hw3_2 contract) and `llava` (hw3_1); one function each."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the model sub-commands."""
    register_caption(sub)
    _register_llava(sub)


# ---------------------------------------------------------------------------------------------- caption


def register_caption(sub: argparse._SubParsersAction) -> None:
    """`captionlab caption --images DIR --out pred.json --checkpoint CKPT [--decoder PATH]`."""
    p = sub.add_parser("caption", help="caption a folder of images with a trained PEFT captioner: {stem: caption} JSON")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--out", required=True, help="predictions JSON to write ({file stem: caption})")
    p.add_argument("--checkpoint", required=True, help="captioner checkpoint dir (trainable.safetensors + captioner.json)")
    p.add_argument("--decoder", default=None, help="decoder weights (decoder_model.bin or HF GPT-2 dir); "
                                                   "default: the spec saved in the checkpoint")
    p.add_argument("--encoder", default=None, help="encoder spec override (default: the checkpoint's)")
    p.add_argument("--method", choices=["greedy", "beam"], default="beam")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.set_defaults(func=run_caption)


def run_caption(args: argparse.Namespace) -> int:
    """Caption every image of --images and write {stem: caption} to --out."""
    from tqdm.auto import tqdm

    from captionlab.data import list_images, save_predictions
    from captionlab.models.captioner import load_captioner
    from captionlab.utils import get_device

    paths = list_images(args.images, check=False)
    model = load_captioner(args.checkpoint, decoder=args.decoder, encoder=args.encoder,
                           device=get_device(args.device))
    preds: dict[str, str] = {}
    for i in tqdm(range(0, len(paths), args.batch_size), desc="caption"):
        chunk = paths[i:i + args.batch_size]
        caps = model.generate(chunk, method=args.method, beam_size=args.beam_size,
                              max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                              batch_size=args.batch_size)
        preds.update({p.stem: c for p, c in zip(chunk, caps)})
    save_predictions(args.out, preds)
    print(f"wrote {len(preds)} captions to {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------ llava


def _register_llava(sub: argparse._SubParsersAction) -> None:
    """`captionlab llava --images DIR --out pred.json [--model ID_OR_DIR] [--prompt ...]` (the hw3_1 contract)."""
    # Same defaults as captionlab.models.llava (not imported here: it pulls in torch).
    DEFAULT_MODEL, DEFAULT_PROMPT = "llava-hf/llava-1.5-7b-hf", "Write a one-sentence caption for this image."

    p = sub.add_parser("llava", help="zero-shot captions with LLaVA: {stem: caption} JSON for a folder of images")
    p.add_argument("--images", required=True, help="folder of images (e.g. p1_data/images/val)")
    p.add_argument("--out", required=True, help="predictions JSON to write ({file stem: caption})")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local HF LLaVA dir (default {DEFAULT_MODEL})")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="instruction given with each image")
    p.add_argument("--system", default=None, help="optional system text before the user turn")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy/beam (seeded by --seed)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--load-in-4bit", action="store_true", help="4-bit weights via bitsandbytes (GPU)")
    p.set_defaults(func=run_llava)


def run_llava(args: argparse.Namespace) -> int:
    """Caption `args.images` with LLaVA and write `args.out`."""
    from captionlab.data import save_predictions
    from captionlab.models.llava import load_llava

    generation: dict = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "seed": args.seed}
    if args.repetition_penalty is not None:
        generation["repetition_penalty"] = args.repetition_penalty
    if args.sample:
        generation["do_sample"] = True
        if args.temperature is not None:
            generation["temperature"] = args.temperature
    captioner = load_llava(args.model, device=args.device, load_in_4bit=args.load_in_4bit)
    preds = captioner.caption_folder(args.images, args.prompt, generation, args.batch_size, args.system)
    save_predictions(args.out, preds)
    print(f"wrote {len(preds)} captions to {args.out}")
    return 0
