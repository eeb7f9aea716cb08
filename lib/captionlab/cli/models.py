"""Model sub-commands: `caption` (the course's hw3_2 contract) and `llava` (hw3_1); one function each."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    """Add the model sub-commands."""
    register_caption(sub)
    _register_llava(sub)
    _register_prompt_study(sub)


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
    p.add_argument("--tokenizer", default=None, help="GPT-2 tokenizer dir (the course's encoder.json + vocab.bpe); "
                                                     "default: the checkpoint's")
    p.set_defaults(func=run_caption)


def run_caption(args: argparse.Namespace) -> int:
    """Caption every image of --images and write {stem: caption} to --out."""
    from tqdm.auto import tqdm

    from captionlab.data import list_images
    from captionlab.models.captioner import load_captioner
    from captionlab.parallel import launched, process_state, shard
    from captionlab.utils import get_device

    state = process_state() if launched() else None  # under accelerate launch / torchrun: shard the images
    paths = shard(list_images(args.images, check=False), state)
    device = state.device if state is not None and args.device is None else get_device(args.device)
    model = load_captioner(args.checkpoint, decoder=args.decoder, encoder=args.encoder, device=device,
                           tokenizer=args.tokenizer)
    preds: dict[str, str] = {}
    for i in tqdm(range(0, len(paths), args.batch_size), desc="caption"):
        chunk = paths[i:i + args.batch_size]
        caps = model.generate(chunk, method=args.method, beam_size=args.beam_size,
                              max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                              batch_size=args.batch_size)
        preds.update({p.stem: c for p, c in zip(chunk, caps)})
    return _write_predictions(args.out, preds, state)


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
    from captionlab.data import list_images
    from captionlab.models.llava import load_llava
    from captionlab.parallel import launched, process_state, shard

    generation: dict = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "seed": args.seed}
    if args.repetition_penalty is not None:
        generation["repetition_penalty"] = args.repetition_penalty
    if args.sample:
        generation["do_sample"] = True
        if args.temperature is not None:
            generation["temperature"] = args.temperature
    state = process_state() if launched() else None  # under accelerate launch / torchrun: shard the images
    device = state.device if state is not None and args.device is None else args.device
    captioner = load_llava(args.model, device=device, load_in_4bit=args.load_in_4bit)
    stems = shard([p.stem for p in list_images(args.images, check=False)], state)
    preds = captioner.caption_folder(args.images, args.prompt, generation, args.batch_size, args.system,
                                     stems=stems) if stems else {}
    return _write_predictions(args.out, preds, state)


def _register_prompt_study(sub: argparse._SubParsersAction) -> None:
    """`captionlab prompt-study --params FILE --out DIR [--limit N]`: every prompt x generation config, scored."""
    p = sub.add_parser("prompt-study", help="LLaVA prompt study (llava_prompts x llava_configs of a params file) "
                                            "on p1 val: predictions per setting + CIDEr/CLIPScore table")
    p.add_argument("--params", required=True, help="params file (llava_model, clip_model, data_root, llava_prompts, "
                                                   "llava_configs, max_images)")
    p.add_argument("--out", required=True, help="output folder (predictions per setting, prompt_study.csv/json)")
    p.add_argument("--limit", type=int, default=None, help="first N images (default: params max_images, 0 = all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-clip", action="store_true", help="skip CLIPScore")
    p.set_defaults(func=run_prompt_study_cli)


def run_prompt_study_cli(args: argparse.Namespace) -> int:
    """Run the prompt study of a params file (data-parallel under accelerate launch / torchrun)."""
    from pathlib import Path

    from captionlab.models.llava import load_llava, run_prompt_study
    from captionlab.params import load_params
    from captionlab.parallel import is_main, launched, process_state

    params = load_params(args.params)
    state = process_state() if launched() else None
    captioner = load_llava(params["llava_model"], device=state.device if state is not None else None)
    root = Path(params["data_root"])
    limit = args.limit if args.limit is not None else int(params.get("max_images") or 0)
    table = run_prompt_study(captioner, root / "p1_data" / "images" / "val", root / "p1_data" / "val.json",
                             params["llava_prompts"], params["llava_configs"], args.out,
                             clip=None if args.no_clip else params.get("clip_model"), limit=limit or None,
                             batch_size=args.batch_size, state=state)
    if is_main(state):
        print(table.to_string(index=False))
        print(f"wrote {args.out}/prompt_study.csv" + (f" ({state.num_processes} processes)" if state else ""))
    return 0


def _write_predictions(out: str, preds: dict[str, str], state: Any) -> int:
    """Merge every process's predictions, write one JSON from the main process and say so."""
    from captionlab.parallel import gather_predictions, is_main, write_on_main

    preds = gather_predictions(preds, state)
    write_on_main(out, preds, state)
    if is_main(state):
        print(f"wrote {len(preds)} captions to {out}" + (f" ({state.num_processes} processes)" if state else ""))
    return 0
