"""Caption annotations, predictions, zero-shot CSVs and object lists: strict loaders with errors naming the file."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captionlab.errors import DataError
from captionlab.utils import atomic_write_json, atomic_write_text


@dataclass
class CaptionSet:
    """Reference captions of one split: per file stem its captions, file name and image id."""

    captions: dict[str, list[str]]
    file_names: dict[str, str]
    image_ids: dict[str, int | str]
    path: Path | None = field(default=None, compare=False)

    @property
    def stems(self) -> list[str]:
        """Stems in annotation-file order."""
        return list(self.file_names)

    def __len__(self) -> int:
        return len(self.file_names)

    def image_path(self, image_dir: str | os.PathLike, stem: str) -> Path:
        """Path of the image of `stem` inside `image_dir`."""
        return Path(image_dir) / self.file_names[stem]


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The parsed JSON file `path` (`what` it is names it in errors: missing, invalid JSON, not UTF-8)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _few(items: Iterable[Any], n: int = 5) -> str:
    items = list(items)
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(repr(x) for x in items[:n]) + more


def load_captions(json_path: str | os.PathLike) -> CaptionSet:
    """Read a course annotation file {"images": [...], "annotations": [...]} and validate it strictly."""
    path = Path(json_path)
    data = read_json(path, "annotation")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'images' and 'annotations', got {type(data).__name__}")
    missing = [k for k in ("images", "annotations") if k not in data]
    if missing:
        raise DataError(f"{path}: missing top-level key(s) {missing}")
    images, annotations = data["images"], data["annotations"]
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise DataError(f"{path}: 'images' and 'annotations' must be lists")

    file_names: dict[str, str] = {}
    image_ids: dict[str, int | str] = {}
    stem_of: dict[Any, str] = {}
    for i, img in enumerate(images):
        if not isinstance(img, dict) or "file_name" not in img or "id" not in img:
            raise DataError(f"{path}: images[{i}] must be an object with 'file_name' and 'id', got {img!r:.80}")
        name, iid = img["file_name"], img["id"]
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{path}: images[{i}] has an invalid file_name {name!r}")
        if isinstance(iid, bool) or not isinstance(iid, (int, str)):
            raise DataError(f"{path}: images[{i}] has an invalid id {iid!r} (expected int or str)")
        stem = Path(name).stem
        if stem in file_names:
            raise DataError(f"{path}: duplicate file name {name!r} (images[{i}]; stems must be unique)")
        if iid in stem_of:
            raise DataError(f"{path}: duplicate image id {iid!r} (images[{i}] and {stem_of[iid]!r})")
        file_names[stem], image_ids[stem], stem_of[iid] = name, iid, stem

    captions: dict[str, list[str]] = {stem: [] for stem in file_names}
    unknown: list[Any] = []
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise DataError(f"{path}: annotations[{i}] must be an object with 'image_id' and 'caption', got {ann!r:.80}")
        cap = ann["caption"]
        if not isinstance(cap, str):
            raise DataError(f"{path}: annotations[{i}] caption is {type(cap).__name__}, expected a string")
        if not cap.strip():
            raise DataError(f"{path}: annotations[{i}] caption is empty")
        iid = ann["image_id"]
        if isinstance(iid, bool) or not isinstance(iid, (int, str)) or iid not in stem_of:
            unknown.append(iid)
            continue
        captions[stem_of[iid]].append(cap)
    if unknown:
        raise DataError(f"{path}: {len(unknown)} caption(s) refer to unknown image ids: {_few(unknown)}")
    empty = [s for s, caps in captions.items() if not caps]
    if empty:
        raise DataError(f"{path}: {len(empty)} image(s) have no caption: {_few(file_names[s] for s in empty)}")
    return CaptionSet(captions=captions, file_names=file_names, image_ids=image_ids, path=path)


def load_predictions(path: str | os.PathLike, expected: Iterable[str] | None = None) -> dict[str, str]:
    """Read a predictions JSON {stem: caption}; with `expected`, require exactly that key set."""
    path = Path(path)
    data = read_json(path, "predictions")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{file_stem: caption}}, got {type(data).__name__}")
    bad = [k for k, v in data.items() if not isinstance(v, str)]
    if bad:
        raise DataError(f"{path}: prediction(s) that are not strings for {_few(bad)}")
    if expected is not None:
        check_prediction_keys(data, expected, path)
    return data


def check_prediction_keys(preds: Mapping[str, str], expected: Iterable[str], path: str | os.PathLike = "predictions") -> None:
    """Raise DataError naming missing and extra stems unless `preds` has exactly the `expected` keys."""
    expected = set(expected)
    missing, extra = sorted(expected - set(preds)), sorted(set(preds) - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_few(missing)})")
        if extra:
            parts.append(f"{len(extra)} unexpected ({_few(extra)})")
        hint = " — keys must be file stems without extension" if any("." in k for k in extra) else ""
        raise DataError(f"{path}: prediction keys differ from the ground truth: {'; '.join(parts)}{hint}")


def save_predictions(path: str | os.PathLike, predictions: Mapping[str, str]) -> Path:
    """Write {stem: caption} as JSON atomically (keys sorted); values must be strings."""
    bad = [k for k, v in predictions.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise DataError(f"{path}: predictions must map str stems to str captions; bad entries: {_few(bad)}")
    return atomic_write_json(path, dict(sorted(predictions.items())))


def read_zeroshot_csv(path: str | os.PathLike) -> dict[str, int]:
    """Read a zero-shot CSV with header `filename,label` into {filename: label id}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: zero-shot CSV not found")
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DataError(f"{path}: expected header 'filename,label', got {','.join(rows[0]) if rows else 'an empty file'!r}")
    out: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            raise DataError(f"{path}: line {line}: expected 2 columns, got {len(row)}")
        name, label = row[0].strip(), row[1].strip()
        if not name:
            raise DataError(f"{path}: line {line}: empty filename")
        if name in out:
            raise DataError(f"{path}: line {line}: duplicate filename {name!r}")
        try:
            out[name] = int(label)
        except ValueError:
            raise DataError(f"{path}: line {line}: label {label!r} is not an integer class id") from None
    return out


def write_zeroshot_csv(path: str | os.PathLike, predictions: Mapping[str, int]) -> Path:
    """Write {filename: label id} as a `filename,label` CSV atomically (rows sorted by filename)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["filename", "label"])
    for name in sorted(predictions):
        writer.writerow([name, int(predictions[name])])
    return atomic_write_text(path, buf.getvalue())


def load_id2label(path: str | os.PathLike) -> dict[int, str]:
    """Read id2label.json {"0": "red circle", ...} into {0: "red circle", ...}."""
    path = Path(path)
    data = read_json(path, "id2label")
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty JSON object {{\"0\": label, ...}}")
    try:
        out = {int(k): v for k, v in data.items()}
    except ValueError:
        raise DataError(f"{path}: keys must be integer class ids, got {_few(data)}") from None
    bad = [k for k, v in out.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise DataError(f"{path}: labels must be non-empty strings (ids {_few(bad)})")
    return dict(sorted(out.items()))


_OBJ_KEYS = ("id", "colour", "shape", "size", "bbox")


def load_objects(path: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """Read an objects JSON {stem: [{"id", "colour", "shape", "size", "bbox": [x0, y0, x1, y1]}]}, validated."""
    path = Path(path)
    data = read_json(path, "objects")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{stem: [objects]}}, got {type(data).__name__}")
    for stem, objs in data.items():
        if not isinstance(objs, list):
            raise DataError(f"{path}: {stem!r}: expected a list of objects")
        for j, o in enumerate(objs):
            missing = [k for k in _OBJ_KEYS if not isinstance(o, dict) or k not in o]
            if missing:
                raise DataError(f"{path}: {stem!r}[{j}] missing key(s) {missing}")
            bbox = o["bbox"]
            if (not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, int) for v in bbox)
                    or bbox[0] >= bbox[2] or bbox[1] >= bbox[3]):
                raise DataError(f"{path}: {stem!r}[{j}] bbox must be 4 ints [x0, y0, x1, y1] with x0<x1, y0<y1, got {bbox!r}")
    return data
