"""Does attention land on the object a word names? Pointing game and mass share against object masks.

For each caption word that is a colour or a shape word ("red", "circles"), the object(s) of the image with
that attribute are looked up in the objects JSON; words that match no object (hallucinated) or several objects
(ambiguous) are skipped. For each kept word:
- `pointing_patch`: the share of the attention-peak *patch* covered by the object mask (the chance that a
  random point of the peak patch is on the object); `pointing_pixel`: the peak of the bilinear-upsampled map
  is on the object (0/1);
- `mass_share`: the share of the (sum-normalised, upsampled) attention mass inside the mask;
- `pointing_tol`: as `pointing_pixel` with a small tolerance: the peak within `tolerance` x the image side
  (square neighbourhood) of the mask (the pointing game of Zhang et al. uses 15 px on ~224 px images);
- `random_point`: the baseline of pointing_patch / pointing_pixel / mass_share = the mask's share of the image
  area (a uniformly random point, or uniform attention); `random_tol` the same for the dilated mask.
`method_report` adds a deletion test per word: the drop in the word's log-probability when the top `deletion`
share of patches by the map is removed from the image (filled with its mean colour) versus as many random
patches (`deletion_drop` vs `deletion_random`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from captionlab.attention.grids import center_crop_square, mask_to_grid, normalize, upsample
from captionlab.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

    from captionlab.attention.capture import AttentionResult

DELETION = ("deletion_drop", "deletion_random")
METRICS = ("pointing_patch", "pointing_pixel", "pointing_tol", "mass_share", "random_point", "random_tol")
TOLERANCE = 0.0625  # of the image side: 4 px on the 64 px demo images, 14 px at 224 px


def _singular(word: str) -> str:
    w = re.sub(r"[^a-z]", "", word.lower())
    return w[:-1] if w.endswith("s") and len(w) > 3 and not w.endswith("ss") else w


def word_objects(word: str, objects: Sequence[dict[str, Any]]) -> tuple[str | None, list[int]]:
    """(attribute, object ids) a word names: ("colour"|"shape", ids of objects with that value) or (None, [])."""
    w = _singular(word)
    if not w:
        return None, []
    for attr in ("colour", "shape"):
        ids = [int(o["id"]) for o in objects if str(o[attr]).lower() == w]
        if ids or w in _vocab(attr):
            return attr, ids
    return None, []


def _vocab(attr: str) -> set[str]:
    from captionlab.data.world import COLOURS, SHAPES

    return set(COLOURS) if attr == "colour" else set(SHAPES)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """A boolean mask grown by `radius` pixels (square neighbourhood)."""
    if radius <= 0:
        return np.asarray(mask, dtype=bool)
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    return F.max_pool2d(t, 2 * radius + 1, stride=1, padding=radius)[0, 0].numpy() > 0


def score_map(m: np.ndarray, mask: np.ndarray, tolerance: float = TOLERANCE) -> dict[str, float]:
    """Pointing game (patch / pixel / with tolerance) and mass share of one (gh, gw) map against a boolean
    (H, W) object mask."""
    mask = np.asarray(mask, dtype=bool)
    near = dilate(mask, int(round(tolerance * min(mask.shape))))
    gh, gw = m.shape
    cover = mask_to_grid(mask, (gh, gw))
    r, c = np.unravel_index(int(np.argmax(m)), m.shape)
    up = upsample(normalize(m, "sum"), mask.shape)
    y, x = np.unravel_index(int(np.argmax(up)), up.shape)
    total = float(up.sum())
    return {"pointing_patch": float(cover[r, c]), "pointing_pixel": float(mask[y, x]),
            "pointing_tol": float(near[y, x]), "mass_share": float(up[mask].sum() / total) if total > 0 else 0.0,
            "random_point": float(mask.mean()), "random_tol": float(near.mean())}


def score_result(result: "AttentionResult", objects: Sequence[dict[str, Any]], mask: np.ndarray,
                 tolerance: float = TOLERANCE) -> list[dict[str, Any]]:
    """Rows per grounded word of one result: word, attribute, object ids and the metrics of `score_map`."""
    mask = center_crop_square(np.asarray(mask))
    rows = []
    for i, word in enumerate(result.tokens):
        attr, ids = word_objects(word, objects)
        if attr is None:
            continue
        row: dict[str, Any] = {"image": result.name, "word_index": i, "word": word, "attribute": attr,
                               "n_matching": len(ids)}
        if len(ids) == 1:
            row |= {"status": "scored", "object": ids[0], **score_map(result.maps[i], mask == ids[0], tolerance)}
        else:
            row["status"] = "absent" if not ids else "ambiguous"
        rows.append(row)
    return rows


def word_table(results: dict[int, list["AttentionResult"]] | list["AttentionResult"],
               objects: Sequence[Sequence[dict[str, Any]]], masks: Sequence[np.ndarray]) -> "pd.DataFrame":
    """Per (layer, image, word) rows for captured results ({layer: results} or one list) against objects/masks."""
    import pandas as pd

    per_layer = results if isinstance(results, dict) else {"-": results}
    rows = []
    for layer, res in per_layer.items():
        if len(res) != len(objects) or len(res) != len(masks):
            raise DataError(f"{len(res)} results but {len(objects)} object lists and {len(masks)} masks")
        for r, objs, m in zip(res, objects, masks):
            rows += [{"layer": layer, **row} for row in score_result(r, objs, m)]
    return pd.DataFrame(rows, columns=["layer", "image", "word_index", "word", "attribute", "n_matching", "status",
                                       "object", *METRICS])


def summarize(words: "pd.DataFrame", by: Sequence[str] = ("layer",)) -> "pd.DataFrame":
    """Per-layer (or per `by` group) means of the metrics over scored words, counts, and the gains over the
    random-point baseline."""
    import pandas as pd

    by = list(by)
    scored = words[words["status"] == "scored"]
    metrics = list(METRICS) + [c for c in DELETION if c in words.columns]
    counts = words.groupby(by)["status"].value_counts().unstack(fill_value=0)
    table = scored.groupby(by)[metrics].mean()
    table["n_scored"] = scored.groupby(by).size()
    table = table.join(counts.reindex(columns=["ambiguous", "absent"], fill_value=0), how="outer").fillna(
        {"n_scored": 0, "ambiguous": 0, "absent": 0})
    for c in ("n_scored", "ambiguous", "absent"):
        table[c] = table[c].astype(int)
    table["pointing_gain"] = table["pointing_patch"] - table["random_point"]
    table["mass_gain"] = table["mass_share"] - table["random_point"]
    if "deletion_drop" in table.columns:
        table["deletion_gain"] = table["deletion_drop"] - table["deletion_random"]
    return pd.DataFrame(table).reset_index()


def load_annotated(images_dir: str | os.PathLike, masks_dir: str | os.PathLike, objects_json: str | os.PathLike,
                   limit: int | None = None) -> tuple[list[Path], list[list[dict[str, Any]]], list[np.ndarray]]:
    """(image paths, object lists, label masks) of the images in `images_dir` that have objects (sorted, first `limit`)."""
    from captionlab.data.captions import load_objects
    from captionlab.data.images import list_images, load_mask

    objects = load_objects(objects_json)
    paths = [p for p in list_images(images_dir) if Path(p).stem in objects][:limit]
    if not paths:
        raise DataError(f"{images_dir}: no images listed in {objects_json}")
    return ([Path(p) for p in paths], [objects[Path(p).stem] for p in paths],
            [load_mask(Path(masks_dir) / f"{Path(p).stem}.png") for p in paths])


def layer_report(model: Any, images: Sequence[Any], objects: Sequence[Sequence[dict[str, Any]]],
                 masks: Sequence[np.ndarray], layers: Any = "all", heads: Any = "mean", prompt: str | None = None,
                 words: bool = False, **capture_kw: Any) -> "pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]":
    """Per-layer pointing game / mass share of `model` (PEFT captioner or LLaVA) on annotated images, from one
    generation pass capturing every requested layer; with `words=True` also the per-word table."""
    from captionlab.attention.capture import capture_layers

    per = capture_layers(model, images, layers, prompt=prompt, heads=heads, **capture_kw)
    table = word_table(per, objects, masks)
    summary = summarize(table)
    return (summary, table) if words else summary


def delete_patches(image: Any, cells: np.ndarray, grid: tuple[int, int]) -> Any:
    """A copy of the (square) PIL image with the patch cells (flat indices on `grid`) filled with its mean colour."""
    from PIL import Image

    a = np.asarray(image, dtype=np.float32).copy()
    H, W = a.shape[:2]
    mean = a.reshape(-1, a.shape[-1]).mean(0)
    gh, gw = grid
    for cell in np.asarray(cells).reshape(-1):
        r, c = divmod(int(cell), gw)
        a[r * H // gh:(r + 1) * H // gh, c * W // gw:(c + 1) * W // gw] = mean
    return Image.fromarray(a.round().clip(0, 255).astype(np.uint8))


def _deletion(model: Any, image: Any, ids: list[int], rows: list[dict[str, Any]], maps: dict[Any, Any],
              share: float, n_random: int, rng: np.random.Generator, prompt: str | None) -> None:
    """Fill rows' deletion_drop / deletion_random: word log-prob drop when the top `share` patches by each
    row's map, or as many random patches, are removed (one batched forward per image)."""
    from captionlab.attention.explain import caption_logprobs

    if not rows:
        return
    any_res = next(iter(maps.values()))
    grid = any_res.grid
    n_cells = grid[0] * grid[1]
    k = max(1, int(round(share * n_cells)))
    images = [image]
    plan = []  # (row, index of its top-k deleted image)
    randoms: dict[int, list[int]] = {}
    for row in rows:
        res = maps[row["method"], row["layer"]]
        top = np.argsort(-res.maps[row["word_index"]].reshape(-1), kind="stable")[:k]
        images.append(delete_patches(image, top, grid))
        plan.append((row, len(images) - 1))
        w = row["word_index"]
        if w not in randoms:
            randoms[w] = []
            for _ in range(n_random):
                images.append(delete_patches(image, rng.choice(n_cells, k, replace=False), grid))
                randoms[w].append(len(images) - 1)
    lp = caption_logprobs(model, images, ids, prompt=prompt)
    for row, top_i in plan:
        toks = any_res.word_groups[row["word_index"]]
        word_lp = lp[:, toks].sum(1)
        row["deletion_drop"] = float(word_lp[0] - word_lp[top_i])
        row["deletion_random"] = float(np.mean([word_lp[0] - word_lp[j] for j in randoms[row["word_index"]]]))


def method_report(model: Any, images: Sequence[Any], objects: Sequence[Sequence[dict[str, Any]]],
                  masks: Sequence[np.ndarray], captions: Sequence[Any] | None = None,
                  methods: Sequence[str] = ("raw", "rollout", "grad", "relevancy"), layers: Any = "all",
                  heads: Any = "mean", prompt: str | None = None, tolerance: float = TOLERANCE,
                  deletion: float = 0.1, n_random: int = 3, seed: int = 0, max_new_tokens: int | None = None,
                  progress: bool = True) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """(summary per method x layer, per-word rows) of pointing game, mass share and deletion for `model`'s
    teacher-forced explanations of `captions` (default: its own greedy captions) on annotated images."""
    import pandas as pd
    from tqdm.auto import tqdm

    from captionlab.attention.explain import explain_all, generate_ids

    if len(images) != len(objects) or len(images) != len(masks):
        raise DataError(f"{len(images)} images but {len(objects)} object lists and {len(masks)} masks")
    if captions is None:
        captions = generate_ids(model, images, prompt=prompt, max_new_tokens=max_new_tokens)
    if len(captions) != len(images):
        raise DataError(f"{len(images)} images but {len(captions)} captions")
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for img, cap, objs, mask in tqdm(list(zip(images, captions, objects, masks)), desc="faithfulness",
                                     unit="image", disable=not progress):
        if len(cap) == 0:
            continue
        per = explain_all(model, img, cap, methods, layers, heads, "words", prompt)
        mine: list[dict[str, Any]] = []
        for (method, layer), res in per.items():
            for r in score_result(res, objs, mask, tolerance):
                mine.append({"method": method, "layer": layer, **r})
        if deletion > 0:
            scored = [r for r in mine if r["status"] == "scored"]
            first = next(iter(per.values()))
            ids = first.token_ids
            _deletion(model, first.image, ids, scored, per, deletion, n_random, rng, prompt)
        rows += mine
    cols = ["method", "layer", "image", "word_index", "word", "attribute", "n_matching", "status", "object",
            *METRICS, *DELETION]
    words = pd.DataFrame(rows, columns=cols)
    return summarize(words, by=("method", "layer")), words


def best_row(summary: "pd.DataFrame", metric: str = "pointing_pixel") -> "pd.Series":
    """The summary row (method, layer, ...) with the highest `metric` (ties: first in table order)."""
    if summary.empty or metric not in summary.columns:
        raise DataError(f"best_row: no {metric!r} values in the summary")
    return summary.loc[summary[metric].astype(float).idxmax()]


def faithfulness_note(best: dict[str, Any]) -> str:
    """One sentence per model: its best method / layer and that row's pointing figures against the baselines."""
    parts = []
    for name, row in best.items():
        parts.append(f"{name}: best {row['method']} at layer {int(row['layer'])}, pointing {row['pointing_pixel']:.2f} "
                     f"(with tolerance {row['pointing_tol']:.2f}) vs random point {row['random_point']:.2f} "
                     f"({row['random_tol']:.2f}); mass share {row['mass_share']:.2f}"
                     + (f"; deletion drop {row['deletion_drop']:.2f} vs random {row['deletion_random']:.2f}"
                        if "deletion_drop" in row and row["deletion_drop"] == row["deletion_drop"] else "")
                     + f" (n={int(row['n_scored'])} words)")
    return "; ".join(parts) + "." if parts else "no object masks in this world: faithfulness not measured."
