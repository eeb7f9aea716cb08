"""Shared session fixtures: the demo world and its tiny models, built once into $CAPTIONLAB_CACHE."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("CAPTIONLAB_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))


DEMO_MODEL_FIXTURES = {"demo_clip", "demo_gpt2", "demo_llava", "demo_captioner"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that need a trained demo model (built on first use: minutes on CPU) get the `demo_models` marker."""
    for item in items:
        if DEMO_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.demo_models)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Every demo model is tiny: one torch thread is faster and avoids oversubscribing a shared 2-core CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_world() -> Path:
    """Root of the full demo world (course layout), seed 0."""
    from captionlab.demo import ensure_world

    return ensure_world(0)


@pytest.fixture(scope="session")
def demo_clip(demo_world: Path) -> Path:
    """Directory of the tiny CLIP trained on the demo world (the tiny GPT-2 builds alongside on the other core)."""
    from captionlab.demo import ensure_models

    return ensure_models(["clip", "gpt2"], 0)["clip"]


@pytest.fixture(scope="session")
def demo_gpt2(demo_world: Path) -> Path:
    """Directory of the tiny GPT-2 LM trained on demo captions."""
    from captionlab.demo import ensure_model

    return ensure_model("gpt2", 0)


@pytest.fixture(scope="session")
def demo_llava(demo_world: Path) -> Path:
    """Directory of the tiny LLaVA trained on the demo world."""
    from captionlab.demo import ensure_model

    return ensure_model("llava", 0)


@pytest.fixture(scope="session")
def tiny_captioner_models(demo_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Untrained tiny HF CLIP vision tower (64 px, 4x4 patches) + GPT-2 (BPE on demo captions): captioner specs."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel,
                              PreTrainedTokenizerFast)

    from captionlab.data import load_captions

    out = tmp_path_factory.mktemp("tiny_captioner")
    texts = [c for caps in load_captions(demo_world / "p2_data" / "train.json").captions.values() for c in caps]
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=64, patch_size=16)).save_pretrained(out / "clip")
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(out / "clip")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(texts[:5000], trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                              show_progress=False))
    eos = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, bos_token=eos, pad_token=eos)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0))
    gpt.save_pretrained(out / "gpt2")
    tok.save_pretrained(out / "gpt2")
    return {"encoder": f"hfclip:{out / 'clip'}", "decoder": str(out / "gpt2"), "root": str(out)}


@pytest.fixture(scope="session")
def demo_captioner(demo_world: Path, demo_clip: Path, demo_gpt2: Path, tmp_path_factory: pytest.TempPathFactory):
    """A LoRA captioner (rank 4, <1 % of the decoder) trained 2 epochs on 2400 demo images: (history, best ckpt)."""
    from captionlab.models.captioner import CaptionerConfig
    from captionlab.train import TrainConfig, train

    out = tmp_path_factory.mktemp("demo_captioner")
    cap = CaptionerConfig(encoder=f"hfclip:{demo_clip}", decoder=str(demo_gpt2 / "decoder_model.bin"),
                          peft="lora", lora_rank=4, lora_dropout=0.0)
    cfg = TrainConfig(train_images=2400, eval_images=100, batch_size=32, epochs=2, lr=5e-3, warmup_steps=10,
                      out_dir=str(out))
    return train(cap, cfg, demo_world), out / "best"


@pytest.fixture(scope="session")
def rehearsal_world() -> Path:
    """Root of the rehearsal world (hw3_data-shaped photos + random-weight real-shape checkpoints; ~1 min once)."""
    from captionlab.data.rehearsal import ensure_rehearsal

    return ensure_rehearsal()
