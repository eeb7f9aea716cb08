"""What a notebook needs in its first cell: resolved parameters, the world's data and models, an output folder.

A notebook's tagged `parameters` cell holds plain assignments whose defaults are the demo world's values
(placeholders such as `{cache}` or `{data_root}` allowed); the next cell calls

    ctx = report.start("02_train", models=["clip", "gpt2"], params_file=params_file, run_dir=run_dir, ...)

which resolves placeholders (params file < notebook parameters), builds the demo world and the tiny models
the notebook needs when `world == "demo"` (cached after the first time), seeds everything and returns a
`NotebookContext`: where to write artefacts (`ctx.out`), and helpers that record the run's metadata.
"""

from __future__ import annotations

import datetime as _dt
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from captionlab.errors import ConfigError
from captionlab.params import load_params
from captionlab.report.render import HEADLINE
from captionlab.utils import REPO_ROOT, atomic_write_json, run_metadata, set_seed

DEFAULT_RUN_DIR = "{repo}/reports/adhoc"
# Model parameters that may be left empty in the demo world (same values as params/demo.yaml).
DEMO_SPECS = {
    "clip_model": "{data_root}/models/clip",
    "encoder": "hfclip:{data_root}/models/clip",
    "decoder": "{data_root}/models/gpt2/decoder_model.bin",
    "llava_model": "{data_root}/models/llava",
    "vit_model": "hfclip:{data_root}/models/clip",
}


@dataclass
class NotebookContext:
    """A notebook's resolved parameters and output folder (`out = run_dir / name`)."""

    name: str
    params: dict[str, Any]
    run_dir: Path
    out: Path
    world: str
    seed: int
    quick: bool
    data_root: Path
    models: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        """A resolved parameter, e.g. `ctx["encoder"]` (placeholders such as {data_root} filled in)."""
        try:
            return self.params[key]
        except KeyError:
            raise KeyError(f"{self.name}: no parameter {key!r}; known: {sorted(self.params)}") from None

    def path(self, *parts: str) -> Path:
        """A path inside this notebook's output folder (parent folders created)."""
        p = self.out.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def section(self, name: str) -> Path:
        """The output folder of another notebook of the same run (e.g. `ctx.section("02_train")`)."""
        return self.run_dir / name

    def metadata(self) -> dict[str, Any]:
        """Run metadata (params, world, seed, versions, git commit) to store next to results."""
        return run_metadata(self.params, self.world, self.seed)

    def save_json(self, name: str, obj: Any, with_metadata: bool = True) -> Path:
        """Write `obj` (a dict) as JSON into the output folder, with the run's metadata under "meta"."""
        if with_metadata and isinstance(obj, dict):
            obj = {**obj, "meta": self.metadata()}
        return atomic_write_json(self.path(name), obj)

    def headline(self, metrics: dict[str, Any], title: str | None = None, notes: str = "") -> Path:
        """Write `headline.json`: the few numbers the report's index page shows for this section."""
        clean = {k: _plain(v) for k, v in metrics.items()}
        return atomic_write_json(self.path(HEADLINE), {
            "notebook": self.name,
            "title": title or self.params.get("title") or self.name,
            "world": self.world,
            "seed": self.seed,
            "quick": self.quick,
            "params_file": self.params.get("params_file") or None,
            "metrics": clean,
            "notes": notes,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        })

    def _repr_markdown_(self) -> str:
        pf = self.params.get("params_file") or "(notebook defaults)"
        quick = " — **quick mode** (reduced sizes)" if self.quick else ""
        return (f"Numbers below come from the **{html.escape(self.world)}** world (`{self.data_root}`), "
                f"seed {self.seed}, params `{pf}`{quick}. Artefacts go to `{self.out}`.")


def _plain(value: Any) -> Any:
    """Floats/ints from numpy or torch scalars, so headline.json stays plain JSON."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            return value
    return value


def start(name: str, models: Iterable[str] = (), **parameters: Any) -> NotebookContext:
    """Resolve a notebook's parameters, prepare its world (demo: build data + `models` if missing), seed, return context."""
    params_file = parameters.get("params_file") or None
    parameters = dict(parameters)
    parameters.setdefault("run_dir", "")
    if not parameters["run_dir"]:
        parameters["run_dir"] = DEFAULT_RUN_DIR
    # Placeholders are resolved in scalar parameters; lists/dicts (prompt templates with `{object}`) stay verbatim.
    nested = {k: v for k, v in parameters.items() if isinstance(v, (list, dict, tuple))}
    params = load_params(params_file, overrides={k: v for k, v in parameters.items() if k not in nested})
    params.update(nested)
    world = str(params.get("world") or "demo")
    seed = int(params.get("seed") or 0)
    quick = _as_bool(params.get("quick", False))
    run_dir = Path(params["run_dir"]).expanduser().resolve()
    data_root = Path(str(params.get("data_root") or "")).expanduser()

    built: dict[str, Path] = {}
    if world == "demo":
        # The demo world is generated, not downloaded: build the data and the tiny checkpoints on first use.
        from captionlab.demo import ensure_model, ensure_world, world_root

        data_root = ensure_world(seed, root=data_root if str(data_root) not in ("", ".") else world_root(seed))
        for m in models:
            built[m] = ensure_model(m, seed, root=data_root)
        for key, spec in DEMO_SPECS.items():  # a model parameter left empty: the demo world's checkpoint
            if key in params and not params[key]:
                params[key] = spec.format(data_root=data_root)
    elif not data_root.is_dir():
        raise ConfigError(f"{params_file or name}: data_root {str(data_root)!r} is not a directory "
                          f"(world {world!r} expects the course layout there)")

    set_seed(seed)
    out = run_dir / name
    out.mkdir(parents=True, exist_ok=True)
    params.update(world=world, seed=seed, quick=quick, run_dir=str(run_dir), data_root=str(data_root))
    return NotebookContext(name=name, params=params, run_dir=run_dir, out=out, world=world, seed=seed,
                           quick=quick, data_root=data_root, models=built)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def repo_path(path: str | Path) -> Path:
    """`path` as is when absolute, else relative to the repository root."""
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p
