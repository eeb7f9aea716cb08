"""The report's expensive cells, cached by what produced them (`captionlab.resultcache`).

- `prompt_study`: 01's prompt x generation-config study, one cached result per cell, so adding a prompt runs only
  the new cells (and the LLaVA model is loaded only when a cell has to run).
- `evaluate_decodings`: 03's captions + metrics per decoding strategy of a checkpoint.

Each result is keyed by its settings and the fingerprints of the data and models it read; the returned tables say
per row whether it was reused.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from captionlab.models.specs import parse_spec
from captionlab.resultcache import ResultCache
from captionlab.utils import atomic_path, atomic_write_json


def _local(*specs: Any) -> list[Path]:
    paths = []
    for spec in specs:
        if spec:
            local = parse_spec(str(spec)).local_path
            if local is not None:
                paths.append(local)
    return paths


def prompt_study(load_model: Callable[[], Any], model_spec: str, images_dir: str | Path, annotations: str | Path,
                 prompts: Sequence[str], configs: Mapping[str, dict], out_dir: str | Path, clip: str | None = None,
                 limit: int | None = None, batch_size: int = 8, cache: ResultCache | None = None) -> "pd.DataFrame":  # noqa: F821
    """`captionlab.models.llava.run_prompt_study` with every (prompt, config) cell cached; same files and table.

    `load_model()` returns the LlavaCaptioner; it is called once, and only if some cell is not cached.
    The table has a `cached` column (True: the cell's result was reused).
    """
    import pandas as pd

    from captionlab.models.llava import run_prompt_study

    cache = cache or ResultCache()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images_dir, annotations = Path(images_dir), Path(annotations)
    model: list[Any] = []
    rows = []
    for p_idx, prompt in enumerate(prompts):
        for name, gen in configs.items():
            def compute(work: Path, prompt: str = prompt, name: str = name, gen: dict = gen) -> dict[str, Any]:
                if not model:
                    model.append(load_model())
                table = run_prompt_study(model[0], images_dir, annotations, [prompt], {name: gen}, work, clip=clip,
                                         limit=limit, batch_size=batch_size)
                return {"row": table.iloc[0].to_dict()}

            config = {"prompt": prompt, "config": name, "generation": dict(gen), "limit": limit, "clip": clip,
                      "model": model_spec}
            result = cache.run("prompt_study_cell", config, compute,
                               inputs=[annotations, *_local(model_spec, clip)], listings=[images_dir])
            tag = f"{p_idx}_{name}"
            for suffix in (".json", ".generation_config.json"):
                shutil.copyfile(result.dir / f"0_{name}{suffix}", out_dir / f"{tag}{suffix}")
            rows.append({**result.value["row"], "prompt_idx": p_idx, "cached": result.reused})
    table = pd.DataFrame(rows).sort_values("CIDEr", ascending=False, kind="stable").reset_index(drop=True)
    with atomic_path(out_dir / "prompt_study.csv") as tmp:
        table.to_csv(tmp, index=False)
    atomic_write_json(out_dir / "prompt_study.json", {"results": table.to_dict(orient="records"),
                                                       "settings": {"prompts": list(prompts), "configs": dict(configs),
                                                                    "limit": limit, "clip": clip, "model": model_spec}})
    return table


def evaluate_decodings(checkpoint: str | Path, val: Any, val_dir: str | Path, decodings: Mapping[str, dict],
                       max_new_tokens: int, clip: str | None, metrics: Sequence[str], out_dir: str | Path,
                       cache: ResultCache | None = None) -> tuple[dict[str, Any], dict[str, bool]]:
    """Caption `val` with each decoding of the checkpoint and score it (cached per decoding).

    The encoder runs once per image list (`Captioner.generate_cached`: the feature cache 02's attempt filled).
    Writes `predictions_<name>.json` and `eval_<name>.*` into `out_dir`; returns ({name: EvalResult},
    {name: reused}).
    """
    from captionlab.data import load_predictions, save_predictions
    from captionlab.metrics.evaluate import evaluate, load_result

    cache = cache or ResultCache()
    checkpoint, val_dir, out_dir = Path(checkpoint), Path(val_dir), Path(out_dir)
    model: list[Any] = []
    results, reused = {}, {}
    for name, kw in decodings.items():
        def compute(work: Path, kw: dict = kw) -> dict[str, Any]:
            from captionlab.models.captioner import load_captioner

            if not model:
                model.append(load_captioner(checkpoint))
            images = [val.image_path(val_dir, s) for s in val.stems]
            preds = dict(zip(val.stems, model[0].generate_cached(images, max_new_tokens=max_new_tokens, **kw)))
            save_predictions(work / "predictions.json", preds)
            evaluate(preds, val, val_dir, clip=clip, metrics=metrics).save(work, prefix="eval")
            return {"n": len(preds)}

        config = {"decoding": dict(kw), "max_new_tokens": max_new_tokens, "stems": list(val.stems), "clip": clip,
                  "metrics": list(metrics)}
        result = cache.run("evaluation", config, compute,
                           inputs=[checkpoint, Path(val.path), *_local(clip)], listings=[val_dir])
        save_predictions(out_dir / f"predictions_{name}.json", load_predictions(result.dir / "predictions.json"))
        results[name] = load_result(result.dir / "eval.summary.json")
        results[name].save(out_dir, prefix=f"eval_{name}")
        reused[name] = result.reused
    return results, reused
