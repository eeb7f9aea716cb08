"""Fine-tuning the demo CLIP's vision tower as a classifier on the demo classification split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from captionlab.models import vit


@pytest.mark.slow
def test_finetune_demo_clip_tower(demo_world: Path, demo_clip: Path) -> None:
    p1 = demo_world / "p1_data"
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = vit.load_vit(f"hfclip:{demo_clip}", num_classes=20)
    before = vit.evaluate_classifier(model, p1 / "val")  # random head: about chance (0.05 for 20 classes)
    history = vit.finetune_classifier(model, p1 / "train", p1 / "val", p1 / "id2label.json", epochs=1, lr=1e-3,
                                      batch_size=32, head_lr_mult=3.0, seed=0, device="cpu")
    print(f"\nval accuracy before fine-tuning {before:.3f}; after: {history}")
    assert [h["epoch"] for h in history] == [1]
    assert history[-1]["train_loss"] < 3.0  # below the untrained ln(20) = 3.0
    assert history[-1]["val_acc"] >= max(0.2, before + 0.1)
    assert vit.evaluate_classifier(model, p1 / "val") == pytest.approx(history[-1]["val_acc"])

    # the trained tower's position embeddings: right grid, every patch most similar to itself
    sim = vit.position_embedding_similarity(model)
    assert sim.shape == (8, 8, 8, 8)
    assert torch.equal(sim.reshape(64, 64).argmax(1), torch.arange(64))
    maps = vit.cls_attention(model, torch.randn(2, 3, 64, 64))
    assert maps.shape == (2, 8, 8) and torch.allclose(maps.sum((-1, -2)), torch.ones(2), atol=1e-5)
