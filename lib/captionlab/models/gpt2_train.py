"""The demo world's "pretrained" decoder: a tiny GPT-2 language model trained on the p2 train captions.

Writes an HF GPT2LMHeadModel + fast tokenizer (save_pretrained), the course files `decoder_model.bin`
(GPT2Model state dict, Conv1D layout, keys without `transformer.`), `encoder.json` + `vocab.bpe`, and
`train_log.json` (val perplexity, losses, settings). Deterministic given the seed.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from captionlab.errors import DataError
from captionlab.utils import atomic_write_json, set_seed

EOS = "<|endoftext|>"
DEFAULTS: dict[str, Any] = dict(vocab_size=1024, n_embd=128, n_layer=4, n_head=4, n_positions=64,
                                steps=400, batch_size=32, lr=3e-3, warmup=30, weight_decay=0.01)


def read_captions(json_path: Path) -> list[str]:
    """All captions of a course-format annotation file, in file order."""
    try:
        data = json.loads(Path(json_path).read_text(encoding="utf-8"))
        return [str(a["caption"]).strip() for a in data["annotations"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{json_path}: cannot read captions ({type(exc).__name__}: {exc})") from None


def build_tokenizer(captions: list[str], vocab_size: int, out_dir: Path) -> Any:
    """Train a byte-level BPE on `captions`; return a GPT2TokenizerFast and write encoder.json + vocab.bpe."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(captions, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    tmp = Path(tempfile.mkdtemp(dir=out_dir))
    try:  # the course ships GPT-2's vocab.json / merges.txt as encoder.json / vocab.bpe
        bpe.save_model(str(tmp))
        shutil.move(tmp / "vocab.json", out_dir / "encoder.json")
        shutil.move(tmp / "merges.txt", out_dir / "vocab.bpe")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)


def _encode(tok: Any, captions: list[str], max_len: int) -> list[list[int]]:
    eos = tok.eos_token_id
    return [[eos] + ids[: max_len - 2] + [eos] for ids in tok(captions, add_special_tokens=False)["input_ids"]]


def _batch(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 on padding; the final eos is a target)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


@torch.no_grad()
def perplexity(model: torch.nn.Module, seqs: list[list[int]], pad: int, batch_size: int = 256) -> float:
    """exp(mean next-token NLL) over all target tokens of `seqs` (caption tokens and the closing eos)."""
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        ids, mask, labels = _batch(seqs[i: i + batch_size], pad)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                       ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
    return math.exp(nll / max(count, 1))


def train_tiny_gpt2(world_root: Path, out_dir: Path, seed: int, **overrides: Any) -> dict[str, Any]:
    """Train the demo GPT-2 LM on `world_root`'s p2 train captions into `out_dir`; return the training log."""
    hp = {**DEFAULTS, **overrides}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster on a shared CPU, and thread-count independent
    try:
        return _train(Path(world_root), Path(out_dir), seed, hp)
    finally:
        torch.set_num_threads(threads)


def _train(world_root: Path, out_dir: Path, seed: int, hp: dict[str, Any]) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    set_seed(seed)
    train_caps = read_captions(world_root / "p2_data" / "train.json")
    val_caps = read_captions(world_root / "p2_data" / "val.json")
    tok = build_tokenizer(train_caps, hp["vocab_size"], out_dir)
    train, val = _encode(tok, train_caps, hp["n_positions"]), _encode(tok, val_caps, hp["n_positions"])
    eos = tok.eos_token_id
    config = GPT2Config(vocab_size=len(tok), n_positions=hp["n_positions"], n_embd=hp["n_embd"],
                        n_layer=hp["n_layer"], n_head=hp["n_head"], bos_token_id=eos, eos_token_id=eos,
                        pad_token_id=eos, loss_type="ForCausalLM", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / hp["warmup"])
                                              * 0.5 * (1 + math.cos(math.pi * min(s, hp["steps"]) / hp["steps"])))
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    for step in tqdm(range(hp["steps"]), desc="tiny gpt2", leave=False):
        if len(order) < hp["batch_size"]:
            order += torch.randperm(len(train), generator=gen).tolist()
        idx, order = order[: hp["batch_size"]], order[hp["batch_size"]:]
        ids, mask, labels = _batch([train[i] for i in idx], eos)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(round(loss.item(), 4))
    val_ppl = perplexity(model, val, eos)
    model.eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    torch.save({k: v.contiguous() for k, v in model.transformer.state_dict().items()}, out_dir / "decoder_model.bin")
    log = {"seed": seed, "hyperparameters": hp, "vocab_size": len(tok), "train_captions": len(train),
           "val_captions": len(val), "val_perplexity": round(val_ppl, 4), "final_train_loss": losses[-1],
           "losses_every_50": losses[::50], "seconds": round(time.time() - t0, 1),
           "cpu_seconds": round(time.process_time() - c0, 1)}
    atomic_write_json(out_dir / "train_log.json", log)
    return log
