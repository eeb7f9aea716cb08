"""The demo world: seeded 64x64 shapes images with masks, object lists and five captions each, in the course layout.

Every image is drawn from its own `np.random.default_rng((seed, split, index))`, so a world is byte-identical per
seed. Each top-level split directory is built in a temporary directory and renamed into place; `world.json` is
written last, so a killed build never looks complete.
"""

from __future__ import annotations

import colorsys
import io
import json
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from captionlab.utils import atomic_write_json

GENERATOR_VERSION = "2"
IMAGE_SIZE = 64
JPEG_QUALITY = 95

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 20),
    "purple": (140, 50, 185),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: dict[str, tuple[int, int]] = {"small": (6, 8), "large": (11, 13)}  # half-extent range in pixels
BACKGROUNDS: tuple[str, ...] = ("noise", "stripes", "gradient")
CLASS_NAMES: list[str] = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # label id = index

DEFAULT_SIZES: dict[str, int] = {
    "p2_train": 4000,
    "p2_val": 500,
    "p1_val": 200,
    "p1_cls_train": 50,  # per class
    "p1_cls_val": 15,  # per class
}
_SPLIT_CODES = {"p2_train": 1, "p2_val": 2, "p1_val": 3, "p1_cls_train": 4, "p1_cls_val": 5, "p3": 6}
_NUMBERS = {1: "one", 2: "two", 3: "three"}

# p3: five hand-placed scenes with readable names.
P3_SCENES: dict[str, list[tuple[str, str, str, tuple[int, int]]]] = {
    "red_circle": [("red", "circle", "large", (32, 32))],
    "blue_square_left_of_yellow_star": [("blue", "square", "large", (17, 34)), ("yellow", "star", "large", (47, 30))],
    "green_triangle_above_purple_circle": [("green", "triangle", "small", (30, 15)), ("purple", "circle", "large", (33, 44))],
    "two_yellow_squares": [("yellow", "square", "small", (15, 20)), ("yellow", "square", "small", (46, 44))],
    "three_shapes": [("red", "star", "small", (12, 14)), ("blue", "circle", "large", (44, 20)),
                     ("purple", "triangle", "large", (24, 46))],
}


@dataclass
class Obj:
    """One drawn object: its label k (1-based), attributes, centre and bounding box [x0, y0, x1, y1) in pixels."""

    id: int
    colour: str
    shape: str
    size: str
    cx: float
    cy: float
    r: int
    bbox: list[int]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "colour": self.colour, "shape": self.shape, "size": self.size, "bbox": self.bbox}


# ----------------------------------------------------------------------------------------------- drawing


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.random(), rng.uniform(0.04, 0.18), rng.uniform(0.55, 0.85)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def _background(rng: np.random.Generator, kind: str) -> np.ndarray:
    n = IMAGE_SIZE
    c0, c1 = _muted_colour(rng), _muted_colour(rng)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    if kind == "noise":
        img = c0 + rng.normal(0.0, 9.0, size=(n, n, 1))
        img = img + rng.normal(0.0, 3.0, size=(n, n, 3))
    elif kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 14)
        t = (np.cos(angle) * xx + np.sin(angle) * yy) / period
        w = (np.sin(2 * np.pi * t) > 0).astype(np.float64)[..., None]
        img = c0 * (1 - w) + c1 * w
    else:  # gradient
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = ((t - t.min()) / (np.ptp(t) + 1e-9))[..., None]
        img = c0 * (1 - t) + c1 * t
    return img


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = -np.pi / 2 + i * np.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
        return pts
    raise ValueError(shape)


def _draw_mask(mask: Image.Image, shape: str, cx: float, cy: float, r: int, value: int) -> None:
    draw = ImageDraw.Draw(mask)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=value)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=value)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=value)


def render_scene(rng: np.random.Generator, specs: list[tuple[str, str, str, tuple[int, int] | None]],
                 background: str | None = None) -> tuple[Image.Image, np.ndarray, list[Obj], str]:
    """Draw objects (colour, shape, size, centre or None = random non-overlapping) on a textured background."""
    n = IMAGE_SIZE
    background = background or BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    img = _background(rng, background)
    mask = Image.new("L", (n, n), 0)
    objs: list[Obj] = []
    boxes: list[tuple[float, float, float, float]] = []
    for colour, shape, size, centre in specs:
        lo, hi = SIZES[size]
        r = int(rng.integers(lo, hi + 1))
        for _attempt in range(100):
            if centre is not None:
                cx, cy = float(centre[0]), float(centre[1])
            else:
                cx, cy = rng.uniform(r + 1, n - r - 2, size=2)
            box = (cx - r - 2, cy - r - 2, cx + r + 2, cy + r + 2)
            if centre is not None or all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1]
                                         for b in boxes):
                break
        else:
            continue  # no room: drop this object
        k = len(objs) + 1
        _draw_mask(mask, shape, cx, cy, r, k)
        boxes.append(box)
        objs.append(Obj(k, colour, shape, size, float(cx), float(cy), r, []))
    m = np.asarray(mask, dtype=np.uint8).copy()
    for o in objs:
        ys, xs = np.nonzero(m == o.id)
        o.bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        jitter = rng.normal(0.0, 8.0, size=3)
        shade = rng.normal(0.0, 4.0, size=(len(ys), 1))
        img[ys, xs] = np.asarray(COLOURS[o.colour], dtype=np.float64) + jitter + shade
    pil = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    return pil, m, objs, background


def _random_specs(rng: np.random.Generator, n_objects: int) -> list[tuple[str, str, str, None]]:
    colours, shapes = list(COLOURS), list(SHAPES)
    specs: list[tuple[str, str, str, None]] = []
    for i in range(n_objects):
        if i > 0 and rng.random() < 0.25:  # a repeat of the first object, so counts ("two red circles") occur
            colour, shape = specs[0][0], specs[0][1]
        else:
            colour, shape = colours[int(rng.integers(len(colours)))], shapes[int(rng.integers(len(shapes)))]
        size = "small" if rng.random() < 0.5 else "large"
        specs.append((colour, shape, size, None))
    return specs


# ----------------------------------------------------------------------------------------------- captions


def _np(o: Obj, size: bool = False) -> str:
    return f"a {o.size + ' ' if size else ''}{o.colour} {o.shape}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def relation(a: Obj, b: Obj) -> str:
    """Where `a` is relative to `b`: the dominant axis of the centre offset."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _position(o: Obj) -> str:
    def third(v: float) -> int:
        return 0 if v < IMAGE_SIZE / 3 else (2 if v > 2 * IMAGE_SIZE / 3 else 1)

    row, col = third(o.cy), third(o.cx)
    if row == 1 and col == 1:
        return "in the centre"
    if row == 1:
        return "on the " + ["left", "", "right"][col]
    if col == 1:
        return "at the " + ["top", "", "bottom"][row]
    return f"in the {['top', '', 'bottom'][row]} {['left', '', 'right'][col]}"


def _grouped(objs: list[Obj]) -> list[str]:
    """Noun phrases grouping identical colour+shape objects: 'two red circles', 'a blue square'."""
    groups: dict[tuple[str, str], int] = {}
    for o in objs:
        groups[(o.colour, o.shape)] = groups.get((o.colour, o.shape), 0) + 1
    return [f"a {c} {s}" if k == 1 else f"{_NUMBERS[k]} {c} {s}s" for (c, s), k in groups.items()]


def make_captions(rng: np.random.Generator, objs: list[Obj], background: str, k: int = 5) -> list[str]:
    """`k` distinct captions for a scene from varied templates (plain, sizes, relations, counts, positions)."""
    bg = {"noise": "noisy", "stripes": "striped", "gradient": "gradient"}[background]
    cands: list[str] = []
    order = [objs[i] for i in rng.permutation(len(objs))]
    ltr = sorted(objs, key=lambda o: o.cx)
    if len(objs) == 1:
        o = objs[0]
        cands += [f"a photo of {_np(o)}", _np(o, size=True), f"{_np(o)} on a {bg} background",
                  f"{_np(o)} {_position(o)}", f"a single {o.colour} {o.shape}", f"an image of {_np(o, size=True)}",
                  f"there is {_np(o)} {_position(o)} of the picture", f"one {o.size} {o.colour} {o.shape}"]
    else:
        grouped = _grouped(order)
        cands += [f"a photo of {_join(grouped)}", _join([_np(o, size=True) for o in order]),
                  f"{_NUMBERS[len(objs)]} shapes: {_join([_np(o) for o in order])}",
                  f"{_join(grouped)} on a {bg} background",
                  "from left to right: " + _join([_np(o) for o in ltr])]
        a, b = order[0], order[1]
        rel = f"{_np(a)} {relation(a, b)} {_np(b)}"
        if (a.colour, a.shape) == (b.colour, b.shape):  # identical pair: say how they are arranged instead
            side = relation(a, b) in ("to the left of", "to the right of")
            rel = f"two {a.colour} {a.shape}s" + (" side by side" if side else ", one above the other")
        if len(objs) == 3:
            rel = _join(grouped) if len(grouped) == 1 else f"{rel}, plus {_np(order[2])}"
        cands.append(rel)
        a2, b2 = order[-1], order[0]
        if (a2.colour, a2.shape, a2.size) != (b2.colour, b2.shape, b2.size):
            cands.append(f"{_np(a2, size=True)} {relation(a2, b2)} {_np(b2, size=True)}")
        if len(grouped) < len(objs):
            cands.append(_join(grouped))
        cands.append(f"{_np(order[0])} {_position(order[0])}, with {_join([_np(o) for o in order[1:]])}")
    cands = list(dict.fromkeys(cands))
    pick = rng.choice(len(cands), size=min(k, len(cands)), replace=False)
    return [cands[i] for i in sorted(pick)]


MENTION_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")s?\b")


def mentioned_objects(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, e.g. 'two red circles' -> [('red', 'circle')]."""
    return [(m.group(1), m.group(2)) for m in MENTION_RE.finditer(caption.lower())]


# ----------------------------------------------------------------------------------------------- splits


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_CODES[split], index])


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        img.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def _caption_item(args: tuple[int, str, int]) -> tuple[bytes, bytes, list[dict], list[str]]:
    seed, split, i = args
    rng = _rng(seed, split, i)
    n_obj = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    img, mask, objs, bg = render_scene(rng, _random_specs(rng, n_obj))
    caps = make_captions(rng, objs, bg)
    return _encode(img, "JPEG"), _encode(Image.fromarray(mask, "L"), "PNG"), [o.to_json() for o in objs], caps


def _cls_item(args: tuple[int, str, int]) -> bytes:
    seed, split, i = args
    rng = _rng(seed, split, i)
    colour, shape = CLASS_NAMES[i % len(CLASS_NAMES)].split()
    size = "small" if rng.random() < 0.5 else "large"
    img, _, _, _ = render_scene(rng, [(colour, shape, size, None)])
    return _encode(img, "PNG")


def _map(fn, items: list, workers: int) -> list:
    if workers <= 1 or len(items) < 200:
        return [fn(x) for x in items]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items, chunksize=64))


def _write_caption_split(base: Path, split_name: str, prefix: str, seed: int, split: str, n: int,
                         workers: int, objects_name: str, ann_name: str) -> None:
    from tqdm.auto import tqdm

    img_dir, mask_dir = base / "images" / split_name, base / "masks" / split_name
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    results = _map(_caption_item, [(seed, split, i) for i in range(n)], workers)
    images, annotations, objects = [], [], {}
    for i, (jpg, png, objs, caps) in enumerate(tqdm(results, desc=f"write {split}", leave=False)):
        stem = f"{prefix}{i:05d}"
        (img_dir / f"{stem}.jpg").write_bytes(jpg)
        (mask_dir / f"{stem}.png").write_bytes(png)
        images.append({"file_name": f"{stem}.jpg", "id": i})
        for c in caps:
            annotations.append({"image_id": i, "caption": c, "id": len(annotations)})
        objects[stem] = objs
    _dump(base / ann_name, {"images": images, "annotations": annotations})
    _dump(base / objects_name, objects)


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _build_p1(tmp: Path, seed: int, sizes: dict[str, int], workers: int) -> None:
    base = tmp / "p1_data"
    _write_caption_split(base, "val", "p1val_", seed, "p1_val", sizes["p1_val"], workers, "objects_val.json", "val.json")
    for split_name, key in (("train", "p1_cls_train"), ("val", "p1_cls_val")):
        out = base / split_name
        out.mkdir(parents=True)
        n = sizes[key] * len(CLASS_NAMES)
        for i, png in enumerate(_map(_cls_item, [(seed, key, i) for i in range(n)], workers)):
            (out / f"{i % len(CLASS_NAMES)}_{i // len(CLASS_NAMES)}.png").write_bytes(png)
    _dump(base / "id2label.json", {str(i): name for i, name in enumerate(CLASS_NAMES)})


def _build_p2(tmp: Path, seed: int, sizes: dict[str, int], workers: int) -> None:
    base = tmp / "p2_data"
    for split_name, key in (("train", "p2_train"), ("val", "p2_val")):
        _write_caption_split(base, split_name, f"{split_name}_", seed, key, sizes[key], workers,
                             f"objects_{split_name}.json", f"{split_name}.json")


def _build_p3(tmp: Path, seed: int) -> None:
    base = tmp / "p3_data"
    (base / "images").mkdir(parents=True)
    (base / "masks").mkdir()
    objects = {}
    for i, (name, specs) in enumerate(P3_SCENES.items()):
        img, mask, objs, _ = render_scene(_rng(seed, "p3", i), list(specs))
        (base / "images" / f"{name}.jpg").write_bytes(_encode(img, "JPEG"))
        (base / "masks" / f"{name}.png").write_bytes(_encode(Image.fromarray(mask, "L"), "PNG"))
        objects[name] = [o.to_json() for o in objs]
    _dump(base / "objects.json", objects)


def build_world(root: str | os.PathLike, seed: int = 0, sizes: dict[str, int] | None = None,
                workers: int | None = None) -> Path:
    """Generate the demo world of `seed` under `root` (course layout + world.json); `sizes` overrides split sizes."""
    root = Path(root)
    unknown = set(sizes or {}) - set(DEFAULT_SIZES)
    if unknown:
        raise ValueError(f"unknown world sizes {sorted(unknown)}; known: {sorted(DEFAULT_SIZES)}")
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "world.json"
    old = json.loads(marker.read_text()) if marker.exists() else None
    if marker.exists():
        marker.unlink()  # the world is incomplete from here until the new marker is written
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    builders = {"p1_data": lambda t: _build_p1(t, seed, sizes, workers),
                "p2_data": lambda t: _build_p2(t, seed, sizes, workers),
                "p3_data": lambda t: _build_p3(t, seed)}
    for name, build in builders.items():
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            build(tmp)
            if (root / name).exists():  # swap by renames, delete the old copy afterwards
                (root / name).rename(tmp / "previous")
            (tmp / name).rename(root / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    info = {"generator_version": GENERATOR_VERSION, "seed": seed, "sizes": sizes,
            "vocab": {"colours": list(COLOURS), "shapes": list(SHAPES), "sizes": list(SIZES),
                      "backgrounds": list(BACKGROUNDS), "relations": ["to the left of", "to the right of",
                                                                      "above", "below"]},
            "class_names": CLASS_NAMES, "p3_images": [f"{n}.jpg" for n in P3_SCENES],
            "image_size": IMAGE_SIZE, "build_seconds": round(seconds, 2),
            "build_cpu_seconds": round(cpu, 2), "workers": workers}
    if old and any(old.get(k) != info[k] for k in ("generator_version", "seed", "sizes")):
        _drop_stale_models(root)
    atomic_write_json(marker, info)
    return root


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the worker pool)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _drop_stale_models(root: Path) -> None:
    """Remove finished model checkpoints trained on a previous world (builds in progress are left alone)."""
    for marker in (root / "models").glob("*/captionlab_build.json"):
        shutil.rmtree(marker.parent, ignore_errors=True)


def world_info(root: str | os.PathLike) -> dict[str, Any]:
    """The world.json of a built world (raises FileNotFoundError naming the file when the world is incomplete)."""
    path = Path(root) / "world.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no world.json (world not built or build incomplete)")
    return json.loads(path.read_text(encoding="utf-8"))
