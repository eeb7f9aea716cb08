"""Zero-shot captioning with LLaVA (HF `LlavaForConditionalGeneration` + `AutoProcessor`).

One code path for `llava-hf/llava-1.5-7b-hf` (hub cache) and any local HF LLaVA directory, such as the demo
world's tiny LLaVA (`captionlab.demo.ensure_model("llava")`):

    captioner = load_llava("llava-hf/llava-1.5-7b-hf")            # bf16 on GPU, fp32 on CPU
    captions = captioner.caption(images, "Write a one-sentence caption.", {"num_beams": 3})
    captioner.decoding_backend(captioner.generation_config({"num_beams": 3}))   # "ours" (see below)
    preds = captioner.caption_folder("p1_data/images/val", prompt)  # {stem: caption}
    table = run_prompt_study(captioner, images_dir, "p1_data/val.json", prompts, configs, "runs/prompts")

Decoding is driven by a `GenerationConfig`. Greedy search (max_new_tokens, repetition_penalty, min_new_tokens)
and beam search (num_beams, length_penalty) run through `captionlab.decode`'s batched KV-cache loop with
`HFDecoder`, which `make bench` (llava_decode rows) measured faster than HF `generate` on the demo LLaVA and on
a 576-image-token LLaVA; it yields HF generate's tokens. Everything else (sampling, beam search with a repetition
penalty, which HF applies to log-probabilities, no_repeat_ngram_size, several eos ids, ...) goes to HF
`generate` with the same config.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from captionlab.errors import ConfigError, DataError
from captionlab.models.specs import parse_spec

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
DEFAULT_PROMPT = "Write a one-sentence caption for this image."
EMPTY_CAPTION = "an image"
# Generation keys callers may pass besides GenerationConfig's own: the seed for sampling.
_NOT_GENERATION = ("seed",)
# GenerationConfig fields our loop may see with any value (ids it reads or bookkeeping it does not need).
_LOOP_IGNORES = frozenset({"transformers_version", "pad_token_id", "bos_token_id", "eos_token_id", "use_cache",
                           "_from_model_config", "max_new_tokens", "num_beams", "repetition_penalty",
                           "length_penalty", "min_new_tokens", "return_dict_in_generate"})
_PREAMBLES = re.compile(
    r"^(?:(?:the|this) (?:image|picture|photo|photograph|scene) (?:shows|depicts|features|contains|is of|displays"
    r"|presents|captures)|in (?:the|this) (?:image|picture|photo)[, ]|(?:here is |here's )?(?:a |the )?caption:|"
    r"sure[,!.]?(?: here is a caption[:.]?)?)\s*",
    re.IGNORECASE,
)
_QUOTES = "\"'“”‘’`"


def postprocess_caption(reply: str) -> str:
    """One caption sentence from a chat reply: drop "ASSISTANT:", quotes and "The image shows", keep sentence one."""
    text = reply.split("ASSISTANT:")[-1] if "ASSISTANT:" in reply else reply
    text = " ".join(text.split())
    for _ in range(3):  # preambles and quotes can nest: 'Caption: "The image shows a dog."'
        text = _PREAMBLES.sub("", text.strip().strip(_QUOTES).strip())
    text = re.split(r"(?<=[.!?])\s+|\n", text, maxsplit=1)[0].strip().strip(_QUOTES).strip()
    text = text.rstrip(",;:")
    if not re.search(r"\w", text):
        return EMPTY_CAPTION
    return text[0].upper() + text[1:]


def _resolve_spec(spec: str | os.PathLike) -> str:
    """A local directory, or a hub id (loaded from the HF cache; offline it must be there)."""
    parsed = parse_spec(spec, allowed=("hf", "path", "hub"), what="LLaVA")
    path = Path(parsed.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: not an HF LLaVA directory (no config.json)")
        return str(path)
    if parsed.kind == "path":
        raise ConfigError(f"{spec}: LLaVA model directory not found")
    return parsed.name


def load_llava(spec: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, load_in_4bit: bool = False,
               attn_implementation: str | None = None) -> "LlavaCaptioner":
    """Load a LLaVA checkpoint (hub id or local dir) and its processor: bf16 on GPU (optionally 4-bit), fp32 on CPU."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from captionlab.utils import default_dtype, get_device

    name = _resolve_spec(spec)
    device = get_device(str(device) if device is not None else None)
    dtype = dtype or default_dtype(device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        if device.type != "cuda":
            raise ConfigError(f"{name}: 4-bit loading needs a CUDA device (got {device})")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"{name}: load_in_4bit needs bitsandbytes (pip install 'captionlab[gpu]')") from None
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=dtype)
    if device.type == "cuda":  # load straight onto the GPU (a 7B model would not fit twice in host memory)
        kwargs["device_map"] = {"": device.index or 0}
    try:
        processor = AutoProcessor.from_pretrained(name)
        model = LlavaForConditionalGeneration.from_pretrained(name, **kwargs)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set: download it into the hub cache first)" if offline else ""
        raise ConfigError(f"{name}: cannot load LLaVA checkpoint{hint}: {exc}") from None
    if device.type != "cuda":
        model = model.to(device)
    return LlavaCaptioner(model.eval(), processor)


class LlavaCaptioner:
    """A LLaVA model + processor that turns images and an instruction into one-sentence captions."""

    def __init__(self, model, processor) -> None:
        self.model = model
        self.processor = _configure_processor(processor, model.config)

    @property
    def device(self) -> torch.device:
        """Where inputs go (the device of the input embeddings)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def image_token_id(self) -> int:
        """Id of the `<image>` placeholder token in `input_ids` (one per image patch after expansion)."""
        return int(self.model.config.image_token_id)

    def chat_text(self, prompt: str, system: str | None = None) -> str:
        """The chat-template text for one image + instruction, ending with the generation prompt."""
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def prepare_inputs(self, images: Sequence, prompt: str | Sequence[str], system: str | None = None):
        """Model inputs (BatchFeature on the model's device, left-padded) for images and one prompt or one per image."""
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        texts = [self.chat_text(p, system) for p in prompts]
        inputs = self.processor(images=list(images), text=texts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def generation_config(self, generation: dict | Any | None = None) -> "GenerationConfig":  # noqa: F821
        """A GenerationConfig: the model's defaults updated by `generation` (dict or GenerationConfig)."""
        from transformers import GenerationConfig

        if isinstance(generation, GenerationConfig):
            return generation
        options = {k: v for k, v in (generation or {}).items() if k not in _NOT_GENERATION}
        unknown = sorted(k for k in options if not hasattr(GenerationConfig(), k))
        if unknown:
            raise ConfigError(f"generation: unknown option(s) {unknown} (see transformers.GenerationConfig)")
        base = self.model.generation_config.to_dict()
        tok = self.processor.tokenizer
        if base.get("pad_token_id") is None:
            base["pad_token_id"] = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        base.update({"max_new_tokens": 40, "do_sample": False, "num_beams": 1})
        for key in ("temperature", "top_p", "top_k"):  # model defaults meant for sampling only
            base.pop(key, None)
        base.update(options)
        config = GenerationConfig(**base)
        config.validate()
        return config

    @torch.inference_mode()
    def generate_replies(self, images: Sequence, prompt: str | Sequence[str], generation: dict | Any | None = None,
                         batch_size: int = 8, system: str | None = None) -> list[str]:
        """Raw decoded replies (new tokens only), generated in batches with left padding; sampling seeds
        torch with `generation["seed"]` (default 0) first."""
        config = self.generation_config(generation)
        seed = (generation or {}).get("seed", 0) if isinstance(generation, dict) else 0
        if config.do_sample:
            torch.manual_seed(int(seed))
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        replies: list[str] = []
        for i in range(0, len(images), batch_size):
            inputs = self.prepare_inputs(images[i:i + batch_size], prompts[i:i + batch_size], system)
            replies += self.processor.batch_decode(self.generate_tokens(inputs, config), skip_special_tokens=True)
        return replies

    def decoding_backend(self, config: "GenerationConfig") -> str:  # noqa: F821
        """`ours` when `config` is greedy / beam search our KV-cache loop implements exactly, else `hf`."""
        diff = config.to_diff_dict()
        eos = config.eos_token_id
        if isinstance(eos, list):
            eos = eos[0] if len(eos) == 1 else None
        checks = [
            not config.do_sample, eos is not None, config.max_new_tokens is not None,
            (config.num_beams or 1) >= 1,
            not config.no_repeat_ngram_size,
            config.num_return_sequences in (None, 1),
            config.early_stopping in (None, False),
            (config.num_beams or 1) == 1 or not config.min_new_tokens,
            # HF beam search applies the penalty to log-probabilities, our loop to logits: different beams
            (config.num_beams or 1) == 1 or config.repetition_penalty in (None, 1.0),
            config.min_length in (None, 0),
        ]
        benign = {"do_sample": False, "early_stopping": False, "no_repeat_ngram_size": 0, "num_return_sequences": 1,
                  "min_length": 0, "output_attentions": False, "output_hidden_states": False,
                  "output_scores": False, "output_logits": False}
        extra = [k for k, v in diff.items() if k not in _LOOP_IGNORES and not (k in benign and v == benign[k])
                 and not (k in ("temperature", "top_p", "top_k", "min_p", "typical_p") and not config.do_sample)]
        return "ours" if all(checks) and not extra else "hf"

    def generate_tokens(self, inputs: Any, config: "GenerationConfig") -> list[list[int]]:  # noqa: F821
        """New token ids per row for one prepared batch: our KV-cache loop or HF generate (`decoding_backend`)."""
        if self.decoding_backend(config) == "hf":
            out = self.model.generate(**inputs, generation_config=config)
            return out[:, inputs["input_ids"].shape[1]:].tolist()
        from captionlab.decode import HFDecoder, beam_search, greedy_search

        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        decoder = HFDecoder(self.model, inputs["input_ids"], inputs["attention_mask"], **extra)
        penalty = float(config.repetition_penalty or 1.0)
        if (config.num_beams or 1) == 1:
            return greedy_search(decoder, config.max_new_tokens, int(eos), repetition_penalty=penalty,
                                 min_new_tokens=int(config.min_new_tokens or 0))
        length_penalty = 1.0 if config.length_penalty is None else float(config.length_penalty)
        return beam_search(decoder, config.num_beams, config.max_new_tokens, int(eos), length_penalty=length_penalty,
                           repetition_penalty=penalty)

    def caption(self, images: Sequence, prompt: str | Sequence[str] = DEFAULT_PROMPT,
                generation: dict | Any | None = None, batch_size: int = 8, system: str | None = None) -> list[str]:
        """One caption sentence per image (greedy / beam / seeded sampling per `generation`)."""
        replies = self.generate_replies(images, prompt, generation, batch_size, system)
        return [postprocess_caption(r) for r in replies]

    def caption_folder(self, images_dir: str | os.PathLike, prompt: str = DEFAULT_PROMPT,
                       generation: dict | Any | None = None, batch_size: int = 8, system: str | None = None,
                       stems: Sequence[str] | None = None, desc: str = "llava") -> dict[str, str]:
        """Caption every image in `images_dir` (or only `stems`): {file stem: caption}."""
        from captionlab.data import list_images, load_image

        paths = list_images(images_dir)
        if stems is not None:
            by_stem = {Path(p).stem: p for p in paths}
            missing = [s for s in stems if s not in by_stem]
            if missing:
                raise DataError(f"{images_dir}: no image for {len(missing)} stems, e.g. {missing[:3]}")
            paths = [by_stem[s] for s in stems]
        if not paths:
            raise DataError(f"{images_dir}: no images found")
        out: dict[str, str] = {}
        for i in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch"):
            chunk = paths[i:i + batch_size]
            gen = generation
            if isinstance(generation, dict) and generation.get("do_sample"):  # a fresh, reproducible seed per batch
                gen = {**generation, "seed": int(generation.get("seed", 0)) + i}
            caps = self.caption([load_image(p) for p in chunk], prompt, gen, batch_size, system)
            out.update({Path(p).stem: c for p, c in zip(chunk, caps)})
        return out


def _configure_processor(processor, config):
    """Apply the transformers-5 LLaVA processor fixes: patch size, CLS accounting, strategy, left padding."""
    vision = config.vision_config
    if getattr(processor, "patch_size", None) is None:
        processor.patch_size = vision.patch_size
    if getattr(processor, "vision_feature_select_strategy", None) is None:
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
    if vision.model_type == "clip_vision_model" and not getattr(processor, "num_additional_image_tokens", 0):
        processor.num_additional_image_tokens = 1  # CLIP's CLS: otherwise 575 image tokens for 576 features
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.unk_token or processor.tokenizer.eos_token
    return processor


# ----------------------------------------------------------------------------- prompt study


def _subset(captions: "CaptionSet", stems: list[str]) -> "CaptionSet":  # noqa: F821
    """The annotations restricted to `stems` (the evaluator wants predictions for exactly its key set)."""
    from captionlab.data import CaptionSet

    return CaptionSet(captions={s: captions.captions[s] for s in stems},
                      file_names={s: captions.file_names[s] for s in stems},
                      image_ids={s: captions.image_ids[s] for s in stems}, path=captions.path)


def run_prompt_study(captioner: LlavaCaptioner, images_dir: str | os.PathLike, annotations: Any,
                     prompts: list[str], configs: dict[str, dict], out_dir: str | os.PathLike,
                     clip: str | None = None, limit: int | None = None, batch_size: int = 8,
                     system: str | None = None, state: Any | None = None) -> "pd.DataFrame":  # noqa: F821
    """Caption `images_dir` for every prompt x generation config; score CIDEr + CLIPScore; table sorted by CIDEr.

    `annotations` is a course annotation JSON (or CaptionSet); `limit` keeps its first `limit` images (sorted by
    stem); `clip` is the CLIP spec for CLIPScore (None: CLIPScore is not computed).

    Writes `{out_dir}/{prompt_idx}_{config}.json` (predictions), `{prompt_idx}_{config}.generation_config.json`
    (GenerationConfig.save_pretrained) and `prompt_study.{csv,json}`.
    `state` (`captionlab.parallel.process_state()` under accelerate launch / torchrun): each process captions its
    shard of the images; the main process merges, scores and writes; every process returns the same table.
    """
    from captionlab.parallel import gather_objects, gather_predictions, is_main, shard
    import pandas as pd

    from captionlab.data import CaptionSet, load_captions, save_predictions
    from captionlab.metrics import evaluate
    from captionlab.utils import atomic_path, atomic_write_json, run_metadata

    if not prompts or not configs:
        raise ConfigError("prompt study: need at least one prompt and one generation config")
    bad = [name for name in configs if not re.fullmatch(r"[A-Za-z0-9_.-]+", name)]
    if bad:
        raise ConfigError(f"prompt study: config names must be file-name safe, got {bad}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    captions = annotations if isinstance(annotations, CaptionSet) else load_captions(annotations)
    stems = sorted(captions.stems)[:limit]
    captions = _subset(captions, stems)
    rows = []
    for p_idx, prompt in enumerate(prompts):
        for name, gen in configs.items():
            tag = f"{p_idx}_{name}"
            config = captioner.generation_config(gen)
            t0 = time.time()
            mine = shard(stems, state)
            preds = captioner.caption_folder(images_dir, prompt, gen, batch_size, system, stems=mine,
                                             desc=tag) if mine else {}
            preds = gather_predictions(preds, state)
            seconds = time.time() - t0
            if not is_main(state):
                continue
            save_predictions(out_dir / f"{tag}.json", preds)
            config.save_pretrained(out_dir, config_file_name=f"{tag}.generation_config.json")
            summary = evaluate(preds, captions, images_dir, clip=clip, metrics=("CIDEr", "CLIPScore")).summary
            rows.append({"prompt_idx": p_idx, "prompt": prompt, "config": name,
                         "CIDEr": summary.get("CIDEr"), "CLIPScore": summary.get("CLIPScore"),
                         "mean_words": sum(len(c.split()) for c in preds.values()) / len(preds),
                         "n_images": len(preds), "seconds": round(seconds, 2)})
    if not is_main(state):  # the main process scored and wrote everything: take its table
        return pd.DataFrame([r for part in gather_objects(None, state) if part for r in part])
    table = pd.DataFrame(rows).sort_values("CIDEr", ascending=False, kind="stable").reset_index(drop=True)
    if state is not None and state.num_processes > 1:
        gather_objects(table.to_dict(orient="records"), state)
    with atomic_path(out_dir / "prompt_study.csv") as tmp:
        table.to_csv(tmp, index=False)
    atomic_write_json(out_dir / "prompt_study.json", {
        "results": table.to_dict(orient="records"),
        "metadata": run_metadata({"prompts": prompts, "configs": configs, "images_dir": str(images_dir),
                                  "annotations": str(captions.path), "clip": clip, "limit": limit,
                                  "model": getattr(captioner.model, "name_or_path", None), "system": system}),
    })
    return table
