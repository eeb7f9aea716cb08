"""Feature caching at the real HW3 shapes, on this machine: what one optimizer step costs with cached encoder
features vs the encoder every step, for prefix and cross-attention conditioning.

    .venv/bin/python benchmarks/real_shapes.py            # ~15 min on 2 CPU cores; needs ~2 GB of /tmp
    .venv/bin/python benchmarks/real_shapes.py --quick    # smaller batch / fewer steps

The models have the real architectures but random weights (no hub here; speed does not depend on the values):
- encoder `timm:vit_large_patch14_clip_224.openai@<random weights file>` (ViT-L/14, 257 tokens of width 1024),
  loaded through the same `timm:<name>@<file>` spec a user with a copied checkpoint would use;
- decoder: GPT-2 small (124 M parameters, 50257-token vocabulary) written as a course-style `decoder_model.bin`
  (HF Conv1D layout), with the demo world's tokenizer files beside it;
- images: the demo world's training images re-encoded at COCO size (640x480 JPEG, quality 90) in the course's
  p2_data layout, so the uncached path pays real JPEG decoding and resizing.
Training runs through `captionlab.train.train` exactly as in `make bench`: the median of the timed steps after a
warm-up step, cached and uncached measured one after the other in this run. Writes reports/bench/real_shapes.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
os.environ.setdefault("CAPTIONLAB_CACHE", str(REPO / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ENCODER = "vit_large_patch14_clip_224.openai"
COCO_SIZE = (640, 480)
CONFIGS: dict[str, dict[str, Any]] = {
    # the course-typical design: all 257 ViT-L tokens as a prefix in GPT-2's self-attention
    "prefix": dict(conditioning="prefix", lora_rank=8),
    # the same prefix average-pooled 2x2 over the patch grid: 1 + 64 visual tokens
    "prefix_pool2": dict(conditioning="prefix", visual_pool=2, lora_rank=8),
    # gated cross-attention in front of every 4th GPT-2 block (3 layers of width 384): ~7 M trainable
    "cross": dict(conditioning="cross", cross_every=4, cross_dim=384, lora_rank=8),
}


def build_models(tmp: Path) -> tuple[str, str]:
    """(encoder spec, decoder path) of random-weight ViT-L/14 and GPT-2 small written under `tmp`."""
    import timm
    import torch
    from safetensors.torch import save_file

    from captionlab.demo import ensure_model
    from captionlab.models.decoder import GPT, GPTConfig

    torch.manual_seed(0)
    vit = timm.create_model(ENCODER, pretrained=False, num_classes=0)
    enc_file = tmp / "vit_large_random.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(enc_file))
    del vit
    gpt = GPT(GPTConfig(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12))
    state = {k: v for k, v in gpt.state_dict().items() if k != "lm_head.weight"}
    for k in state:  # the course file is in HF Conv1D layout: (in, out) weights
        if k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            state[k] = state[k].t().contiguous()
    dec_dir = tmp / "gpt2_small_random"
    dec_dir.mkdir()
    torch.save(state, dec_dir / "decoder_model.bin")
    demo_gpt2 = ensure_model("gpt2")
    for f in demo_gpt2.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, dec_dir / f.name)
    return f"timm:{ENCODER}@{enc_file}", str(dec_dir / "decoder_model.bin")


def build_images(tmp: Path, n_images: int) -> Path:
    """A p2_data training split of `n_images` demo images re-encoded at COCO size; returns the data root."""
    from PIL import Image

    from captionlab.demo import ensure_world

    world = Path(ensure_world()) / "p2_data"
    ann = json.loads((world / "train.json").read_text())
    images = ann["images"][:n_images]
    keep = {im["id"] for im in images}
    root = tmp / "data"
    out = root / "p2_data" / "images" / "train"
    out.mkdir(parents=True)
    for im in images:
        Image.open(world / "images" / "train" / im["file_name"]).convert("RGB").resize(
            COCO_SIZE, Image.BICUBIC).save(out / im["file_name"], quality=90)
    (root / "p2_data" / "train.json").write_text(json.dumps(
        {"images": images, "annotations": [a for a in ann["annotations"] if a["image_id"] in keep]}))
    return root


def time_steps(cap_cfg: Any, data_root: Path, cached: bool, steps: int, batch: int, threads: int,
               n_images: int) -> dict[str, Any]:
    """Median seconds per optimizer step (after one warm-up step) of `train` with or without the feature cache."""
    from captionlab.train import TrainConfig, train

    stamps: list[float] = []
    with tempfile.TemporaryDirectory(prefix="real-shapes-run-") as out:
        tc = TrainConfig(max_steps=steps + 1, batch_size=batch, eval_images=-1, cache_features=cached, out_dir=out,
                         cpu_threads=threads, train_images=n_images, keep_checkpoints=1)
        if cached:  # the cache is built once per dataset, outside the timed steps
            t0 = time.perf_counter()
            train(cap_cfg, TrainConfig(**{**tc.__dict__, "max_steps": 1}), data_root)
            build = time.perf_counter() - t0
        else:
            build = None
        train(cap_cfg, tc, data_root, on_step=lambda step, loss: stamps.append(time.perf_counter()))
    dts = [b - a for a, b in itertools.pairwise(stamps)]
    return {"seconds": statistics.median(dts), "times": [round(t, 3) for t in dts],
            "cache_build_seconds": None if build is None else round(build, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 2, 2 timed steps")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--only", default=",".join(CONFIGS), help=f"comma-separated of {list(CONFIGS)}")
    p.add_argument("--out", default=str(REPO / "reports" / "bench" / "real_shapes.json"))
    args = p.parse_args(argv)

    import torch

    from captionlab.models.captioner import Captioner, CaptionerConfig
    from captionlab.utils import atomic_write_json, run_metadata

    batch, steps = (2, 2) if args.quick else (4, 3)
    n_images = 8 if args.quick else 16
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="real-shapes-") as tmp_s:
        tmp = Path(tmp_s)
        t0 = time.perf_counter()
        encoder, decoder = build_models(tmp)
        data_root = build_images(tmp, n_images)
        print(f"built random ViT-L/14 + GPT-2 small and {n_images} COCO-size images in {time.perf_counter() - t0:.0f} s")
        for name in args.only.split(","):
            cfg = CaptionerConfig(encoder=encoder, decoder=decoder, **CONFIGS[name])
            report = Captioner(cfg, verbose=False).report
            res = {c: time_steps(cfg, data_root, c, steps, batch, args.threads, n_images) for c in (True, False)}
            ratio = res[False]["seconds"] / res[True]["seconds"]
            rows.append({"config": name, "captioner": CONFIGS[name], "trainable": report["trainable"],
                         "batch": batch, "cached": res[True], "uncached": res[False], "ratio": round(ratio, 2)})
            print(f"{name:<7} trainable {report['trainable']:>10,}  step cached {res[True]['seconds']:.2f} s, "
                  f"uncached {res[False]['seconds']:.2f} s  -> caching {ratio:.2f}x faster")
    meta = {**run_metadata(), "threads": args.threads, "encoder": ENCODER, "decoder": "GPT-2 small (random)",
            "images": f"{n_images} demo images at {COCO_SIZE[0]}x{COCO_SIZE[1]} JPEG", "quick": args.quick}
    atomic_write_json(Path(args.out), {"meta": meta, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
