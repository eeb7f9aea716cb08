"""The rehearsal world: the real course route's shapes and file formats with random weights, on a CPU.

    root = ensure_rehearsal()        # {cache}/rehearsal (built once, deterministic, under a lock)

writes
```
<root>/world.json                                   # generator version, sizes, the checkpoints' layer counts
<root>/hw3_data/p1_data/images/val/<12 digits>.jpg + p1_data/val.json        # photo-sized JPEGs (640x480, ...)
<root>/hw3_data/p1_data/{train,val}/<label>_<n>.png + p1_data/id2label.json # zero-shot / ViT classification
<root>/hw3_data/p2_data/images/{train,val}/<12 digits>.jpg + train.json, val.json
<root>/hw3_data/p2_data/decoder_model.bin           # GPT-2 small GPT2Model tensors, Conv1D layout, fp32
<root>/hw3_data/p3_data/images/{bike,girl,sheep,ski,umbrella}.jpg
<root>/hw3_repo/{encoder.json,vocab.bpe}            # GPT-2-sized byte-level BPE stand-in (50257, eos 50256)
<root>/models/llava-1.5-7b-hf/                      # HF LLaVA dir: llava-1.5-7b-hf's config, fewer layers, fp16
<root>/models/vit_large_patch14_clip_224.openai.safetensors   # timm ViT-L/14 CLIP at 224 px (257 tokens), fp16
<root>/models/ViT-B-32.bin                          # OpenAI-layout CLIP ViT-B/32 (QuickGELU) state dict, fp16
<root>/models/vit_base_patch16_224.safetensors      # timm ViT-B/16 for 06
```
Everything has the real architecture's widths; only the LLaVA has fewer layers (LLAVA_TEXT_LAYERS = 1 Llama
block instead of 32, LLAVA_VISION_LAYERS = 2 CLIP ViT-L/14-336 blocks instead of 24: the fewest that keep
vision_feature_layer -2) to keep it ~1 GB and `make rehearse` under 20 minutes on 2 CPU cores. One block has every
tensor shape of the 32 (4096 wide, 32 heads, vocab 32064, 576 image tokens); what it cannot show is depth.
Numbers computed on this world are meaningless: it proves that the route runs, not that it works.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from captionlab.utils import atomic_dir, atomic_write_json, atomic_write_text, cache_dir, file_lock

GENERATOR_VERSION = 2
LLAVA_TEXT_LAYERS = 1  # llava-1.5-7b: 32 Llama blocks (one proves the shapes; each costs ~0.4 GB and 1/2 of 01)
LLAVA_VISION_LAYERS = 2  # CLIP ViT-L/14-336: 24 blocks; vision_feature_layer -2 needs at least 2
PHOTO_SIZES = ((640, 480), (480, 640), (500, 375), (640, 427), (427, 640), (500, 333), (612, 612), (375, 500))
P3_NAMES = ("bike", "girl", "sheep", "ski", "umbrella")
CLASSES = ("airplane", "bicycle", "bird", "cat", "dog")
# p2: 4 train images = 20 caption pairs = 2 optimizer steps at the rehearsal's batch 8 (each ~0.5 min on a CPU core)
SIZES = {"p1_val": 8, "p2_train": 4, "p2_val": 4, "cls_train_per_class": 4, "cls_val_per_class": 2}
ENCODER_NAME = "vit_large_patch14_clip_224.openai"
VIT_NAME = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
LLAVA_DIR = "llava-1.5-7b-hf"
ENCODER_FILE = f"{ENCODER_NAME}.safetensors"
CLIP_FILE = "ViT-B-32.bin"
VIT_FILE = "vit_base_patch16_224.safetensors"
GPT2_VOCAB = 50257
EOT = "<|endoftext|>"

_NOUNS = ("man", "woman", "dog", "cat", "bus", "train", "plate of food", "bicycle", "kite", "giraffe", "clock",
          "skateboarder", "pizza", "horse", "boat", "table", "laptop", "umbrella", "sheep", "skier")
_PLACES = ("on a street", "in a field", "next to a building", "on the beach", "in a kitchen", "on a snowy hill",
           "near the water", "in a park", "on a table", "at the station")
_VERBS = ("standing", "sitting", "walking", "parked", "lying", "riding", "looking out")
_ADJS = ("small", "large", "white", "black", "red", "young", "old", "brown")


def rehearsal_root() -> Path:
    """Where the rehearsal world lives: {cache}/rehearsal."""
    return cache_dir() / "rehearsal"


def ensure_rehearsal(root: Path | None = None, force: bool = False) -> Path:
    """Build the rehearsal world (data + random-weight checkpoints) if missing or stale; return its root."""
    root = Path(root) if root else rehearsal_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / f".{root.name}.lock"):
        marker = root / "world.json"
        if not force and marker.exists() and json.loads(marker.read_text()).get("generator_version") == GENERATOR_VERSION:
            return root
        with atomic_dir(root) as tmp:
            t0 = time.time()
            build_rehearsal(tmp)
            atomic_write_json(tmp / "world.json", world_info_dict(round(time.time() - t0, 1)))
    return root


def world_info_dict(seconds: float) -> dict[str, Any]:
    """world.json of the rehearsal world."""
    return {"world": "rehearsal", "generator_version": GENERATOR_VERSION, "seed": 0, "sizes": SIZES,
            "photo_sizes": [list(s) for s in PHOTO_SIZES], "llava_text_layers": LLAVA_TEXT_LAYERS,
            "llava_vision_layers": LLAVA_VISION_LAYERS, "build_seconds": seconds}


def build_rehearsal(root: Path, seed: int = 0) -> None:
    """Write the hw3_data-shaped folder, the tokenizer files and every checkpoint under `root`."""
    from tqdm.auto import tqdm

    data = root / "hw3_data"
    steps = [("data", lambda: build_data(data, seed)),
             ("gpt2 tokenizer", lambda: write_gpt2_bpe(root / "hw3_repo", seed)),
             ("decoder_model.bin", lambda: write_gpt2_decoder(data / "p2_data" / "decoder_model.bin", seed)),
             ("ViT-L/14 CLIP", lambda: write_timm_weights(ENCODER_NAME, root / "models" / ENCODER_FILE, seed, True)),
             ("ViT-B/16", lambda: write_timm_weights(VIT_NAME, root / "models" / VIT_FILE, seed, False)),
             ("CLIP ViT-B/32", lambda: write_openai_clip(root / "models" / CLIP_FILE, seed)),
             ("LLaVA", lambda: write_llava(root / "models" / LLAVA_DIR, seed))]
    for name, step in tqdm(steps, desc="rehearsal world", unit="part"):
        step()


# ----------------------------------------------------------------------------------------------------- data


def photo(rng: random.Random, size: tuple[int, int]) -> "Image.Image":  # noqa: F821
    """A photo-sized RGB picture: a smooth gradient, a few filled shapes and sensor noise."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    w, h = size
    c0, c1 = np.array([rng.randrange(256) for _ in range(3)]), np.array([rng.randrange(256) for _ in range(3)])
    t = np.linspace(0, 1, h)[:, None, None]
    arr = (c0 * (1 - t) + c1 * t).repeat(w, axis=1)
    im = Image.fromarray(arr.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(rng.randint(2, 5)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = min(w, x0 + rng.randint(w // 8, w // 2)), min(h, y0 + rng.randint(h // 8, h // 2))
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    im = im.filter(ImageFilter.GaussianBlur(1.5))
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8), "RGB")


def caption(rng: random.Random) -> str:
    """A COCO-like caption sentence."""
    return (f"{rng.choice(('A', 'The', 'One'))} {rng.choice(_ADJS)} {rng.choice(_NOUNS)} "
            f"{rng.choice(_VERBS)} {rng.choice(_PLACES)}.")


def write_split(images_dir: Path, json_path: Path | None, n: int, rng: random.Random, used: set[int]) -> None:
    """`n` COCO-named photo JPEGs in `images_dir` and (optionally) their course-format annotation JSON."""
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        image_id = rng.randrange(1, 600_000)
        while image_id in used:
            image_id = rng.randrange(1, 600_000)
        used.add(image_id)
        name = f"{image_id:012d}.jpg"
        photo(rng, PHOTO_SIZES[i % len(PHOTO_SIZES)]).save(images_dir / name, quality=90)
        images.append({"file_name": name, "id": image_id})
        for _ in range(5):
            annotations.append({"caption": caption(rng), "id": len(used) * 10 + len(annotations), "image_id": image_id})
    if json_path is not None:
        atomic_write_json(json_path, {"annotations": annotations, "images": images})


def build_data(data: Path, seed: int = 0) -> None:
    """The hw3_data-shaped folder: p1 (LLaVA val + classification), p2 (train/val), p3 (five named images)."""
    rng = random.Random(seed)
    used: set[int] = set()
    write_split(data / "p1_data" / "images" / "val", data / "p1_data" / "val.json", SIZES["p1_val"], rng, used)
    write_split(data / "p2_data" / "images" / "train", data / "p2_data" / "train.json", SIZES["p2_train"], rng, used)
    write_split(data / "p2_data" / "images" / "val", data / "p2_data" / "val.json", SIZES["p2_val"], rng, used)
    p3 = data / "p3_data" / "images"
    p3.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(P3_NAMES):
        photo(rng, PHOTO_SIZES[i % len(PHOTO_SIZES)]).save(p3 / f"{name}.jpg", quality=90)
    atomic_write_json(data / "p1_data" / "id2label.json", {str(i): c for i, c in enumerate(CLASSES)})
    for split, per_class in (("train", SIZES["cls_train_per_class"]), ("val", SIZES["cls_val_per_class"])):
        folder = data / "p1_data" / split
        folder.mkdir(parents=True, exist_ok=True)
        for label in range(len(CLASSES)):
            for n in range(per_class):
                photo(rng, (224, 224)).save(folder / f"{label}_{n}.png")


# ------------------------------------------------------------------------------------------------ tokenizers


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items(), key=lambda kv: (kv[0] not in keep, keep.index(kv[0]) if kv[0] in keep else kv[0])))


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed + 1)
    lines = [caption(rng) for _ in range(3000)]
    lines += ["Write a one-sentence caption for this image. Describe the image in one short sentence.",
              "Give a concise caption of the main objects and what they are doing. USER: ASSISTANT:"]
    return lines


def write_gpt2_bpe(out_dir: Path, seed: int = 0) -> Path:
    """encoder.json + vocab.bpe of a GPT-2-sized byte-level BPE (256 bytes + 50000 merges + <|endoftext|>).

    The first merges are learned from a caption corpus; the rest are synthetic (seeded) so the vocabulary has
    GPT-2's size and id layout (bytes 0..255 in GPT-2's order, merges 256..50255, <|endoftext|> = 50256).
    """
    from tokenizers import ByteLevelBPETokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(_corpus(seed), vocab_size=4000, min_frequency=2, show_progress=False)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(trained._tokenizer.to_str())["model"]["merges"]]
    vocab: dict[str, int] = {ch: i for i, ch in enumerate(alphabet)}
    kept: list[tuple[str, str]] = []
    for a, b in merges:
        if a in vocab and b in vocab and a + b not in vocab:
            vocab[a + b] = len(vocab)
            kept.append((a, b))
    rng = random.Random(seed)
    tokens = list(vocab)
    while len(vocab) < GPT2_VOCAB - 1:
        a, b = rng.choice(tokens), rng.choice(tokens)
        if b.startswith("Ġ") or len(a) + len(b) > 12 or a + b in vocab:
            continue
        vocab[a + b] = len(vocab)
        tokens.append(a + b)
        kept.append((a, b))
    vocab[EOT] = GPT2_VOCAB - 1
    atomic_write_json(out_dir / "encoder.json", vocab)
    atomic_write_text(out_dir / "vocab.bpe", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept))
    return out_dir


def llama_tokenizer(seed: int = 0) -> "PreTrainedTokenizerFast":  # noqa: F821
    """A Llama-shaped tokenizer stand-in: <unk>/<s>/</s> = 0/1/2, 256 byte-fallback tokens, 32000 base ids,
    then <image> = 32000 and <pad> = 32001 as in llava-1.5-7b-hf."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer)
    model = json.loads(tok.to_str())
    vocab = model["model"]["vocab"]
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(vocab) < 32000:  # unreachable by encoding, but decodable: random generations print words
        word = "▁" + "".join(rng.choice(letters) for _ in range(rng.randint(2, 8)))
        if word not in vocab:
            vocab[word] = len(vocab)
    model["model"]["vocab"] = vocab
    tok = Tokenizer.from_str(json.dumps(model))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=4096, extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"pad_token": "<pad>"})
    assert fast.convert_tokens_to_ids("<image>") == 32000 and fast.pad_token_id == 32001, "llama stand-in ids"
    fast.add_bos_token = True
    return fast


# ----------------------------------------------------------------------------------------------- checkpoints


def write_gpt2_decoder(path: Path, seed: int = 0) -> Path:
    """GPT-2 small (124 M) random weights as the course's `decoder_model.bin`: GPT2Model keys, Conv1D layout."""
    import torch
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    model = GPT2Model(GPT2Config(vocab_size=GPT2_VOCAB, n_positions=1024, n_embd=768, n_layer=12, n_head=12))
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.rename(path)
    return path


def _save_safetensors(state: dict, path: Path, half: bool) -> None:
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: (v.to(torch.float16) if half and v.is_floating_point() else v).contiguous()
               for k, v in state.items()}, str(tmp))
    tmp.rename(path)


def write_timm_weights(name: str, path: Path, seed: int = 0, half: bool = False) -> Path:
    """Random weights of timm model `name` (full architecture, no head for CLIP towers) as safetensors."""
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    _save_safetensors(model.state_dict(), path, half)
    return path


def write_openai_clip(path: Path, seed: int = 0) -> Path:
    """CLIP ViT-B/32 (QuickGELU) random weights in OpenAI's state-dict layout (open_clip's native one), fp16."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.rename(path)
    return path


def llava_config(tokenizer: Any) -> "LlavaConfig":  # noqa: F821
    """llava-1.5-7b-hf's configuration with LLAVA_TEXT_LAYERS / LLAVA_VISION_LAYERS blocks."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=LLAVA_VISION_LAYERS,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=LLAVA_TEXT_LAYERS, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, rope_theta=10000.0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                       vision_feature_select_strategy="default", vision_feature_layer=-2,
                       projector_hidden_act="gelu", pad_token_id=tokenizer.pad_token_id)


def write_llava(out_dir: Path, seed: int = 0) -> Path:
    """An HF LLaVA directory at llava-1.5-7b-hf's widths (fewer layers), fp16 safetensors, with its processor."""
    import torch
    from transformers import CLIPImageProcessor, GenerationConfig, LlavaForConditionalGeneration

    from captionlab.models.llava_train import build_processor

    tokenizer = llama_tokenizer(seed)
    config = llava_config(tokenizer)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlavaForConditionalGeneration(config).to(torch.float16)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=tokenizer.pad_token_id)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3, do_convert_rgb=True)
    processor = build_processor(tokenizer, image_processor, patch_size=14)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
