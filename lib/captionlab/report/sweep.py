"""Parameter sweeps: run one notebook per setting with papermill, tabulate the settings' headline metrics.

A sweep file (YAML):

    base: params/demo.yaml        # the params every setting starts from
    notebook: 02_train            # the notebook run per setting
    metrics: [CIDEr, CLIPScore]   # headline.json metrics to compare (default: all)
    overrides: {epochs: 2}        # optional: parameters set for every setting
    settings:                     # each a dict of parameter overrides; optional `name`
      - {rank: 2}
      - {rank: 4}

writes `reports/sweeps/<sweep>/{<setting>/..., comparison.csv, comparison.png, sweep.json}`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from captionlab.errors import ConfigError
from captionlab.params import load_config
from captionlab.report import render
from captionlab.report.context import repo_path
from captionlab.report.runner import NotebookError, check_kernel, execute_notebook, notebook_parameters, notebook_path
from captionlab.utils import REPO_ROOT, atomic_write_json, atomic_write_text


@dataclass
class SweepResult:
    """The comparison table of a sweep and where its files are."""

    out_dir: Path
    table: Any  # pandas.DataFrame
    csv: Path
    png: Path | None


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and check a sweep file (ConfigError naming the file on problems)."""
    p = repo_path(path)
    try:
        spec = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: sweep file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping with base, notebook, settings")
    for key in ("base", "settings"):
        if key not in spec:
            raise ConfigError(f"{path}: missing key {key!r}")
    settings = spec["settings"]
    if not isinstance(settings, list) or not settings or not all(isinstance(s, dict) and s for s in settings):
        raise ConfigError(f"{path}: 'settings' must be a non-empty list of parameter mappings")
    spec.setdefault("notebook", "02_train")
    spec.setdefault("name", p.stem)
    spec["settings"] = [{**s, "name": str(s.get("name") or setting_label(s))} for s in settings]
    names = [s["name"] for s in spec["settings"]]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: setting names are not unique: {names}")
    return spec


def setting_label(setting: dict[str, Any]) -> str:
    """A folder-safe label such as `rank=4,peft=lora`."""
    text = ",".join(f"{k}={v}" for k, v in setting.items() if k != "name")
    return "".join(c if c.isalnum() or c in "=,._-" else "_" for c in text)


def run_sweep(sweep_file: str | Path, out_dir: str | Path | None = None, quick: bool | None = None,
              progress: bool = True) -> SweepResult:
    """Run the sweep's notebook once per setting, then write comparison.csv + comparison.png."""
    import pandas as pd

    from captionlab.report.figures import bar_chart, save_figure

    spec = load_sweep(sweep_file)
    nb = notebook_path(spec["notebook"])
    out = Path(out_dir) if out_dir else REPO_ROOT / "reports" / "sweeps" / spec["name"]
    out = out.resolve()
    quick = bool(spec.get("quick", False)) if quick is None else quick
    check_kernel()
    base_path = repo_path(spec["base"])
    rows: list[dict[str, Any]] = []
    metric_cols: list[str] = []
    failure: NotebookError | None = None
    for i, setting in enumerate(spec["settings"], 1):
        name = setting["name"]
        overrides = {k: v for k, v in setting.items() if k != "name"}
        common = dict(spec.get("overrides") or {})
        print(f"[{i}/{len(spec['settings'])}] {spec['name']}: {name}", file=sys.stderr, flush=True)
        run_dir = out / name
        run = {"run_dir": str(run_dir), "quick": quick, "params_file": str(base_path)}
        try:
            load_config(base_path, {**common, **overrides, **run})  # unknown keys / wrong types: before running
            nb_params = notebook_parameters(nb, run, overrides={**common, **overrides})
        except ConfigError as exc:
            raise ConfigError(f"{sweep_file}: setting {name!r}: {exc}") from None
        (run_dir / nb.stem / render.HEADLINE).unlink(missing_ok=True)
        t0 = time.time()
        row: dict[str, Any] = {"setting": name, **overrides}
        try:
            execute_notebook(nb, run_dir / nb.name, nb_params, progress=progress)
            row["status"] = "ok"
        except NotebookError as exc:
            row["status"], failure = "failed", exc
        row["seconds"] = round(time.time() - t0, 1)
        headline = render.read_headline(run_dir / nb.stem) or {}
        metrics = headline.get("metrics") or {}
        wanted = spec.get("metrics") or list(metrics)
        row.update({m: metrics.get(m) for m in wanted})
        metric_cols += [m for m in wanted if m not in metric_cols]
        row["world"] = headline.get("world")
        rows.append(row)
        if failure:
            break

    table = pd.DataFrame(rows)
    csv = atomic_write_text(out / "comparison.csv", table.to_csv(index=False))
    png = None
    numeric = [m for m in metric_cols if m in table and pd.api.types.is_numeric_dtype(table[m])]
    if numeric and table[numeric].notna().any().any():
        fig = bar_chart(table, "setting", numeric, title=f"{spec['name']} ({nb.stem}, {rows[0].get('world')} world)")
        png = save_figure(fig, out / "comparison.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
    atomic_write_json(out / "sweep.json", {"sweep_file": str(repo_path(sweep_file)), "spec": spec, "rows": rows})
    if failure:
        raise NotebookError(f"sweep {spec['name']}, setting {rows[-1]['setting']}: {failure}\n  partial table: {csv}")
    return SweepResult(out, table, csv, png)
