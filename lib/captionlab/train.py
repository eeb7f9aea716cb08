"""Training loop for the PEFT captioner (HF accelerate): cached encoder features, cosine schedule, per-epoch
validation (CIDEr, optionally CLIPScore), best-checkpoint keeping and exact resume.

Batching is defined globally so results do not depend on the number of processes or on gradient accumulation:
each optimizer step takes `batch_size` (image, caption) pairs from a per-epoch permutation seeded by
(seed, epoch); every process takes its slice of each micro-step, and the loss is the token sum divided by the
global batch's token count, so gradients equal those of one process seeing the whole batch.

Launch on several CPU processes with `accelerate launch --multi_gpu --num_processes 2 --num_machines 1
--mixed_precision no --dynamo_backend no -m captionlab.train --params ...` and ACCELERATE_USE_CPU=1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from captionlab.errors import ConfigError
from captionlab.models.captioner import Captioner, CaptionerConfig
from captionlab.utils import dataclass_from_dict, atomic_write_json, set_seed

STATE_NAME = "train_state.pt"
LATEST_NAME = "latest.json"


@dataclass
class TrainConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    epochs: int = 1
    max_steps: int = 0  # > 0: stop after this many optimizer steps (the schedule spans them)
    batch_size: int = 32  # GLOBAL pairs per optimizer step (all processes x grad_accum micro-steps)
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant (both after a linear warmup)
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, none on CPU | bf16 | fp16 | no
    cache_features: bool = True
    feature_dtype: str = "float16"
    train_images: int = 0  # use the first N training images (0 = all)
    eval_images: int = 100  # validate on the first N val images (0 = all; -1 = no validation)
    eval_method: str = "greedy"
    eval_beam_size: int = 3
    clipscore: bool = False  # also CLIPScore during validation (needs metrics + `clip`)
    clip: str | None = None  # CLIP spec for CLIPScore
    save_every_steps: int = 0  # > 0: also checkpoint every N steps (always at each epoch end)
    keep_checkpoints: int = 1
    out_dir: str = "runs/captioner"
    resume: bool = False
    cpu_threads: int = 1  # torch threads when training on CPU (small matrices: 1 is fastest on a shared CPU; 0 = keep)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a mapping, rejecting unknown keys with a clear error."""
        return dataclass_from_dict(cls, d, "train")


# ------------------------------------------------------------------------------------------- data


@dataclass
class CaptionData:
    """One split as (image, caption) pairs: image paths, stems, captions, pair -> image index."""

    image_paths: list[Path]
    stems: list[str]
    references: dict[str, list[str]]
    pair_image: list[int]
    pair_caption: list[str]


def load_split(data_root: str | os.PathLike, split: str, max_images: int = 0) -> CaptionData:
    """Read p2_data/<split>.json and its images dir as caption pairs (first `max_images` images if > 0)."""
    from captionlab.data import load_captions

    root = Path(data_root) / "p2_data"
    cs = load_captions(root / f"{split}.json")
    stems = cs.stems[:max_images] if max_images > 0 else cs.stems
    paths = [cs.image_path(root / "images" / split, s) for s in stems]
    pair_image, pair_caption = [], []
    for i, s in enumerate(stems):
        for c in cs.captions[s]:
            pair_image.append(i)
            pair_caption.append(c)
    return CaptionData(paths, stems, {s: cs.captions[s] for s in stems}, pair_image, pair_caption)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the n training pairs for `epoch` (a pure function of seed and epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def most_common_caption(train: CaptionData) -> str:
    """The most frequent training caption (the trivial baseline's prediction for every image)."""
    return Counter(train.pair_caption).most_common(1)[0][0]


def cider(predictions: dict[str, str], references: dict[str, list[str]]) -> float:
    """CIDEr-D via pycocoevalcap on lower-cased, punctuation-stripped tokens (no Java needed)."""
    import re

    from pycocoevalcap.cider.cider import Cider

    def norm(s: str) -> str:
        return " ".join(re.findall(r"[a-z0-9]+", s.lower()))

    gts = {k: [norm(c) for c in references[k]] for k in predictions}
    res = {k: [norm(v) or "empty"] for k, v in predictions.items()}
    return float(Cider().compute_score(gts, res)[0])


def evaluate_captions(predictions: dict[str, str], data: CaptionData, data_root: Path, split: str,
                      clip: str | None = None) -> dict[str, float]:
    """CIDEr (course tokenization via captionlab.metrics when available) and CLIPScore when `clip` is given.

    Empty captions (an untrained model's) are scored as the word "empty" (the evaluator refuses empty strings).
    """
    predictions = {k: v if v.strip() else "empty" for k, v in predictions.items()}
    try:
        from captionlab.data import CaptionSet
        from captionlab.metrics.evaluate import evaluate
    except ImportError:
        return {"CIDEr": cider(predictions, data.references)}
    ann = CaptionSet(captions=data.references, file_names={s: p.name for s, p in zip(data.stems, data.image_paths)},
                     image_ids={s: i for i, s in enumerate(data.stems)})
    metrics = ("CIDEr", "CLIPScore") if clip else ("CIDEr",)
    summary = evaluate(predictions, ann, data_root / "p2_data" / "images" / split, clip=clip, metrics=metrics).summary
    return {k: float(summary[k]) for k in metrics if isinstance(summary.get(k), (int, float))}


# ------------------------------------------------------------------------------------------- helpers


def _optimizer(model: Captioner, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if cfg.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, total_steps)
    if cfg.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, cfg.warmup_steps)
    raise ConfigError(f"train.schedule must be 'cosine' or 'constant', got {cfg.schedule!r}")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    mp = cfg.mixed_precision
    if mp == "auto":
        forced_bf16 = os.environ.get("CAPTIONLAB_DTYPE", "").strip() == "bfloat16"  # the rehearsal's bf16 run
        mp = "bf16" if torch.cuda.is_available() or forced_bf16 else "no"
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    return Accelerator(cpu=cpu, mixed_precision=mp)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete training checkpoint under out_dir (via latest.json), or None."""
    pointer = Path(out_dir) / LATEST_NAME
    if not pointer.exists():
        return None
    ckpt = Path(out_dir) / json.loads(pointer.read_text())["dir"]
    return ckpt if (ckpt / STATE_NAME).exists() else None


def _save_dir_atomic(out_dir: Path, name: str, write: Callable[[Path], None]) -> Path:
    """Write a directory via a temporary sibling, then swap it into place."""
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    old = out_dir / f".{name}.old"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


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
    train_data = load_split(data_root, "train", cfg.train_images)
    val_data = load_split(data_root, "val", cfg.eval_images) if cfg.eval_images >= 0 else None
    tokens = [model.encode_captions([c])[0][0] for c in train_data.pair_caption]  # [bos] caption [eos]
    n_targets = torch.tensor([len(t) - 1 for t in tokens])

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

        state = torch.load(ckpt / STATE_NAME, map_location="cpu", weights_only=True)
        if state["world_size"] != world:
            raise ConfigError(f"{ckpt}: saved with {state['world_size']} processes, resuming with {world}")
        core.load_trainable(load_file(str(ckpt / "trainable.safetensors")), source=str(ckpt))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"][rank])
        step, history = state["step"], json.loads(state["history"])
        start_epoch, skip = divmod(step, steps_per_epoch)
        if acc.is_main_process:
            print(f"resumed from {ckpt} at step {step}")
    if val_data is not None and history["baseline"] is None:
        base = most_common_caption(train_data)
        history["baseline"] = {"caption": base, **evaluate_captions({s: base for s in val_data.stems}, val_data,
                                                                      data_root, "val")}

    def save_checkpoint() -> None:
        rng = [None] * world
        if world > 1:
            torch.distributed.all_gather_object(rng, _rng_state())
        else:
            rng = [_rng_state()]
        if acc.is_main_process:
            name = f"step-{step:07d}"

            def write(d: Path) -> None:
                core.save_trainable(d)
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
                            "step": step, "world_size": world, "history": json.dumps(history)}, d / STATE_NAME)

            _save_dir_atomic(out_dir / "checkpoints", name, write)
            atomic_write_json(out_dir / LATEST_NAME, {"dir": f"checkpoints/{name}", "step": step})
            kept = sorted((out_dir / "checkpoints").glob("step-*"))
            for old in kept[:-max(cfg.keep_checkpoints, 1)]:
                shutil.rmtree(old, ignore_errors=True)
            atomic_write_json(out_dir / "history.json", history)
        acc.wait_for_everyone()

    model.train()
    for epoch in range(start_epoch, epochs):
        order = epoch_order(n_pairs, cfg.seed, epoch)
        t0, c0, losses = time.time(), time.process_time(), []
        first = skip if epoch == start_epoch else 0
        last = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
        bar = tqdm(range(first, last), desc=f"epoch {epoch + 1}/{epochs}", disable=not acc.is_main_process,
                   leave=False)
        for s in bar:
            batch = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            denom = float(n_targets[batch].sum())
            step_loss = torch.zeros((), device=acc.device)
            for a in range(cfg.grad_accum):
                lo = (a * world + rank) * micro
                idx = batch[lo:lo + micro].tolist()
                ids, mask = _pad([tokens[i] for i in idx], core.tokenizer.pad_token_id)
                img = [train_data.pair_image[i] for i in idx]
                if feats is not None:
                    inputs = {"features": feats[img]}
                else:
                    inputs = {"pixel_values": core._pixels([train_data.image_paths[i] for i in img])}
                sync = contextlib.nullcontext() if a == cfg.grad_accum - 1 else acc.no_sync(model)
                with sync:
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
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if on_step is not None:
                on_step(step, loss_value)
            if cfg.save_every_steps > 0 and step % cfg.save_every_steps == 0 and s + 1 < last:
                save_checkpoint()
        record = {"epoch": epoch + 1, "step": step, "train_loss": sum(losses) / max(len(losses), 1),
                  "epoch_seconds": round(time.time() - t0, 3),
                  "epoch_cpu_seconds": round(time.process_time() - c0, 3), "steps_run": len(losses)}
        if val_data is not None and acc.is_main_process:
            t1 = time.time()
            preds = validate(core, val_data, val_feats, cfg)
            record["val"] = evaluate_captions(preds, val_data, data_root, "val",
                                              clip=cfg.clip if cfg.clipscore else None)
            record["eval_seconds"] = round(time.time() - t1, 3)
            record["examples"] = dict(list(preds.items())[:3])
            best = history["best"]
            if best is None or record["val"]["CIDEr"] > best["CIDEr"]:
                history["best"] = {"epoch": epoch + 1, "step": step, "CIDEr": record["val"]["CIDEr"],
                                   "dir": str(out_dir / "best")}
                _save_dir_atomic(out_dir, "best", core.save_trainable)
            print(f"epoch {epoch + 1}: loss {record['train_loss']:.3f}, val " +
                  ", ".join(f"{k} {v:.3f}" for k, v in record["val"].items()))
        history["epochs"].append(record)
        save_checkpoint()
    if acc.is_main_process:
        atomic_write_json(out_dir / "history.json", history)
    acc.wait_for_everyone()
    acc.free_memory()
    return history


def _pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def validate(model: Captioner, data: CaptionData, features: Any, cfg: TrainConfig) -> dict[str, str]:
    """Captions {stem: caption} for the validation images (cached features when given)."""
    if features is not None:
        caps = model.generate(features=features[list(range(len(data.stems)))], method=cfg.eval_method,
                              beam_size=cfg.eval_beam_size)
    else:
        caps = model.generate(data.image_paths, method=cfg.eval_method, beam_size=cfg.eval_beam_size)
    return dict(zip(data.stems, caps))


# ------------------------------------------------------------------------------------------- params / CLI


# flat params-file keys (params/demo.yaml style) that name a config field differently
PARAM_ALIASES = {"rank": "lora_rank", "beam_size": "eval_beam_size"}


def configs_from_params(params: dict[str, Any]) -> tuple[CaptionerConfig, TrainConfig, Path]:
    """(CaptionerConfig, TrainConfig, data_root) from a params mapping.

    Top-level keys named like a config field (or in PARAM_ALIASES, e.g. `rank`) are used; `captioner:` and
    `train:` sections override them (and reject unknown keys). `data_root` defaults to the demo world.
    """
    from captionlab.demo import MODEL_BUILDERS, ensure_model, ensure_world, world_root

    flat = {PARAM_ALIASES.get(k, k): v for k, v in params.items() if not isinstance(v, dict)}
    cap_fields, tr_fields = {f.name for f in fields(CaptionerConfig)}, {f.name for f in fields(TrainConfig)}
    cap = {**{k: v for k, v in flat.items() if k in cap_fields}, **dict(params.get("captioner") or {})}
    tr = {**{k: v for k, v in flat.items() if k in tr_fields}, **dict(params.get("train") or {})}
    seed = int(params.get("seed", 0)) if params.get("world_seed") is None else int(params["world_seed"])
    data_root = Path(params["data_root"]) if params.get("data_root") else ensure_world(seed)
    for key in ("encoder", "decoder"):  # build a missing demo checkpoint the specs point at
        if key not in cap:
            raise ConfigError(f"params: `{key}` (a model spec) is required")
        spec = str(cap[key])
        path = Path(spec.split(":", 1)[1] if spec.startswith(("hfclip:", "hf:")) else spec)
        for name in MODEL_BUILDERS:
            target = world_root(seed) / "models" / name
            if not path.exists() and (path == target or target in path.parents):
                ensure_model(name, seed)
    return CaptionerConfig.from_dict(cap), TrainConfig.from_dict(tr), data_root


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`a.b=value` strings -> nested dict (values parsed as YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (extra wins)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_train_params(path: str | None, overrides: list[str]) -> dict[str, Any]:
    """Params file + dotted overrides, placeholders resolved."""
    from captionlab.params import load_params, resolve

    return resolve(merge(load_params(path) if path else {}, parse_overrides(overrides)))


def main(argv: list[str] | None = None) -> int:
    """`python -m captionlab.train --params FILE [-p key=value ...]` (also under accelerate launch)."""
    from captionlab.models.commands import add_train_arguments

    parser = argparse.ArgumentParser(prog="captionlab.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    return run_train(args)


def run_train(args: argparse.Namespace) -> int:
    """Run training from parsed CLI arguments."""
    params = load_train_params(args.params, args.param)
    cap, tr, root = configs_from_params(params)
    if args.out_dir:
        tr.out_dir = args.out_dir
    if args.resume:
        tr.resume = True
    history = train(cap, tr, root)
    if os.environ.get("RANK", "0") != "0":
        return 0
    last = history["epochs"][-1] if history["epochs"] else {}
    print(json.dumps({"out_dir": tr.out_dir, "world_size": history["world_size"], "best": history["best"],
                      "last": {k: v for k, v in last.items() if k != "examples"}}, indent=1))
    return 0


if __name__ == "__main__":
    from captionlab.errors import CaptionlabError

    try:
        sys.exit(main())
    except CaptionlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
