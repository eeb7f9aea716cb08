"""Does attention land on the object a word names? Pointing game and mass share against object masks.

For each caption word that is a colour or a shape word ("red", "circles"), the object(s) of the image with
that attribute are looked up in the objects JSON; words that match no object (hallucinated) or several objects
(ambiguous) are skipped. For each kept word:
- `pointing_patch`: the share of the attention-peak *patch* covered by the object mask (the chance that a
  random point of the peak patch is on the object); `pointing_pixel`: the peak of the bilinear-upsampled map
  is on the object (0/1);
- `mass_share`: the share of the (sum-normalised, upsampled) attention mass inside the mask;
- `random_point`: the baseline for all three = the mask's share of the image area (a uniformly random
  point, or uniform attention).
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

METRICS = ("pointing_patch", "pointing_pixel", "mass_share", "random_point")


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


def score_map(m: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Pointing game (patch / pixel) and mass share of one (gh, gw) map against a boolean (H, W) object mask."""
    mask = np.asarray(mask, dtype=bool)
    gh, gw = m.shape
    cover = mask_to_grid(mask, (gh, gw))
    r, c = np.unravel_index(int(np.argmax(m)), m.shape)
    up = upsample(normalize(m, "sum"), mask.shape)
    y, x = np.unravel_index(int(np.argmax(up)), up.shape)
    total = float(up.sum())
    return {"pointing_patch": float(cover[r, c]), "pointing_pixel": float(mask[y, x]),
            "mass_share": float(up[mask].sum() / total) if total > 0 else 0.0,
            "random_point": float(mask.mean())}


def score_result(result: "AttentionResult", objects: Sequence[dict[str, Any]], mask: np.ndarray) -> list[dict[str, Any]]:
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
            row |= {"status": "scored", "object": ids[0], **score_map(result.maps[i], mask == ids[0])}
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


def summarize(words: "pd.DataFrame") -> "pd.DataFrame":
    """Per-layer means of the metrics over scored words, counts, and the gains over the random-point baseline."""
    import pandas as pd

    scored = words[words["status"] == "scored"]
    counts = words.groupby("layer")["status"].value_counts().unstack(fill_value=0)
    table = scored.groupby("layer")[list(METRICS)].mean()
    table["n_scored"] = scored.groupby("layer").size()
    table = table.join(counts.reindex(columns=["ambiguous", "absent"], fill_value=0), how="outer").fillna(
        {"n_scored": 0, "ambiguous": 0, "absent": 0})
    for c in ("n_scored", "ambiguous", "absent"):
        table[c] = table[c].astype(int)
    table["pointing_gain"] = table["pointing_patch"] - table["random_point"]
    table["mass_gain"] = table["mass_share"] - table["random_point"]
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
