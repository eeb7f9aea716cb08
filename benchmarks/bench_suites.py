"""The four benchmark sections (decode, train, eval, attention); each returns a list of row dicts.

Every section uses the library's own code paths; only the specs in `Setup` differ between the demo world (CPU)
and the real models (`--real params/dlcv2024.yaml`, GPU).
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bench_measure import measure, peak_memory_mb
from torch import Tensor


@dataclass
class Setup:
    device: torch.device
    data_root: Path
    encoder: str
    decoder: str
    clip: str
    llava: str
    quick: bool
    threads: int
    repeats: int = 3
    real: bool = False
    cross: dict[str, int] = field(default_factory=dict)  # cross-attention captioner options (cross_every, cross_dim)

    def sizes(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full


def _row(section: str, name: str, method: str, batch: int, n: int, res: dict[str, Any], unit: str,
         note: str = "", per: int | None = None) -> dict[str, Any]:
    """One result row; throughput = `per` (default n) items per median second."""
    items = n if per is None else per
    return {"section": section, "name": name, "method": method, "batch": batch, "n": n,
            "seconds": round(res["seconds"], 5), "times": res.get("times"), "throughput": round(items / res["seconds"], 3),
            "unit": unit, "peak_mem_mb": res.get("peak_mem_mb"), "note": note}


def _image_paths(s: Setup, split: str, n: int) -> list[Path]:
    from captionlab.data import load_captions

    caps = load_captions(s.data_root / "p2_data" / f"{split}.json")
    stems = caps.stems[:n]
    return [s.data_root / "p2_data" / "images" / split / caps.file_names[st] for st in stems]


def _captioner(s: Setup):
    from captionlab.models.captioner import Captioner, CaptionerConfig

    torch.manual_seed(0)
    cfg = CaptionerConfig(encoder=s.encoder, decoder=s.decoder, lora_rank=4)
    return Captioner(cfg, verbose=False).to(s.device).eval()


# ------------------------------------------------------------------------------------------- decode


class NoEos:
    """Wrap a decoder so eos can never be chosen: every method then generates exactly max_new_tokens."""

    def __init__(self, inner: Any, eos: int) -> None:
        self.inner, self.eos, self.batch_size = inner, eos, inner.batch_size
        self.penalty_context = getattr(inner, "penalty_context", None)

    def _ban(self, logits: Tensor) -> Tensor:
        logits[:, self.eos] = float("-inf")
        return logits

    def prefill(self) -> tuple[Tensor, Any]:
        logits, cache = self.inner.prefill()
        return self._ban(logits), cache

    def step(self, tokens: Tensor, cache: Any) -> tuple[Tensor, Any]:
        logits, cache = self.inner.step(tokens, cache)
        return self._ban(logits), cache

    def reorder_cache(self, cache: Any, index: Tensor) -> Any:
        return self.inner.reorder_cache(cache, index)

    def full_logits(self, generated: Tensor) -> Tensor:
        return self._ban(self.inner.full_logits(generated))


def hf_twin(gpt: torch.nn.Module) -> torch.nn.Module:
    """An HF GPT2LMHeadModel with the same weights as our GPT (Linear -> Conv1D: transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = gpt.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, layer_norm_epsilon=c.layer_norm_epsilon,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    conv = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {k: (v.t() if k.endswith(conv) else v) for k, v in gpt.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"hf_twin: missing {missing[:4]}, unexpected {unexpected[:4]}")
    hf.tie_weights()
    return hf.eval()


def bench_decode(s: Setup) -> list[dict[str, Any]]:
    """Images/s of greedy and beam-3: ours (KV cache, batched) vs naive reference vs HF generate."""
    from captionlab.decode import (
        PrefixLMDecoder,
        beam_search,
        greedy_search,
        reference_beam,
        reference_greedy,
    )
    from captionlab.models.decoder import load_decoder

    T = s.sizes(6, 20)
    batches = s.sizes([1, 4], [1, 16, 64])
    n_naive = s.sizes(2, 8)
    cap = _captioner(s)
    gpt, tok = load_decoder(s.decoder)
    gpt = gpt.to(s.device).eval()
    hf = hf_twin(gpt).to(s.device)
    eos = tok.eos_token_id
    with torch.no_grad():
        vis = cap.visual_embeds(pixel_values=cap._pixels(_image_paths(s, "val", max(batches))))
        bos = gpt.transformer.wte(torch.full((vis.shape[0], 1), tok.bos_token_id, device=s.device))
        embeds = torch.cat([vis, bos.to(vis.dtype)], dim=1)
    ones = torch.ones(embeds.shape[:2], dtype=torch.long, device=s.device)

    def ours(model: torch.nn.Module, x: Tensor, beams: int) -> list[list[int]]:
        dec = NoEos(PrefixLMDecoder(model, x, torch.ones(x.shape[:2], dtype=torch.long, device=x.device)), eos)
        return greedy_search(dec, T, eos) if beams == 1 else beam_search(dec, beams, T, eos)

    def naive(x: Tensor, beams: int) -> None:
        for i in range(x.shape[0]):
            dec = NoEos(PrefixLMDecoder(gpt, x[i:i + 1], torch.ones(1, x.shape[1], dtype=torch.long,
                                                                     device=x.device)), eos)
            reference_greedy(dec, T, eos) if beams == 1 else reference_beam(dec, beams, T, eos)

    @torch.no_grad()
    def hf_gen(x: Tensor, m: Tensor, beams: int) -> Tensor:
        return hf.generate(inputs_embeds=x, attention_mask=m, max_new_tokens=T, min_new_tokens=T, num_beams=beams,
                           do_sample=False, pad_token_id=eos, eos_token_id=eos)

    rows: list[dict[str, Any]] = []
    # sanity: ours and HF generate produce the same greedy tokens on these prefixes before we time them
    x = embeds[:min(4, len(embeds))]
    same = ours(gpt, x, 1) == hf_gen(x, ones[:len(x)], 1).tolist()
    if not same:
        print("WARNING: ours and HF generate disagree on greedy tokens")
    note = (f"{T} new tokens forced (eos banned), {embeds.shape[1]} prefix tokens; greedy tokens of ours == HF "
            f"generate on {len(x)} images: {same}")
    for beams, mname in ((1, "greedy"), (3, "beam3")):
        sub = embeds[:n_naive]
        res = measure(lambda sub=sub, beams=beams: naive(sub, beams), s.repeats, 1, s.device)
        rows.append(_row("decode", f"{mname} naive", "naive", 1, n_naive, res, "img/s",
                         f"reference_{'greedy' if beams == 1 else 'beam'}: batch 1, full recompute per step; "
                         f"timed on {n_naive} images, per-image throughput"))
        for bs in batches:
            x, m = embeds[:bs], ones[:bs]
            for label, fn in (("ours", lambda x=x, beams=beams: ours(gpt, x, beams)),
                              ("ours+lora", lambda x=x, beams=beams: ours(cap.decoder, x, beams)),
                              ("hf", lambda x=x, m=m, beams=beams: hf_gen(x, m, beams))):
                res = measure(fn, s.repeats, 1, s.device)
                rows.append(_row("decode", f"{mname} {label} b{bs}", label, bs, bs, res, "img/s", note))
    return rows


# -------------------------------------------------------------------------------------------- train


def bench_train(s: Setup) -> list[dict[str, Any]]:
    """Training samples/s with and without cached encoder features (same steps, median step time)."""
    import itertools
    import statistics
    import time

    from captionlab.models.captioner import CaptionerConfig
    from captionlab.train import TrainConfig, train

    steps, bs = s.sizes((3, 8), (16, 32))
    rows = []
    for conditioning, cached in itertools.product(("prefix", "cross"), (True, False)):
        cfg = CaptionerConfig(encoder=s.encoder, decoder=s.decoder, lora_rank=4, conditioning=conditioning,
                              **(s.cross if conditioning == "cross" else {}))
        stamps: list[float] = []
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            tc = TrainConfig(max_steps=steps, batch_size=bs, eval_images=-1, cache_features=cached, out_dir=tmp,
                             cpu_threads=s.threads, keep_checkpoints=1)
            if cached:  # build the feature cache outside the measurement (it is reused across runs)
                train(cfg, TrainConfig(**{**tc.__dict__, "max_steps": 1}), s.data_root)
            def on_step(step: int, loss: float, stamps: list[float] = stamps) -> None:
                stamps.append(time.perf_counter())

            mem = peak_memory_mb(lambda tc=tc, on_step=on_step: train(cfg, tc, s.data_root, on_step=on_step),
                                 s.device)
        steps_dt = [b - a for a, b in itertools.pairwise(stamps)]  # the first step (warm-up) is not timed
        med = statistics.median(steps_dt)
        res = {"seconds": med, "times": [round(t, 5) for t in steps_dt], "peak_mem_mb": None if mem is None else round(mem, 2)}
        name = ("cached features" if cached else "encoder every step") + ("" if conditioning == "prefix" else " (cross)")
        rows.append(_row("train", f"train {name}", "cached" if cached else "uncached", bs, bs, res, "samples/s",
                         f"{conditioning} conditioning; median of {len(steps_dt)} optimizer steps after 1 warm-up "
                         "step; memory = whole train() call"))
    return rows


# --------------------------------------------------------------------------------------------- eval


def bench_eval(s: Setup) -> list[dict[str, Any]]:
    """Captions/s of CIDEr (PTB tokenizer + CIDEr-D) and CLIPScore (image files + texts) at two set sizes."""
    from captionlab.data import load_captions
    from captionlab.metrics.cider import ngram_scores
    from captionlab.metrics.clipscore import clip_scores
    from captionlab.models.clip import load_clip

    ann = load_captions(s.data_root / "p2_data" / "train.json")
    img_dir = s.data_root / "p2_data" / "images" / "train"
    pairs = [(st, j) for j in range(max(len(c) for c in ann.captions.values()))
             for st in ann.stems if j < len(ann.captions[st])]  # one caption per image first, then the next...
    backend = load_clip(s.clip, device=s.device)
    rows = []
    for n in s.sizes([50, 200], [500, 5000]):
        chosen = pairs[:n]
        if len(chosen) < n:
            print(f"note: only {len(chosen)} (image, caption) pairs for eval size {n}")
        keys = [f"{st}#{j}" for st, j in chosen]
        preds = {k: ann.captions[st][j] for k, (st, j) in zip(keys, chosen)}
        refs = {k: [c for i, c in enumerate(ann.captions[st]) if i != j] or ann.captions[st]
                for k, (st, j) in zip(keys, chosen)}
        paths = [img_dir / ann.file_names[st] for st, _ in chosen]
        caps = [preds[k] for k in keys]
        note = "p2 train captions as predictions, the image's other captions as references"
        res = measure(lambda refs=refs, preds=preds: ngram_scores(refs, preds, ("CIDEr",)), s.repeats, 1, s.device)
        rows.append(_row("eval", f"CIDEr n={len(keys)}", "cider", len(keys), len(keys), res, "captions/s",
                         note + "; includes the Java PTB tokenizer"))
        res = measure(lambda paths=paths, caps=caps: clip_scores(backend, paths, caps), s.repeats, 1, s.device)
        rows.append(_row("eval", f"CLIPScore n={len(keys)}", "clipscore", len(keys), len(keys), res, "captions/s",
                         note + "; includes loading + encoding the image files"))
    return rows


# ----------------------------------------------------------------------------------------- attention


def bench_attention(s: Setup) -> list[dict[str, Any]]:
    """Captioning time / memory: plain generation vs one-layer capture vs every layer's attention."""
    from captionlab.attention.capture import (
        capture_captioner,
        capture_llava,
        gpt_attention_modules,
        gpt_capture,
    )
    from captionlab.data import load_image
    from captionlab.decode import PrefixLMDecoder, greedy_search
    from captionlab.models.llava import load_llava

    T = s.sizes(6, 20)
    n = s.sizes(2, 8)
    pil = [load_image(p) for p in _image_paths(s, "val", n)]
    rows = []
    note = f"{n} images in one batch, greedy, {T} new tokens forced"

    cap = _captioner(s)
    eos = cap.tokenizer.eos_token_id

    @torch.no_grad()
    def plain() -> list[list[int]]:
        vis = cap.visual_embeds(pixel_values=cap._pixels(pil))
        dec = PrefixLMDecoder(cap.decoder, vis, torch.ones(vis.shape[:2], dtype=torch.long, device=s.device),
                              bos_token_id=cap.tokenizer.bos_token_id)
        return greedy_search(dec, T, eos, min_new_tokens=T)

    def one_layer() -> Any:
        return capture_captioner(cap, pil, layer=-1, max_new_tokens=T, min_new_tokens=T, batch_size=n, progress=False)

    def all_layers() -> Any:  # what output_attentions=True keeps: every layer's full attention at every step
        kept: list[Tensor] = []
        hooks = {i: kept.append for i in range(len(gpt_attention_modules(cap.decoder)))}
        with gpt_capture(cap.decoder, hooks):
            plain()
        return kept

    for label, fn in (("plain", plain), ("capture 1 layer", one_layer), ("all layers", all_layers)):
        res = measure(fn, s.repeats, 1, s.device)
        rows.append(_row("attention", f"captioner {label}", label, n, n, res, "img/s", note))

    def llava_rows(name: str, llava: Any, eager: Any) -> None:
        prompt = "Describe the image."
        gen = llava.generation_config({"max_new_tokens": T, "min_new_tokens": T})
        inputs = lambda: llava.prepare_inputs(pil, prompt)

        @torch.no_grad()
        def lplain() -> Any:
            return llava.model.generate(**inputs(), generation_config=gen)

        def lone() -> Any:
            return capture_llava(llava, pil, prompt, layer=-1, max_new_tokens=T, batch_size=n, progress=False,
                                 generation={"min_new_tokens": T})

        gen_all = copy.deepcopy(gen)
        gen_all.output_attentions, gen_all.return_dict_in_generate = True, True

        @torch.no_grad()
        def lall() -> Any:
            return eager.model.generate(**inputs(), generation_config=gen_all)

        for label, fn in (("plain", lplain), ("capture 1 layer", lone), ("output_attentions", lall)):
            res = measure(fn, s.repeats, 1, s.device)
            rows.append(_row("attention", f"{name} {label}", label, n, n, res, "img/s", note))

    llava = load_llava(s.llava, device=s.device)
    eager = load_llava(s.llava, device=s.device, attn_implementation="eager")
    llava_rows("llava", llava, eager)
    if not s.real:  # a random LLaVA with llava-1.5's 576 image tokens (336 px, patch 14), smaller widths
        with tempfile.TemporaryDirectory(prefix="bench-llava576-") as tmp:
            path = build_llava576(Path(s.llava), Path(tmp))
            llava_rows("llava576", load_llava(path, device=s.device),
                       load_llava(path, device=s.device, attn_implementation="eager"))
    return rows


# ------------------------------------------------------------------------------------------ llava decode


def bench_llava_decode(s: Setup) -> list[dict[str, Any]]:
    """LLaVA replies/s, greedy and beam 3 at batch 1 / 8: our KV-cache loop (HFDecoder) vs HF generate, on the
    demo LLaVA and (demo world) a random LLaVA with llava-1.5's 576 image tokens."""
    from captionlab.data import load_image
    from captionlab.decode import HFDecoder, beam_search, greedy_search
    from captionlab.models.llava import load_llava

    T = s.sizes(4, 16)
    batches = s.sizes([1, 2], [1, 8])
    pil = [load_image(p) for p in _image_paths(s, "val", max(batches))]
    prompt = "Describe the image."
    rows: list[dict[str, Any]] = []

    def run_model(name: str, llava: Any) -> None:
        eos = llava.processor.tokenizer.eos_token_id

        def ours(inputs: Any, beams: int) -> list[list[int]]:
            extra = {"pixel_values": inputs["pixel_values"]}
            dec = NoEos(HFDecoder(llava.model, inputs["input_ids"], inputs["attention_mask"], **extra), eos)
            return greedy_search(dec, T, eos) if beams == 1 else beam_search(dec, beams, T, eos)

        def hf(inputs: Any, beams: int) -> list[list[int]]:
            gen = llava.generation_config({"max_new_tokens": T, "min_new_tokens": T, "num_beams": beams})
            out = llava.model.generate(**inputs, generation_config=gen)
            return out[:, inputs["input_ids"].shape[1]:].tolist()

        first = llava.prepare_inputs(pil[:2], prompt)
        with torch.no_grad():
            same = ours(first, 1) == hf(first, 1)
        note = f"{T} new tokens forced; greedy tokens of ours == HF generate on 2 images: {same}"
        for beams, mname in ((1, "greedy"), (3, "beam3")):
            for bs in batches:
                inputs = llava.prepare_inputs(pil[:bs], prompt)
                for label, fn in (("ours", ours), ("hf", hf)):
                    res = measure(torch.no_grad()(lambda fn=fn, inputs=inputs, beams=beams: fn(inputs, beams)),
                                  s.repeats, 1, s.device)
                    rows.append(_row("llava_decode", f"{name} {mname} {label} b{bs}", label, bs, bs, res,
                                     "img/s", note))

    run_model("llava", load_llava(s.llava, device=s.device))
    if not s.real:
        with tempfile.TemporaryDirectory(prefix="bench-llava576-") as tmp:
            run_model("llava576", load_llava(build_llava576(Path(s.llava), Path(tmp)), device=s.device))
    return rows


def build_llava576(demo_dir: Path, out: Path) -> Path:
    """Save a random LLaVA (CLIP ViT 336/14 -> 576 image tokens, 4-layer 256-wide Llama) with the demo tokenizer."""
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    base = LlavaConfig.from_pretrained(demo_dir)
    vision = base.vision_config.to_dict() | {"image_size": 336, "patch_size": 14}
    text = base.text_config.to_dict() | {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                                        "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 32,
                                        "max_position_embeddings": 1024}
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=base.image_token_index,
                      image_seq_length=576, vision_feature_layer=base.vision_feature_layer,
                      vision_feature_select_strategy=base.vision_feature_select_strategy,
                      projector_hidden_act=base.projector_hidden_act)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(out)
    proc = AutoProcessor.from_pretrained(demo_dir)
    proc.image_processor.size = {"shortest_edge": 336}
    proc.image_processor.crop_size = {"height": 336, "width": 336}
    proc.patch_size = 14
    proc.tokenizer.model_max_length = 4096
    proc.save_pretrained(out)
    gen = demo_dir / "generation_config.json"
    if gen.exists():
        (out / "generation_config.json").write_text(gen.read_text())
    return out


SECTIONS = {"decode": bench_decode, "train": bench_train, "eval": bench_eval, "attention": bench_attention,
            "llava_decode": bench_llava_decode}
