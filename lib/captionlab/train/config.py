"""Training settings: `TrainConfig`, and the mapping from a params file to (CaptionerConfig, TrainConfig, data_root)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from captionlab.errors import ConfigError
from captionlab.models.captioner import CaptionerConfig
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a mapping, rejecting unknown keys with a clear error."""
        return dataclass_from_dict(cls, d, "train")


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
