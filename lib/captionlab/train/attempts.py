"""Training attempts (02's main setting and its comparison table), cached by what produced them.

An attempt trains one captioner setting, captions the validation images and scores them. Its result is keyed by
the *effective* captioner and training configuration (settings that do not apply to a method, such as the LoRA
rank of an adapter run, are left out), the evaluation settings, and the fingerprints of the data and the frozen
models (`captionlab.resultcache`). Rerunning 02 with only `rank` changed retrains only the settings that use it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from captionlab.models.specs import parse_spec
from captionlab.params import RunConfig
from captionlab.resultcache import CachedResult, ResultCache
from captionlab.train.config import captioner_config, train_config
from captionlab.utils import atomic_write_json

KIND = "train_attempt"
# CaptionerConfig fields that only matter for one PEFT method / one conditioning.
_METHOD_FIELDS = {"lora": ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets"),
                  "adapter": ("adapter_dim",), "prefix": ("prefix_len",)}
_CROSS_FIELDS = ("cross_every", "cross_dim")
# TrainConfig fields that do not change the result (where it is written, resuming, bookkeeping).
_TRAIN_IGNORED = ("out_dir", "resume", "save_every_steps", "keep_checkpoints", "cpu_threads")


@dataclass
class Attempt:
    """One trained and scored setting: its checkpoint, training history, metrics and where they came from."""

    peft: str
    conditioning: str
    rank: int | None  # the LoRA rank (None for other methods)
    checkpoint: Path  # the best checkpoint (trainable weights + captioner.json)
    history: dict[str, Any]
    summary: dict[str, Any]  # corpus metrics (CIDEr, CLIPScore, ...)
    trainable: dict[str, Any]  # the trainable-parameter report
    predictions: Path  # {stem: caption} of the validation images
    per_image: Path  # per-image metrics CSV
    val_images: int  # how many validation images were scored
    result: CachedResult

    def row(self) -> dict[str, Any]:
        """The attempt's row in 02's comparison table."""
        return {"peft": self.peft, "conditioning": self.conditioning,
                "rank": str(self.rank) if self.rank is not None else "-",
                "trainable_params": self.trainable.get("trainable"), "CIDEr": self.summary.get("CIDEr"),
                "CLIPScore": self.summary.get("CLIPScore"), "cached": self.result.reused}

    def describe(self) -> str:
        """One line: which setting, and whether it was trained now or reused from the cache."""
        label = f"{self.peft}/{self.conditioning}" + (f" rank {self.rank}" if self.rank is not None else "")
        return self.result.describe(label)

    def copy_checkpoint(self, dest: str | Path) -> Path:
        """Copy the best checkpoint to `dest` (replaced atomically), e.g. where 03 and 04 expect it."""
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.checkpoint, tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        return dest


def effective_config(cfg: RunConfig, **changes: Any) -> dict[str, Any]:
    """The settings that determine an attempt's result (inapplicable method/conditioning fields dropped)."""
    cap = asdict(captioner_config(cfg, **changes))
    for method, names in _METHOD_FIELDS.items():
        if cap["peft"] != method:
            for name in names:
                cap.pop(name)
    if cap["conditioning"] != "cross":
        for name in _CROSS_FIELDS:
            cap.pop(name)
    train = asdict(train_config(cfg))
    for name in _TRAIN_IGNORED:
        train.pop(name)
    return {"captioner": cap, "train": train,
            "eval": {"val_images": val_count(cfg), "beam_size": cfg.beam_size, "max_new_tokens": cfg.max_new_tokens,
                     "clip_model": cfg.clip_model}}


def reference_config(cfg: RunConfig) -> RunConfig:
    """`cfg` with the params file's LoRA `rank` and `lora_alpha`: the comparison attempts of a rank sweep."""
    from captionlab.params import load_config

    file_cfg = load_config(cfg.params_file)
    return cfg.replace(rank=file_cfg.rank, lora_alpha=file_cfg.lora_alpha)


def val_count(cfg: RunConfig) -> int:
    """How many validation images an attempt is scored on (0 = all; quick mode: 32)."""
    return 32 if cfg.quick else 0


def _model_paths(cfg: RunConfig) -> list[Path]:
    paths = []
    for spec in (cfg.encoder, cfg.decoder, cfg.clip_model, getattr(cfg, "tokenizer", None)):
        if spec:
            local = parse_spec(spec).local_path
            if local is not None:
                paths.append(local)
    return paths


def run_attempt(cfg: RunConfig, cache: ResultCache | None = None, **changes: Any) -> Attempt:
    """Train, caption and score the run's setting with `changes` (CaptionerConfig fields), or reuse the result."""
    cache = cache or ResultCache()
    root = Path(cfg.data_root)
    p2 = root / "p2_data"
    config = effective_config(cfg, **changes)

    def compute(out: Path) -> dict[str, Any]:
        from captionlab.data import load_captions, save_predictions
        from captionlab.metrics.evaluate import evaluate
        from captionlab.models.captioner import load_captioner
        from captionlab.report.dataset import subset
        from captionlab.train.loop import train

        tcfg = train_config(cfg, out / "run")
        if (out / "run" / "latest.json").exists():  # a killed attempt: continue from its last checkpoint
            tcfg.resume = True
        history = train(captioner_config(cfg, **changes), tcfg, root)
        best = Path(history["best"]["dir"]) if history.get("best") else out / "run" / "best"
        model = load_captioner(best)
        val = subset(load_captions(p2 / "val.json"), val_count(cfg))
        val_dir = p2 / "images" / "val"
        images = [val.image_path(val_dir, s) for s in val.stems]
        preds = dict(zip(val.stems, model.generate_cached(images, beam_size=cfg.beam_size,
                                                          max_new_tokens=cfg.max_new_tokens)))
        save_predictions(out / "predictions.json", preds)
        scored = evaluate(preds, val, val_dir, clip=cfg.clip_model, metrics=("CIDEr", "CLIPScore"))
        scored.per_image.to_csv(out / "per_image.csv", index=False)
        atomic_write_json(out / "history.json", history)
        return {"checkpoint": str(best), "summary": scored.summary, "trainable": model.report,
                "predictions": str(out / "predictions.json"), "per_image": str(out / "per_image.csv"),
                "val_images": len(val.stems)}

    result = cache.run(KIND, config, compute, inputs=[p2 / "train.json", p2 / "val.json", *_model_paths(cfg)],
                       listings=[p2 / "images" / "train", p2 / "images" / "val"])
    value = result.value
    cap = config["captioner"]
    return Attempt(peft=cap["peft"], conditioning=cap["conditioning"], rank=cap.get("lora_rank"),
                   checkpoint=Path(value["checkpoint"]),
                   history=json.loads((result.dir / "history.json").read_text(encoding="utf-8")),
                   summary=value["summary"], trainable=value["trainable"], predictions=Path(value["predictions"]),
                   per_image=Path(value["per_image"]), val_images=int(value["val_images"]), result=result)
