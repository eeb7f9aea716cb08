"""Training settings: `TrainConfig`, and the one mapping from the run configuration to CaptionerConfig/TrainConfig."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from captionlab.errors import ConfigError
from captionlab.models.captioner import CaptionerConfig
from captionlab.params import RunConfig
from captionlab.utils import dataclass_from_dict


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
    micro_threads: int = 0  # CPU, one process: threads running a step's grad_accum micro-batches side by side
    #                         (0 = one per core); the result is the same for any value

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a mapping, rejecting unknown keys with a clear error."""
        return dataclass_from_dict(cls, d, "train")


# RunConfig field -> CaptionerConfig / TrainConfig field (the run configuration's names are the public ones).
CAPTIONER_KEYS = {"encoder": "encoder", "decoder": "decoder", "tokenizer": "tokenizer", "peft": "peft", "conditioning": "conditioning",
                  "cross_every": "cross_every", "cross_dim": "cross_dim", "rank": "lora_rank",
                  "lora_alpha": "lora_alpha", "trainable_budget": "trainable_budget"}
TRAIN_KEYS = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "seed": "seed",
              "beam_size": "eval_beam_size"}
# Quick mode (a smoke test of a notebook): one epoch on a few images, at most QUICK_STEPS optimizer steps (a
# smaller `train.max_steps` is kept; the params file's full-run budget is not).
QUICK_TRAIN = {"epochs": 1, "train_images": 256, "eval_images": 32}
QUICK_STEPS = 20


def _section(cfg: RunConfig, section: str, cls: type, flat: dict[str, str]) -> dict[str, Any]:
    extra = dict(getattr(cfg, section))
    known = {f.name for f in fields(cls)}
    for key in extra:
        if key in flat.values():
            name = next(k for k, v in flat.items() if v == key)
            raise ConfigError(f"{cfg.params_file}: {section}.{key}: set it as `{name}` (one name per setting)")
        if key not in known:
            raise ConfigError(f"{cfg.params_file}: {section}.{key}: unknown {cls.__name__} field; "
                              f"known: {', '.join(sorted(known - set(flat.values())))}")
    return extra


def captioner_config(cfg: RunConfig, **changes: Any) -> CaptionerConfig:
    """The CaptionerConfig of a run (flat keys such as `rank`, then `captioner:` extras, then `changes`)."""
    values = {field: getattr(cfg, key) for key, field in CAPTIONER_KEYS.items()}
    return CaptionerConfig.from_dict({**values, **_section(cfg, "captioner", CaptionerConfig, CAPTIONER_KEYS),
                                      **changes})


def train_config(cfg: RunConfig, out_dir: str | Path | None = None, **changes: Any) -> TrainConfig:
    """The TrainConfig of a run (quick mode: one epoch on 256 images, at most QUICK_STEPS steps, validation on 32)."""
    values = {field: getattr(cfg, key) for key, field in TRAIN_KEYS.items()}
    values.update(_section(cfg, "train", TrainConfig, TRAIN_KEYS))
    if cfg.quick:  # quick mode's sizes win over the file's `train:` extras
        values.update(QUICK_TRAIN)
        values["max_steps"] = min(values.get("max_steps") or QUICK_STEPS, QUICK_STEPS)
    if out_dir is not None:
        values["out_dir"] = str(out_dir)
    return TrainConfig.from_dict({**values, **changes})


def configs_from_params(cfg: RunConfig) -> tuple[CaptionerConfig, TrainConfig, Path]:
    """(CaptionerConfig, TrainConfig, data_root) of a run configuration; builds nothing."""
    return captioner_config(cfg), train_config(cfg), Path(cfg.data_root)


def train_setting(cfg: RunConfig, out_dir: str | Path, **changes: Any) -> tuple[dict[str, Any], Path]:
    """Train one setting of a run (`changes`: CaptionerConfig fields, e.g. peft="adapter"); (history, best dir)."""
    from captionlab.train.loop import train

    history = train(captioner_config(cfg, **changes), train_config(cfg, out_dir), cfg.data_root)
    return history, Path(history["best"]["dir"]) if history["best"] else Path(out_dir) / "best"


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` / `section.key=value` strings -> a (nested) dict, values parsed as YAML scalars."""
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


def load_train_params(path: str | None, overrides: list[str]) -> RunConfig:
    """The run configuration of `captionlab train`: a params file (default params/demo.yaml) + `-p` overrides."""
    from captionlab.params import load_config, read_params_file

    extra = parse_overrides(overrides)
    for section in ("captioner", "train"):  # sections merge with the file's instead of replacing them
        if isinstance(extra.get(section), dict):
            extra[section] = {**(read_params_file(path or "params/demo.yaml").get(section) or {}), **extra[section]}
    return load_config(path, extra, source="-p")
