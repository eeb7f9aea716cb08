"""Dataset overviews for the report (any course-layout root, demo or real): split sizes, caption stats, samples."""

from __future__ import annotations

import collections
import random
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from captionlab.data import CaptionSet, list_images, load_captions, load_image, load_mask, load_objects

# (split name, annotation file, image folder, masks folder, objects file) relative to the data root.
CAPTION_SPLITS = (
    ("p2 train", "p2_data/train.json", "p2_data/images/train", "p2_data/masks/train", "p2_data/objects_train.json"),
    ("p2 val", "p2_data/val.json", "p2_data/images/val", "p2_data/masks/val", "p2_data/objects_val.json"),
    ("p1 val", "p1_data/val.json", "p1_data/images/val", "p1_data/masks/val", "p1_data/objects_val.json"),
)


def caption_splits(root: str | Path) -> list[tuple[str, Path, Path, Path, Path]]:
    """The caption splits present under `root`, with absolute paths."""
    root = Path(root)
    return [(name, root / a, root / i, root / m, root / o) for name, a, i, m, o in CAPTION_SPLITS if (root / a).exists()]


def overview(root: str | Path) -> list[dict[str, Any]]:
    """One row per split: images, captions per image, mean caption words, vocabulary, masks/objects present."""
    root = Path(root)
    rows = []
    for name, ann, images, masks, objects in caption_splits(root):
        cs = load_captions(ann)
        caps = [c for cl in cs.captions.values() for c in cl]
        words = [w.strip(".,").lower() for c in caps for w in c.split()]
        rows.append({"split": name, "images": len(cs), "captions": len(caps),
                     "captions/image": len(caps) / max(1, len(cs)),
                     "mean words": len(words) / max(1, len(caps)), "vocabulary": len(set(words)),
                     "masks": masks.is_dir(), "objects": objects.exists()})
    p3 = root / "p3_data" / "images"
    if p3.is_dir():
        rows.append({"split": "p3 (attention)", "images": len(list_images(p3, on_error="skip"))})
    for split in ("train", "val"):
        cls = root / "p1_data" / split
        if cls.is_dir():
            files = sorted(cls.glob("*.png"))
            labels = {f.name.split("_", 1)[0] for f in files}
            rows.append({"split": f"p1 zero-shot {split}", "images": len(files), "classes": len(labels)})
    return rows


def object_stats(objects_json: str | Path) -> dict[str, collections.Counter]:
    """Counters of objects per image, colour, shape and size from an objects JSON (demo world)."""
    objects = load_objects(objects_json)
    return {"objects per image": collections.Counter(len(v) for v in objects.values()),
            "colour": collections.Counter(o["colour"] for v in objects.values() for o in v),
            "shape": collections.Counter(o["shape"] for v in objects.values() for o in v),
            "size": collections.Counter(o["size"] for v in objects.values() for o in v)}


def stats_figure(annotations: str | Path, objects_json: str | Path | None = None) -> Any:
    """Caption-length histogram, most frequent words, and (when given) object counts per attribute."""
    import matplotlib.pyplot as plt

    cs = load_captions(annotations)
    caps = [c for cl in cs.captions.values() for c in cl]
    words = collections.Counter(w.strip(".,").lower() for c in caps for w in c.split())
    stats = object_stats(objects_json) if objects_json and Path(objects_json).exists() else {}
    fig, axes = plt.subplots(1, 2 + len(stats), figsize=(3.2 * (2 + len(stats)), 2.8), squeeze=False)
    ax = axes[0]
    ax[0].hist([len(c.split()) for c in caps], bins=range(1, 30), color="#4c72b0")
    ax[0].set_title("caption length (words)")
    top = words.most_common(15)
    ax[1].barh([w.replace("$", r"\$") for w, _ in top][::-1], [n for _, n in top][::-1], color="#55a868")  # "$" literal
    ax[1].set_title("most frequent words")
    ax[1].tick_params(labelsize=7)
    for a, (name, counter) in zip(ax[2:], stats.items()):
        keys = sorted(counter)
        a.bar([str(k) for k in keys], [counter[k] for k in keys], color="#c44e52")
        a.set_title(name)
        a.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.tight_layout()
    return fig


def sample_figure(annotations: str | Path, images_dir: str | Path, masks_dir: str | Path | None = None,
                  n: int = 8, seed: int = 0, ncols: int = 4) -> Any:
    """A grid of `n` random images with one reference caption each, each followed by its mask when present."""
    from captionlab.report.figures import image_grid

    cs = load_captions(annotations)
    stems = random.Random(seed).sample(cs.stems, min(n, len(cs)))
    images, titles = [], []
    for stem in stems:
        images.append(load_image(cs.image_path(images_dir, stem)))
        titles.append(cs.captions[stem][0])
        mask = Path(masks_dir) / f"{stem}.png" if masks_dir else None
        if mask is not None and mask.exists():
            m = load_mask(mask)
            images.append(m)
            titles.append(f"mask: {int(m.max())} object(s)")
    per_row = ncols * (2 if len(images) > len(stems) else 1)
    return image_grid(images, titles, ncols=per_row, size=1.9)


def subset(captions: CaptionSet, keep: int | Iterable[str]) -> CaptionSet:
    """The first `keep` images (an int; 0 = all) or the given stems of a CaptionSet, for scoring a subset."""
    if isinstance(keep, int):
        stems = captions.stems[:keep] if keep > 0 else captions.stems
    else:
        wanted = set(keep)
        stems = [s for s in captions.stems if s in wanted]
    return CaptionSet(captions={s: captions.captions[s] for s in stems},
                      file_names={s: captions.file_names[s] for s in stems},
                      image_ids={s: captions.image_ids[s] for s in stems}, path=captions.path)


def class_folder_subset(src: str | Path, dst: str | Path, per_class: int) -> Path:
    """Symlink the first `per_class` images of each label of a `<label>_<n>.png` folder into `dst` (quick runs)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    seen: collections.Counter = collections.Counter()
    for f in sorted(src.glob("*.png"), key=lambda p: (p.name.split("_", 1)[0], p.name)):
        label = f.name.split("_", 1)[0]
        if seen[label] < per_class:
            seen[label] += 1
            link = dst / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    return dst
