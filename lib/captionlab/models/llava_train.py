"""The demo world's tiny LLaVA: tiny-CLIP vision tower + MLP projector + tiny Llama, trained in LLaVA's stages.

`train_tiny_llava(world_root, out_dir, seed)` is the demo builder registered in `captionlab.demo` as "llava".
It writes `LlavaForConditionalGeneration.save_pretrained` + `LlavaProcessor.save_pretrained`, so
`captionlab.models.llava.load_llava(out_dir)` loads it through exactly the code that loads llava-1.5-7b.

Training, in miniature (vision tower frozen throughout, as in LLaVA):
  stage 0  the "pretrained" LM: the tiny Llama learns caption language (text only; stands in for Vicuna),
  stage 1  feature alignment: projector only, image -> caption,
  stage 2  visual instruction tuning: projector + LM, several instruction phrasings, loss on answer tokens only.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from captionlab.utils import atomic_write_json, set_seed

log = logging.getLogger(__name__)

# The chat template of llava-hf/llava-1.5-*-hf: "USER: <image>\n{prompt} ASSISTANT:" (system text, if any, first).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
INSTRUCTIONS: tuple[str, ...] = (
    "Describe the image.",
    "Write a one-sentence caption.",
    "What is in this picture?",
    "Describe this image in one sentence.",
    "Caption the image.",
    "What do you see?",
)
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
IMAGE_TOKEN = "<image>"
# Words the prompt study and typical instructions use, so they tokenize into whole words.
_EXTRA_WORDS = (
    "USER: ASSISTANT: A chat between a curious human and an artificial intelligence assistant. "
    "Please give a short, accurate caption of the image in one sentence. Briefly describe the picture. "
    "What does this photo show? Summarize the scene. The image shows"
)


@dataclass
class TinyLlavaConfig:
    """Sizes and schedule of the demo LLaVA (defaults: about 1 CPU minute on the demo world).

    Steps (150, 200, 400), was (300, 300, 600): with the 64-wide tiny CLIP both schedules measured the same on the
    demo world (p1 val CIDEr 6.8x vs 6.6x the most common caption; best pointing 0.57 vs 0.55 on 40 val images)."""

    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 1000
    batch_size: int = 16
    steps: tuple[int, int, int] = (150, 200, 400)  # stage 0 (LM), 1 (projector), 2 (projector + LM)
    lr: tuple[float, float, float] = (3e-3, 3e-3, 2e-3)
    max_train_images: int | None = 2000
    threads: int = 1  # tiny matmuls: one thread is as fast, and results do not depend on the core count
    instructions: tuple[str, ...] = field(default=INSTRUCTIONS)


# ----------------------------------------------------------------------------- building blocks


def build_tokenizer(texts: list[str], vocab_size: int = 1000) -> "PreTrainedTokenizerFast":  # noqa: F821
    """A byte-level BPE tokenizer over `texts` with <s>, </s>, <pad>, <unk> and the <image> special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS["unk_token"], SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"],
                SPECIAL_TOKENS["pad_token"], IMAGE_TOKEN]
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens={"image_token": IMAGE_TOKEN},
                                   model_max_length=512, **SPECIAL_TOKENS)
    fast.padding_side = "left"
    return fast


def build_processor(tokenizer, image_processor, patch_size: int) -> "LlavaProcessor":  # noqa: F821
    """A LlavaProcessor configured as llava-1.5's (CLS counted then dropped: num_additional_image_tokens=1)."""
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_llava(vision_config, tokenizer, cfg: TinyLlavaConfig) -> "LlavaForConditionalGeneration":  # noqa: F821
    """A randomly initialised LlavaForConditionalGeneration: `vision_config` tower, MLP projector, tiny Llama."""
    from transformers import GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    n_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=n_patches,
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=32, do_sample=False)
    return model


def save_random_llava(out_dir: str | Path, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                      texts: list[str] | None = None) -> Path:
    """Write a tiny *random* LLaVA checkpoint (model + processor) to `out_dir`, for fast tests; return it."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    set_seed(seed)
    out_dir = Path(out_dir)
    texts = texts or ["a small red circle to the left of a large blue square .", *INSTRUCTIONS, _EXTRA_WORDS]
    tokenizer = build_tokenizer(texts, vocab_size=300)
    vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                                     projection_dim=32)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    cfg = TinyLlavaConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    model = build_llava(vision_config, tokenizer, cfg)
    model.save_pretrained(out_dir)
    build_processor(tokenizer, image_processor, patch_size).save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- training


def _vision_tower(world_root: Path, seed: int):
    """The demo tiny CLIP's vision transformer, its config and image processor (the frozen LLaVA vision tower)."""
    from transformers import AutoImageProcessor, CLIPModel

    from captionlab.demo import ensure_model

    clip_dir = ensure_model("clip", seed, root=world_root)
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    return clip.vision_model, clip.config.vision_config, AutoImageProcessor.from_pretrained(clip_dir)


@torch.no_grad()
def _vision_features(vision, image_processor, images: list, batch_size: int = 128) -> torch.Tensor:
    """LLaVA-1.5 image features: the penultimate vision layer without CLS, for every image (N, patches, D)."""
    feats = []
    for i in tqdm(range(0, len(images), batch_size), desc="llava: vision features", leave=False):
        pixels = image_processor(images=images[i:i + batch_size], return_tensors="pt")["pixel_values"]
        hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        feats.append(hidden[:, 1:].float())
    return torch.cat(feats)


def _pad_right(seqs: list[list[int]], pad_id: int, fill: int | None = None) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [pad_id if fill is None else fill] * (width - len(s)) for s in seqs])


def _answer_logits_only(batch: dict) -> dict:
    """`batch` with `logits_to_keep` set so the LM head projects only the trailing positions that predict a labelled
    token (the image and prompt positions are most of a sequence); the labels are cut to the same window. HF's
    causal-LM loss shifts within it, so the loss is the one over the full sequence."""
    labels = batch["labels"]
    width = labels.shape[1]
    first = int((labels != -100).int().argmax(1).min())  # earliest labelled position of any row
    keep = min(width, width - first + 1)  # from the position that predicts it
    return {**batch, "labels": labels[:, width - keep:], "logits_to_keep": keep}


def _train_stage(model, params, steps: int, lr: float, batch_fn, desc: str, gen: torch.Generator) -> float:
    """AdamW + warmup/cosine over `steps` batches from `batch_fn(gen)`; returns the mean loss of the last 10%."""
    from transformers import get_cosine_schedule_with_warmup

    model.requires_grad_(False)  # only this stage's parameters get gradients
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 20), steps)
    model.train()
    tail: list[float] = []
    bar = tqdm(range(steps), desc=desc, leave=False)
    for step in bar:
        loss = model(**_answer_logits_only(batch_fn(gen))).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step >= steps * 0.9:
            tail.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return sum(tail) / max(1, len(tail))


def train_tiny_llava(world_root: Path, out_dir: Path, seed: int = 0, cfg: TinyLlavaConfig | None = None) -> None:
    """Demo builder: train the tiny LLaVA on the demo world's p2 train captions and save it into `out_dir`."""
    cfg = cfg or TinyLlavaConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        _train(Path(world_root), Path(out_dir), seed, cfg)
    finally:
        torch.set_num_threads(threads)


def _train(world_root: Path, out_dir: Path, seed: int, cfg: TinyLlavaConfig) -> None:
    from captionlab.data import load_captions, load_image

    set_seed(seed)
    p2 = world_root / "p2_data"
    caps = load_captions(p2 / "train.json")
    stems = sorted(caps.captions)[: cfg.max_train_images]
    captions = [caps.captions[s] for s in stems]
    images = [load_image(p2 / "images" / "train" / caps.file_names[s]) for s in stems]

    vision, vision_config, image_processor = _vision_tower(world_root, seed)
    corpus = [c for cs in captions for c in cs] + list(cfg.instructions) + [_EXTRA_WORDS]
    tokenizer = build_tokenizer(corpus, cfg.vocab_size)
    processor = build_processor(tokenizer, image_processor, vision_config.patch_size)
    model = build_llava(vision_config, tokenizer, cfg)
    model.model.vision_tower.load_state_dict(vision.state_dict())  # frozen: only its features are used below
    feats = _vision_features(vision, image_processor, images)  # the tower is frozen: compute its features once

    eos, pad, img_id = tokenizer.eos_token_id, tokenizer.pad_token_id, model.config.image_token_id
    answers = [[tokenizer(" " + c, add_special_tokens=False)["input_ids"] + [eos] for c in cs] for cs in captions]
    prompts = [processor(images=images[:1], text=processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True),
    )["input_ids"][0] for p in cfg.instructions]
    n_img = feats.shape[1]
    if any(p.count(img_id) != n_img for p in prompts):
        raise RuntimeError(f"processor expands <image> to {prompts[0].count(img_id)} tokens, the vision tower gives "
                           f"{n_img} patch features (check patch_size / num_additional_image_tokens)")
    embed, projector = model.get_input_embeddings(), model.model.multi_modal_projector

    def pick(gen: torch.Generator) -> tuple[list[int], list[list[int]]]:
        idx = torch.randint(len(stems), (cfg.batch_size,), generator=gen).tolist()
        which = torch.randint(1 << 30, (cfg.batch_size,), generator=gen).tolist()
        return idx, [answers[i][w % len(answers[i])] for i, w in zip(idx, which)]

    def text_batch(gen: torch.Generator) -> dict:
        _, ans = pick(gen)
        seqs = [[tokenizer.bos_token_id] + a for a in ans]
        ids = _pad_right(seqs, pad)
        mask = _pad_right([[1] * len(s) for s in seqs], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    def image_batch(gen: torch.Generator) -> dict:
        idx, ans = pick(gen)
        which = torch.randint(len(prompts), (cfg.batch_size,), generator=gen).tolist()
        seqs = [prompts[w] + a for w, a in zip(which, ans)]
        labels = [[-100] * len(prompts[w]) + a for w, a in zip(which, ans)]
        ids = _pad_right(seqs, pad)
        mask = _pad_right([[1] * len(s) for s in seqs], 0)
        embeds = embed(ids)
        image_embeds = projector(feats[idx]).reshape(-1, embeds.shape[-1])
        embeds = embeds.masked_scatter((ids == img_id).unsqueeze(-1), image_embeds.to(embeds.dtype))
        return {"inputs_embeds": embeds, "attention_mask": mask, "labels": _pad_right(labels, -100)}

    gen = torch.Generator().manual_seed(seed)
    lm_params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    stages = {  # name: (trainable parameters, batches)
        "stage0_lm": (lm_params, text_batch),
        "stage1_projector": (list(projector.parameters()), image_batch),
        "stage2_instruct": (list(projector.parameters()) + lm_params, image_batch),
    }
    losses, seconds = {}, {}
    for (name, (params, batch_fn)), steps, lr in zip(stages.items(), cfg.steps, cfg.lr):
        t0 = time.perf_counter()
        losses[name] = _train_stage(model, params, steps, lr, batch_fn, f"llava {name}", gen)
        seconds[name] = round(time.perf_counter() - t0, 1)
    log.info("tiny llava losses: %s", losses)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    atomic_write_json(out_dir / "captionlab_train.json", {
        "seed": seed, "train_images": len(stems), "losses": {k: round(v, 4) for k, v in losses.items()},
        "seconds": seconds,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "image_tokens": n_img, "parameters": sum(p.numel() for p in model.parameters()),
    })
    if any(math.isnan(v) for v in losses.values()):
        raise RuntimeError(f"{out_dir}: tiny LLaVA training diverged (losses {losses})")
