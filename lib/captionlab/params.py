"""The one run configuration: `RunConfig`, a typed dataclass loaded from a params YAML and validated when built.

    cfg = load_config("params/demo.yaml", {"rank": 8})   # reads, merges, resolves {placeholders}, type-checks

Every key of a params file is a field of `RunConfig` with the same name in the YAML, the notebooks' `parameters`
cells, sweep settings and `captionlab train -p KEY=VALUE`. An unknown key is an error naming the key and the file;
a wrong type names the key, the value and the expected type. A file may start from another with `base: FILE`
(its keys override the base's). Loading never builds anything: `prepare_world(cfg, models)` is the explicit step
that generates the demo world and its tiny checkpoints (cached after the first time).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from captionlab.errors import ConfigError
from captionlab.utils import REPO_ROOT, cache_dir

DEFAULT_PARAMS = "params/demo.yaml"
_PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")
_ESCAPED = re.compile(r"\{\{([^{}]*)\}\}")


@dataclass
class RunConfig:
    """Every setting of a run (fields without a default must come from the params file or its `base`)."""

    # the run
    world: str  # "demo": generated data + tiny models | e.g. "dlcv2024": the course data at data_root
    seed: int
    data_root: str  # the course layout (p1_data, p2_data, p3_data)
    # model specs (captionlab.models.specs)
    clip_model: str  # CLIPScore + zero-shot classification
    encoder: str  # frozen captioner encoder
    decoder: str  # frozen GPT-2 decoder (course decoder_model.bin or an HF GPT-2 dir)
    llava_model: str  # zero-shot captioner
    vit_model: str  # ViT analysed in 06
    # 00 data
    n_samples: int
    # 01 LLaVA prompts
    llava_prompts: list[str]
    llava_configs: dict[str, dict[str, Any]]
    max_images: int  # 0 = every validation image
    llava_batch_size: int
    # 02 train
    peft: str  # lora | adapter | prefix | none
    conditioning: str  # prefix | cross
    cross_every: int
    cross_dim: int
    rank: int  # LoRA rank
    lora_alpha: int
    epochs: int
    batch_size: int
    lr: float
    trainable_budget: int
    beam_size: int
    max_new_tokens: int
    peft_attempts: list[str]
    conditioning_attempts: list[str]
    # 03 evaluate
    checkpoint: str  # captioner checkpoint dir evaluated in 03 and analysed in 04
    decodings: dict[str, dict[str, Any]]
    metrics: list[str]
    # 04 attention
    llava_prompt: str
    attention_layer: int
    attention_heads: Union[str, int]  # mean | max | a head index
    # 05 CLIP zero-shot
    zeroshot_templates: list[str]  # `{{object}}` in YAML: a literal {object} slot
    zeroshot_batch_size: int
    n_examples: int
    # 06 ViT
    vit_epochs: int
    vit_lr: float
    vit_batch_size: int
    attention_images: int
    # optional
    title: str = ""
    description: str = ""
    tokenizer: str = ""  # a directory with the course's encoder.json + vocab.bpe (empty: the decoder's own)
    params_file: str = ""  # the file these values came from (recorded with results)
    run_dir: str = "{repo}/reports/adhoc"  # report folder; a notebook writes into run_dir/<notebook>/
    quick: bool = False  # small sizes: a fast smoke test
    notebooks: list[str] = field(default_factory=list)  # the report's notebooks (empty: all)
    per_notebook: dict[str, dict[str, Any]] = field(default_factory=dict)  # {notebook: {key: value}}
    captioner: dict[str, Any] = field(default_factory=dict)  # CaptionerConfig fields without a flat name
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields without a flat name

    def __post_init__(self) -> None:
        check_types(self, "RunConfig")

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(RunConfig)}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp)


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is Any:
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        _, val = typing.get_args(tp) or (Any, Any)
        return isinstance(value, dict) and all(isinstance(k, str) and _matches(v, val) for k, v in value.items())
    return isinstance(value, tp)


def check_types(obj: Any, source: str) -> None:
    """ConfigError naming the key, the value and the expected type for the first field of the wrong type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _matches(value, hints[f.name]):
            raise ConfigError(f"{source}: {f.name} = {value!r} ({type(value).__name__}): expected "
                              f"{_type_name(hints[f.name])}")


def read_params_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping of a params YAML (after its `base:` chain), placeholders not yet resolved."""
    p = repo_path(path)
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
    check_keys(loaded, str(path))
    base = loaded.pop("base", None)
    return {**read_params_file(base), **loaded} if base else loaded


def check_keys(mapping: dict[str, Any], source: str) -> None:
    """ConfigError naming the first key that is not a RunConfig field (and the file it came from)."""
    for key in mapping:
        if key not in FIELDS and key != "base":
            close = [k for k in FIELDS if k.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}; see captionlab.params.RunConfig")


def notebook_overrides(parameters: typing.Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(params file, overrides) from a notebook's namespace: its RunConfig-field names that are not None or ""
    (`quick` may be a string, as papermill's `-p quick true` passes it)."""
    given = {k: v for k, v in parameters.items() if k in FIELDS and v is not None and v != ""}
    if isinstance(given.get("quick"), str):
        given["quick"] = given["quick"].strip().lower() in ("1", "true", "yes", "on")
    return given.pop("params_file", DEFAULT_PARAMS), given


def load_config(path: str | os.PathLike | None = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None,
                source: str = "overrides") -> RunConfig:
    """Read a params file, apply overrides (named `source` in errors), resolve `{placeholders}`, validate.

    The run configuration; builds nothing.
    """
    path = path or DEFAULT_PARAMS
    raw = read_params_file(path)
    overrides = dict(overrides or {})
    check_keys(overrides, source)
    raw.update(overrides)
    raw.setdefault("params_file", str(path))
    missing = [name for name, f in FIELDS.items() if name not in raw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{path}: missing keys {', '.join(missing)} (add them, or `base: {DEFAULT_PARAMS}`)")
    for name, f in FIELDS.items():  # defaults take part in placeholder resolution (e.g. {run_dir})
        if name not in raw:
            raw[name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    try:
        return RunConfig(**resolve(raw))
    except ConfigError as exc:  # name the file, not the class
        raise ConfigError(str(exc).replace("RunConfig:", f"{path}:", 1)) from None


def load_params(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run configuration as a plain dict (`load_config(...)` fields)."""
    return dataclasses.asdict(load_config(path, overrides))


def resolve(params: dict[str, Any]) -> dict[str, Any]:
    """Replace `{name}` in string values by other top-level values, `{cache}` or `{repo}` (repeatedly).

    `{{name}}` is an escape for a literal `{name}` (e.g. a prompt template such as `a photo of {{object}}`).
    """
    env = {"cache": str(cache_dir()), "repo": str(REPO_ROOT)}

    def lookup(name: str) -> str:
        if name in params and not isinstance(params[name], (dict, list)):
            return str(params[name])
        if name in env:
            return env[name]
        raise ConfigError(f"params: unknown placeholder {{{name}}}")

    def sub(value: Any) -> Any:
        if isinstance(value, str):
            for _ in range(10):
                new = _PLACEHOLDER.sub(lambda m: lookup(m.group(1)), value)
                if new == value:
                    break
                value = new
            return _ESCAPED.sub(r"{\1}", value)
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v) for v in value]
        return value

    return {k: sub(v) for k, v in params.items()}


def repo_path(path: str | os.PathLike) -> Path:
    """`path` as is when absolute or existing, else relative to the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or p.exists() else REPO_ROOT / p


def prepare_world(cfg: RunConfig, models: typing.Iterable[str] = ()) -> dict[str, Path]:
    """The explicit build step: for `world: demo`, generate the data and the named tiny models if missing (cached).

    Returns {"world": data_root, <model>: checkpoint dir}; for other worlds it only checks that data_root exists.
    """
    root = Path(cfg.data_root).expanduser()
    if cfg.world != "demo":
        if not root.is_dir():
            raise ConfigError(f"{cfg.params_file}: data_root {cfg.data_root!r} is not a directory "
                              f"(world {cfg.world!r} expects the course layout there)")
        return {"world": root}
    from captionlab.demo import ensure_models, ensure_world

    built = {"world": ensure_world(cfg.seed, root=root)}
    built.update(ensure_models(models, cfg.seed, root=built["world"]))  # independent models side by side
    return built
