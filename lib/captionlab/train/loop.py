"""Training loop for the PEFT captioner (HF accelerate): cached encoder features, cosine schedule, per-epoch
validation (CIDEr, optionally CLIPScore), best-checkpoint keeping and exact resume.

Batching is defined globally so results do not depend on the number of processes or on gradient accumulation:
each optimizer step takes `batch_size` (image, caption) pairs from a per-epoch permutation seeded by
(seed, epoch); every process takes its slice of each micro-step, and the loss is the token sum divided by the
global batch's token count, so gradients equal those of one process seeing the whole batch.

Launch on several CPU processes with `accelerate launch --multi_gpu --num_processes 2 --num_machines 1
--mixed_precision no --dynamo_backend no -m captionlab.cli.train --params ...` and ACCELERATE_USE_CPU=1.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from captionlab.errors import ConfigError
from captionlab.models.captioner import Captioner, CaptionerConfig
from captionlab.models.dropout import micro_batch_generator, micro_batch_rng, seed_dropout
from captionlab.train.checkpoints import (latest_checkpoint, load_state, rng_state, save_checkpoint, save_dir_atomic,
                                          set_rng_state)
from captionlab.train.config import TrainConfig
from captionlab.train.data import CaptionData, epoch_order, evaluate_captions, load_split, most_common_caption
from captionlab.utils import atomic_write_json, cpu_cores, set_seed, thread_pool


# ------------------------------------------------------------------------------------------- helpers


def _optimizer(model: Captioner, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach: one multi-tensor update per step instead of one per parameter (torch uses it by default on CUDA only)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, foreach=True)


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if cfg.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    if cfg.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
    raise ConfigError(f"train.schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    mp = cfg.mixed_precision
    if mp == "auto":
        forced_bf16 = os.environ.get("CAPTIONLAB_DTYPE", "").strip() == "bfloat16"  # the rehearsal's bf16 run
        mp = "bf16" if torch.cuda.is_available() or forced_bf16 else "no"
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    _release_single_process_state(mp)
    return Accelerator(cpu=cpu, mixed_precision=mp)


def _release_single_process_state(mixed_precision: str) -> None:
    """Let a second training in one process (a notebook, a test session) use another mixed precision.

    accelerate keeps one process-wide state and refuses a different `mixed_precision` later; in a single,
    non-distributed process nothing else depends on it, so it is reset. A distributed launch is left alone.
    """
    from accelerate.state import AcceleratorState, PartialState

    if not AcceleratorState._shared_state or PartialState().num_processes > 1:
        return
    if str(AcceleratorState().mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=True)


def side_by_side(cfg: TrainConfig) -> int:
    """Threads for independent pieces of CPU work (a step's micro-batches, caption batches): `cfg.micro_threads`,
    or for 0 this process's share of the cores it may run on (over torch's thread count, and over the attempts the
    warm worker server runs now: `captionlab.workers.concurrent_jobs`, read at each call); 1 on a GPU."""
    from captionlab.workers import concurrent_jobs

    if torch.cuda.is_available():
        return 1
    if cfg.micro_threads > 0:
        return cfg.micro_threads
    return max(1, cpu_cores() // (max(torch.get_num_threads(), 1) * concurrent_jobs()))


def micro_threads(cfg: TrainConfig, acc: Any) -> int:
    """Threads that compute a step's `grad_accum` micro-batches side by side (`side_by_side`, at most grad_accum):
    on a CPU, in a single process without a grad scaler or autocast; else 1. The result does not depend on it: each
    micro-batch has its own dropout generator, and the gradients are summed in micro-batch order, as sequential
    accumulation sums them."""
    if cfg.grad_accum < 2 or acc.num_processes > 1 or acc.device.type != "cpu" or str(acc.mixed_precision) != "no":
        return 1
    return max(1, min(side_by_side(cfg), cfg.grad_accum))


# ------------------------------------------------------------------------------------------- training


def train(captioner_cfg: CaptionerConfig, train_cfg: TrainConfig, data_root: str | os.PathLike,
          on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train the captioner's projector + PEFT weights; return the history (also written to out_dir).

    `on_step(step, loss)` is called after every optimizer step (logging, or raising to stop a run).
    """
    threads = torch.get_num_threads()
    if train_cfg.cpu_threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(train_cfg.cpu_threads)
    try:
        return _train(captioner_cfg, train_cfg, Path(data_root), on_step)
    finally:
        torch.set_num_threads(threads)


def _train(captioner_cfg: CaptionerConfig, train_cfg: TrainConfig, data_root: Path,
           on_step: Callable[[int, float], None] | None) -> dict[str, Any]:
    from captionlab.models.features import cached_features

    cfg = train_cfg
    out_dir = Path(cfg.out_dir)
    acc = _accelerator(cfg)
    world, rank = acc.num_processes, acc.process_index
    micro = cfg.batch_size // (world * cfg.grad_accum)
    if micro * world * cfg.grad_accum != cfg.batch_size or micro == 0:
        raise ConfigError(f"train.batch_size={cfg.batch_size} must be a positive multiple of "
                          f"processes ({world}) x grad_accum ({cfg.grad_accum})")

    set_seed(cfg.seed)  # same initial LoRA / projector weights on every process
    model = Captioner(captioner_cfg, verbose=acc.is_main_process)
    seed_dropout(model)  # dropout masks drawn per micro-batch: the same however micro-batches are run
    train_data = load_split(data_root, "train", cfg.train_images)
    val_data = load_split(data_root, "val", cfg.eval_images) if cfg.eval_images >= 0 else None
    tokens, lengths = _token_matrix(model.caption_token_ids(train_data.pair_caption),  # [bos] caption [eos]
                                    model.tokenizer.pad_token_id)
    n_targets = lengths - 1

    feats = val_feats = None
    if cfg.cache_features:
        model.encoder.to(acc.device)
        feats = cached_features(model.encoder, captioner_cfg.encoder, train_data.image_paths, dtype=cfg.feature_dtype)
        if val_data is not None:
            val_feats = cached_features(model.encoder, captioner_cfg.encoder, val_data.image_paths,
                                        dtype=cfg.feature_dtype)

    n_pairs = len(tokens)
    steps_per_epoch = n_pairs // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size={cfg.batch_size} exceeds the {n_pairs} training pairs")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)

    optimizer = _optimizer(model, cfg)
    scheduler = _scheduler(optimizer, cfg, total_steps)
    model, optimizer = acc.prepare(model, optimizer)
    core: Captioner = acc.unwrap_model(model)

    history: dict[str, Any] = {"world_size": world, "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                               "trainable": core.report, "steps": [], "epochs": [], "best": None,
                               "baseline": None, "config": {"captioner": asdict(captioner_cfg), "train": asdict(cfg)}}
    step, start_epoch, skip = 0, 0, 0
    torch.manual_seed(cfg.seed + 7919 * (rank + 1))  # per-process dropout stream
    ckpt = latest_checkpoint(out_dir) if cfg.resume else None
    if ckpt is not None:
        from safetensors.torch import load_file

        state = load_state(ckpt)
        if state["world_size"] != world:
            raise ConfigError(f"{ckpt}: saved with {state['world_size']} processes, resuming with {world}")
        core.load_trainable(load_file(str(ckpt / "trainable.safetensors")), source=str(ckpt))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][rank])
        step, history = state["step"], json.loads(state["history"])
        start_epoch, skip = divmod(step, steps_per_epoch)
        if acc.is_main_process:
            print(f"resumed from {ckpt} at step {step}")
    if val_data is not None and history["baseline"] is None and acc.is_main_process:
        history["baseline"] = _baseline(train_data, val_data, data_root)

    def checkpoint() -> None:
        rng = [None] * world
        if world > 1:
            torch.distributed.all_gather_object(rng, rng_state())
        else:
            rng = [rng_state()]
        if acc.is_main_process:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
                     "step": step, "world_size": world, "history": json.dumps(history)}
            save_checkpoint(out_dir, step, core.save_trainable, state, cfg.keep_checkpoints)
            atomic_write_json(out_dir / "history.json", history)
        acc.wait_for_everyone()

    def micro_inputs(batch: torch.Tensor, a: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Token ids, mask and image inputs of this process's part of micro-batch `a` of a step's batch."""
        lo = (a * world + rank) * micro
        idx = batch[lo:lo + micro]
        n = lengths[idx]
        ids = tokens[idx, :int(n.max())]
        mask = (torch.arange(ids.shape[1]) < n[:, None]).long()
        idx = idx.tolist()
        img = [train_data.pair_image[i] for i in idx]
        if feats is not None:
            return ids, mask, {"features": feats[img]}
        return ids, mask, {"pixel_values": core._pixels([train_data.image_paths[i] for i in img])}

    def micro_grads(batch: torch.Tensor, a: int, denom: float,
                    step: int) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """(loss sum, gradients of the trainable parameters) of micro-batch `a`, accumulated nowhere (one process)."""
        ids, mask, inputs = micro_inputs(batch, a)
        with micro_batch_rng(micro_batch_generator(cfg.seed, step, a)):
            loss_sum = model(ids, mask, reduction="sum", **inputs)
        return loss_sum.detach(), torch.autograd.grad(loss_sum * world / denom, trainable, allow_unused=True)

    trainable = [p for p in model.parameters() if p.requires_grad]
    threads = micro_threads(cfg, acc)
    pool = thread_pool(threads) if threads > 1 else None
    if pool is not None and acc.is_main_process:
        print(f"{cfg.grad_accum} micro-batches per step, {threads} side by side")
    model.train()
    for epoch in range(start_epoch, epochs):
        order = epoch_order(n_pairs, cfg.seed, epoch)
        t0, c0, losses = time.time(), time.process_time(), []
        first = skip if epoch == start_epoch else 0
        last = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
        bar = tqdm(range(first, last), desc=f"epoch {epoch + 1}/{epochs}", disable=not acc.is_main_process,
                   leave=False)
        for s in bar:
            if cfg.micro_threads == 0:  # this process's share of the cores, step by step (side_by_side)
                threads = micro_threads(cfg, acc)
                pool = thread_pool(threads) if threads > 1 else None
            batch = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            denom = float(n_targets[batch].sum())
            step_loss = torch.zeros((), device=acc.device)
            if pool is not None:  # the micro-batches side by side; their gradients summed in micro-batch order
                results = list(pool.map(micro_grads, [batch] * cfg.grad_accum, range(cfg.grad_accum),
                                        [denom] * cfg.grad_accum, [step] * cfg.grad_accum))
                for p, grads in zip(trainable, zip(*(g for _, g in results))):
                    total = None
                    for g in grads:
                        if g is not None:
                            total = g if total is None else total + g
                    p.grad = total
                for loss_sum, _ in results:
                    step_loss += loss_sum / denom
            else:
                for a in range(cfg.grad_accum):
                    ids, mask, inputs = micro_inputs(batch, a)
                    sync = contextlib.nullcontext() if a == cfg.grad_accum - 1 else acc.no_sync(model)
                    with sync, micro_batch_rng(micro_batch_generator(cfg.seed, step, a * world + rank)):
                        loss_sum = model(ids, mask, reduction="sum", **inputs)
                        acc.backward(loss_sum * world / denom)
                    step_loss += loss_sum.detach() / denom
            if cfg.max_grad_norm > 0:
                acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = float(acc.reduce(step_loss, reduction="sum"))
            losses.append(loss_value)
            history["steps"].append({"step": step, "epoch": epoch, "loss": loss_value,
                                     "lr": scheduler.get_last_lr()[0]})
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)  # redrawn at tqdm's pace, not every step
            if on_step is not None:
                on_step(step, loss_value)
            if cfg.save_every_steps > 0 and step % cfg.save_every_steps == 0 and s + 1 < last:
                checkpoint()
        record = {"epoch": epoch + 1, "step": step, "train_loss": sum(losses) / max(len(losses), 1),
                  "epoch_seconds": round(time.time() - t0, 3),
                  "epoch_cpu_seconds": round(time.process_time() - c0, 3), "steps_run": len(losses)}
        if val_data is not None and acc.is_main_process:
            t1 = time.time()
            preds = validate(core, val_data, val_feats, cfg, threads=side_by_side(cfg) if world == 1 else 1)
            record["val"] = evaluate_captions(preds, val_data, data_root, "val",
                                              clip=cfg.clip if cfg.clipscore else None)
            record["eval_seconds"] = round(time.time() - t1, 3)
            record["examples"] = dict(list(preds.items())[:3])
            best = history["best"]
            if best is None or record["val"]["CIDEr"] > best["CIDEr"]:
                history["best"] = {"epoch": epoch + 1, "step": step, "CIDEr": record["val"]["CIDEr"],
                                   "dir": str(out_dir / "best")}
                save_dir_atomic(out_dir, "best", core.save_trainable)
            print(f"epoch {epoch + 1}: loss {record['train_loss']:.3f}, val " +
                  ", ".join(f"{k} {v:.3f}" for k, v in record["val"].items()))
        history["epochs"].append(record)
        checkpoint()
    if acc.is_main_process:
        atomic_write_json(out_dir / "history.json", history)
    acc.wait_for_everyone()
    if acc.device.type != "cpu":  # on a CPU, refcounting frees it; free_memory's gc.collect costs 0.2 s in a worker
        acc.free_memory()
    return history


_BASELINES: dict[tuple[str, ...], dict[str, Any]] = {}


def _baseline(train_data: CaptionData, val_data: CaptionData, data_root: Path) -> dict[str, Any]:
    """The most-common-caption baseline's validation scores; once per process and data (02's attempts share it)."""
    base = most_common_caption(train_data)
    key = (str(data_root), base, json.dumps(val_data.references, sort_keys=True))
    if key not in _BASELINES:
        _BASELINES[key] = {"caption": base, **evaluate_captions({s: base for s in val_data.stems}, val_data,
                                                                 data_root, "val")}
    return dict(_BASELINES[key])


def _token_matrix(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows right-padded with `pad_id` in one (N, max length) tensor, and their lengths; a micro-batch's ids are
    `matrix[idx, :lengths[idx].max()]`."""
    lengths = torch.tensor([len(r) for r in rows])
    matrix = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    matrix[torch.arange(matrix.shape[1]) < lengths[:, None]] = torch.tensor([t for r in rows for t in r])
    return matrix, lengths


def validate(model: Captioner, data: CaptionData, features: Any, cfg: TrainConfig, threads: int = 1) -> dict[str, str]:
    """Captions {stem: caption} for the validation images (cached features when given)."""
    if features is not None:
        caps = model.generate(features=features[list(range(len(data.stems)))], method=cfg.eval_method,
                              beam_size=cfg.eval_beam_size, threads=threads)
    else:
        caps = model.generate(data.image_paths, method=cfg.eval_method, beam_size=cfg.eval_beam_size,
                              threads=threads)
    return dict(zip(data.stems, caps))


