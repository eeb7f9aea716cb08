"""What a notebook needs in its first cell: its run configuration, the world's data and models, an output folder.

A notebook's tagged `parameters` cell names the settings it uses (`rank = None`: the params file's value;
`params_file` names that file, params/demo.yaml by default); the next cell is one call

    ctx = report.start("02_train", globals(), models=["clip", "gpt2"])

which loads the params file with the notebook's non-None parameters as overrides (`captionlab.params.load_config`:
placeholders resolved, types checked), runs the explicit build step `prepare_world` (demo world: generates the
data and the tiny models named in `models` on first use; cached after), seeds everything, sets each declared
parameter name in the notebook to its resolved value, and returns a `NotebookContext` (`ctx.cfg`, `ctx.out`).
"""

from __future__ import annotations

import datetime as _dt
import html
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterable, MutableMapping

from captionlab.errors import ConfigError, MissingInputError
from captionlab.params import (DEFAULT_PARAMS, FIELDS, RunConfig, load_config, notebook_overrides,  # noqa: F401
                               prepare_world, repo_path)
from captionlab.report.render import HEADLINE
from captionlab.utils import atomic_write_json, run_metadata, set_seed

# What a notebook reads from other notebooks' outputs: {notebook: {upstream notebook: [paths]}} (placeholders are
# run configuration fields). `start` checks them before anything is built; `captionlab report run --only`
# adds the upstream notebooks whose outputs are missing.
# The demo models each notebook's `start(...)` prepares (the report runner builds them in the background and starts a
# notebook once its models are built; tests/test_notebooks_static.py checks this against the notebooks).
NOTEBOOK_MODELS: dict[str, tuple[str, ...]] = {
    "00_demo_world": (),
    "01_llava_prompts": ("llava", "clip"),
    "02_train": ("clip", "gpt2"),
    "03_evaluate": ("clip", "gpt2"),
    "04_attention": ("llava", "clip", "gpt2"),
    "05_clip_zero_shot": ("clip",),
    "06_vit_analysis": ("clip",),
}
NEEDS: dict[str, dict[str, list[str]]] = {
    "03_evaluate": {"02_train": ["{checkpoint}"]},
    "04_attention": {"02_train": ["{checkpoint}"], "03_evaluate": ["{run_dir}/03_evaluate/clipscore_pairs.csv"]},
}


# Outputs of other notebooks a notebook shows when they exist, without needing them (03 adds 01's LLaVA row to its
# table): the report runner starts it after them when they are part of the same run.
READS: dict[str, tuple[str, ...]] = {"03_evaluate": ("01_llava_prompts",)}


def missing_inputs(name: str, cfg: RunConfig) -> dict[str, list[Path]]:
    """{upstream notebook: its outputs that `name` needs and that do not exist} for this run configuration."""
    values = {"checkpoint": cfg.checkpoint, "run_dir": cfg.run_dir}
    missing: dict[str, list[Path]] = {}
    for upstream, paths in NEEDS.get(name, {}).items():
        absent = [Path(p.format(**values)) for p in paths if not Path(p.format(**values)).exists()]
        if absent:
            missing[upstream] = absent
    return missing


def upstream_notebooks(name: str, cfg: RunConfig) -> list[str]:
    """The notebooks to run before `name` (recursively) because outputs it needs are missing."""
    order: list[str] = []
    for upstream in missing_inputs(name, cfg):
        for dep in [*upstream_notebooks(upstream, cfg), upstream]:
            if dep not in order:
                order.append(dep)
    return order


@dataclass
class NotebookContext:
    """A notebook's run configuration and output folder (`out = run_dir / name`)."""

    name: str
    cfg: RunConfig
    params: dict[str, Any]
    run_dir: Path
    out: Path
    world: str
    seed: int
    quick: bool
    data_root: Path
    models: dict[str, Path] = field(default_factory=dict)
    prepared: str = ""  # what the build step did (shown in the setup cell's output)

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
                f"seed {self.seed}, params `{pf}`{quick}. {self.prepared} Artefacts go to `{self.out}`.")


def _plain(value: Any) -> Any:
    """Floats/ints from numpy or torch scalars, so headline.json stays plain JSON."""
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, RuntimeError):
            return value
    return value


def start(name: str, parameters: MutableMapping[str, Any] | None = None, models: Iterable[str] = ()) -> NotebookContext:
    """Load the run configuration (params file < the notebook's non-None parameters), prepare the world, seed.

    `parameters` is the notebook's namespace (`globals()`): its names that are RunConfig fields are read as
    overrides (None or "" = from the params file), then set to their resolved values.
    """
    params_file, given = notebook_overrides(parameters or {})
    cfg = load_config(params_file, given, source=f"{name} parameters")
    missing = missing_inputs(name, cfg)
    if missing:  # one line, before anything is built
        upstream, paths = next(iter(missing.items()))
        raise MissingInputError(f"{name} needs {paths[0]} from {upstream}: run notebooks/{upstream}.ipynb first "
                                f"(or `captionlab report run --only {name[:2]}`, which runs what {name} needs)")
    try:
        built = prepare_world(cfg, models)  # the explicit build step (demo world: data + tiny models, cached)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    data_root = built.pop("world")
    what = "data + models " + ", ".join(built) if built else "data"
    prepared = (f"Prepared with `captionlab.params.prepare_world` (demo world {what}; built on first use, then "
                f"cached)." if cfg.world == "demo" else "")
    set_seed(cfg.seed)
    if cfg.world == "demo":
        _demo_threads()
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    out = run_dir / name
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.replace(run_dir=str(run_dir), data_root=str(data_root))
    if parameters is not None:  # the notebook's parameter names now hold the resolved values
        for key in [k for k in parameters if k in FIELDS]:
            parameters[key] = getattr(cfg, key)
    return NotebookContext(name=name, cfg=cfg, params=asdict(cfg), run_dir=run_dir, out=out, world=cfg.world,
                           seed=cfg.seed, quick=cfg.quick, data_root=Path(data_root), models=built, prepared=prepared)


def _demo_threads() -> None:
    """The demo models are tiny: one torch thread is as fast, and two spinning threads on a busy 2-core CPU ran a
    prompt study 3-10x slower (training already uses one: TrainConfig.cpu_threads). CAPTIONLAB_TORCH_THREADS
    overrides (`captionlab.workers.notebook_torch_threads`, which 02's early-submitted attempt uses too)."""
    import torch

    from captionlab.workers import notebook_torch_threads

    torch.set_num_threads(notebook_torch_threads("demo"))
