"""Side-by-side micro-batches: a step's `grad_accum` micro-batches computed in threads give exactly the weights of
sequential accumulation (dropout masks belong to the micro-batch, gradients are summed in micro-batch order), a
killed threaded run resumes exactly, and captions decoded in threads equal one-thread decoding."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from captionlab.models.captioner import WEIGHTS_NAME, CaptionerConfig, load_captioner
from captionlab.models.dropout import MicroBatchDropout, micro_batch_generator, micro_batch_rng, seed_dropout
from captionlab.train import TrainConfig, latest_checkpoint, train
from safetensors.torch import load_file


class Killed(Exception):
    pass


def _run(tiny: dict, root: Path, out: Path, threads: int, grad_accum: int = 2, dropout: float = 0.1,
         on_step=None, resume: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    cap = CaptionerConfig(encoder=tiny["encoder"], decoder=tiny["decoder"], lora_dropout=dropout)
    cfg = TrainConfig(train_images=16, eval_images=4, batch_size=16, grad_accum=grad_accum, max_steps=6, lr=3e-3,
                      save_every_steps=2, micro_threads=threads, out_dir=str(out), resume=resume)
    history = train(cap, cfg, root, on_step=on_step)
    return history, load_file(str(latest_checkpoint(out) / WEIGHTS_NAME))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_threaded_micro_batches_equal_sequential_accumulation(tiny_captioner_models, demo_world: Path,
                                                              tmp_path: Path, capsys) -> None:
    seq, w_seq = _run(tiny_captioner_models, demo_world, tmp_path / "seq", threads=1)
    assert "side by side" not in capsys.readouterr().out
    thr, w_thr = _run(tiny_captioner_models, demo_world, tmp_path / "thr", threads=2)
    assert "2 micro-batches per step, 2 side by side" in capsys.readouterr().out
    assert _same(w_seq, w_thr)
    assert [s["loss"] for s in thr["steps"]] == [s["loss"] for s in seq["steps"]]
    assert thr["epochs"][-1]["val"] == seq["epochs"][-1]["val"]
    # four micro-batches on two threads: still the sequential sums
    _, w4_seq = _run(tiny_captioner_models, demo_world, tmp_path / "seq4", threads=1, grad_accum=4)
    _, w4_thr = _run(tiny_captioner_models, demo_world, tmp_path / "thr4", threads=2, grad_accum=4)
    assert _same(w4_seq, w4_thr)
    # the comparison has teeth: dropout draws matter, and so does the split into micro-batches
    _, w_nodrop = _run(tiny_captioner_models, demo_world, tmp_path / "nodrop", threads=2, dropout=0.0)
    assert not _same(w_seq, w_nodrop)

    def kill_at_5(step: int, loss: float) -> None:
        if step == 5:  # after the step-4 checkpoint
            raise Killed

    with pytest.raises(Killed):
        _run(tiny_captioner_models, demo_world, tmp_path / "killed", threads=2, on_step=kill_at_5)
    resumed, w_resumed = _run(tiny_captioner_models, demo_world, tmp_path / "killed", threads=2, resume=True)
    assert _same(w_seq, w_resumed)
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in seq["steps"]]


def test_threaded_decoding_equals_one_thread(tiny_captioner_models, demo_world: Path, tmp_path: Path) -> None:
    _run(tiny_captioner_models, demo_world, tmp_path / "run", threads=2)
    model = load_captioner(tmp_path / "run" / "best")
    images = sorted((demo_world / "p2_data" / "images" / "val").glob("*.jpg"))[:10]
    for method in ("greedy", "beam"):
        one = model.generate(images, method=method, beam_size=2, max_new_tokens=8, batch_size=3)
        two = model.generate(images, method=method, beam_size=2, max_new_tokens=8, batch_size=3, threads=2)
        assert one == two and len(one) == 10
    model.train()  # the mode is restored after threaded decoding
    model.generate(images[:4], max_new_tokens=4, batch_size=2, threads=2)
    assert model.training


def test_micro_batch_dropout_masks_follow_the_generator_not_the_thread() -> None:
    from captionlab.models.decoder import GPT, GPTConfig

    x = torch.ones(4, 1000)
    drop = MicroBatchDropout(0.5).train()
    with micro_batch_rng(micro_batch_generator(0, 3, 1)):
        a = drop(x)
    out: list[torch.Tensor] = []

    def other_thread() -> None:
        with micro_batch_rng(micro_batch_generator(0, 3, 1)):
            out.append(drop(x))

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert torch.equal(a, out[0]) and set(a.unique().tolist()) == {0.0, 2.0}
    with micro_batch_rng(micro_batch_generator(0, 3, 2)):
        assert not torch.equal(drop(x), a)
    assert torch.equal(drop.eval()(x), x)  # eval: identity; outside a block: the global generator
    torch.manual_seed(1)
    b = drop.train()(x)
    torch.manual_seed(1)
    assert torch.equal(drop(x), b)

    # the decoder's own dropouts (residual, MLP, embeddings and attention weights) follow the generator too
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4, dropout=0.2)).train()
    assert seed_dropout(gpt) == 1 + 2 * 2  # embeddings + per block: attention residual, MLP
    ids = torch.randint(0, 50, (2, 10))
    runs = []
    for seed in (5, 5, 6):
        with micro_batch_rng(micro_batch_generator(seed, 0, 0)):
            runs.append(gpt(ids).logits)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    with micro_batch_rng(micro_batch_generator(5, 0, 0)):
        gpt.transformer.h[0].attn.dropout = 0.0  # without attention dropout the weights path changes the result
        assert not torch.equal(gpt(ids).logits, runs[0])
