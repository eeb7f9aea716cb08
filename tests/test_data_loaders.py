"""Image and annotation loaders: every awkward image kind and every malformed file gives a clear, named result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from captionlab.data import (
    check_prediction_keys,
    list_images,
    load_captions,
    load_id2label,
    load_image,
    load_mask,
    load_objects,
    load_predictions,
    read_zeroshot_csv,
    save_predictions,
    write_zeroshot_csv,
)
from captionlab.errors import DataError, ImageLoadError
from PIL import Image

# ------------------------------------------------------------------------------------------------ images


def _px(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    assert img.mode == "RGB"
    return img.getpixel(xy)


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    p = tmp_path / "g.png"
    Image.fromarray(np.full((8, 8), 77, np.uint8), "L").save(p)
    img = load_image(p)
    assert img.size == (8, 8) and _px(img, (3, 3)) == (77, 77, 77)


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.save(tmp_path / "p.png")
    img = load_image(tmp_path / "p.png")
    assert _px(img, (0, 0)) == (255, 0, 0) and _px(img, (1, 1)) == (0, 0, 255)
    pal.info["transparency"] = 0  # index 0 (red) is transparent -> composited on white
    pal.save(tmp_path / "pt.png", transparency=0)
    assert "transparency" in Image.open(tmp_path / "pt.png").info
    img = load_image(tmp_path / "pt.png")
    assert _px(img, (0, 0)) == (255, 255, 255) and _px(img, (1, 1)) == (0, 0, 255)


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (255, 0, 0, 0)  # fully transparent red -> white
    arr[0, 1] = (0, 0, 255, 255)  # opaque blue
    arr[1, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert _px(img, (0, 0)) == (255, 255, 255)
    assert _px(img, (1, 0)) == (0, 0, 255)
    assert all(abs(c - 127) <= 1 for c in _px(img, (0, 1)))


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    r, g, b = _px(load_image(tmp_path / "c.jpg"), (4, 4))
    assert r > 200 and g < 40 and b < 40


def test_16bit_png_scaled(tmp_path: Path) -> None:
    arr = np.array([[0, 32768, 65535, 257]], np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    img = load_image(tmp_path / "d.png")
    assert [_px(img, (x, 0))[0] for x in range(4)] == [0, 128, 255, 1]


def test_exif_rotation_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert Image.open(tmp_path / "r.jpg").size == (20, 10)
    assert load_image(tmp_path / "r.jpg").size == (10, 20)


def test_upper_case_extension_listed_and_loaded(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "B.JPG", format="JPEG")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.Png", format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.jpg").write_bytes(b"")
    paths = list_images(tmp_path)
    assert [p.name for p in paths] == ["B.JPG", "a.Png"]
    assert load_image(paths[0]).mode == "RGB"


@pytest.mark.parametrize("kind", ["truncated", "not_an_image", "empty", "missing"])
def test_broken_files_raise_naming_the_file(tmp_path: Path, kind: str) -> None:
    p = tmp_path / f"{kind}.jpg"
    if kind == "truncated":
        good = tmp_path / "good.jpg"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
        p.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "not_an_image":
        p.write_text("{'this': 'is json'}")
    elif kind == "empty":
        p.write_bytes(b"")
    with pytest.raises(ImageLoadError) as err:
        load_image(p)
    assert str(p) in str(err.value)


def test_list_images_raise_or_skip(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageLoadError, match="bad.png"):
        list_images(tmp_path)
    with pytest.warns(UserWarning, match="bad.png"):
        assert [p.name for p in list_images(tmp_path, on_error="skip")] == ["ok.png"]
    assert len(list_images(tmp_path, check=False)) == 2
    with pytest.raises(DataError, match="nope"):
        list_images(tmp_path / "nope")


def test_load_mask(tmp_path: Path) -> None:
    arr = np.zeros((5, 6), np.uint8)
    arr[1:3, 2:4] = 2
    Image.fromarray(arr, "L").save(tmp_path / "m.png")
    got = load_mask(tmp_path / "m.png")
    assert got.dtype == np.uint8 and got.shape == (5, 6) and np.array_equal(got, arr)
    Image.new("RGB", (3, 3)).save(tmp_path / "rgb.png")
    with pytest.raises(ImageLoadError, match="rgb.png.*single-channel"):
        load_mask(tmp_path / "rgb.png")


# ------------------------------------------------------------------------------------------------ captions


def _ann(images: list, annotations: list) -> dict:
    return {"images": images, "annotations": annotations}


GOOD = _ann([{"file_name": "a.jpg", "id": 1}, {"file_name": "b.jpg", "id": 2}],
            [{"image_id": 1, "caption": "a red circle", "id": 0}, {"image_id": 2, "caption": "a blue star", "id": 1},
             {"image_id": 1, "caption": "a photo of a red circle", "id": 2}])


def test_load_captions_good(tmp_path: Path) -> None:
    p = tmp_path / "val.json"
    p.write_text(json.dumps(GOOD))
    cs = load_captions(p)
    assert cs.stems == ["a", "b"] and len(cs) == 2
    assert cs.captions == {"a": ["a red circle", "a photo of a red circle"], "b": ["a blue star"]}
    assert cs.file_names["b"] == "b.jpg" and cs.image_ids == {"a": 1, "b": 2}
    assert cs.image_path("/x", "a") == Path("/x/a.jpg")


BAD_CASES = {
    "invalid_json": ('{"images": [', "invalid JSON at line 1"),
    "not_object": (json.dumps([1, 2]), "expected a JSON object"),
    "missing_key": (json.dumps({"images": []}), "missing top-level key(s) ['annotations']"),
    "bad_image_entry": (json.dumps(_ann([{"file_name": "a.jpg"}], [])), "images[0] must be an object"),
    "unknown_id": (json.dumps(_ann([{"file_name": "a.jpg", "id": 1}],
                                   [{"image_id": 1, "caption": "x"}, {"image_id": 9, "caption": "y"}])),
                   "refer to unknown image ids: 9"),
    "non_string": (json.dumps(_ann([{"file_name": "a.jpg", "id": 1}], [{"image_id": 1, "caption": 3}])),
                   "caption is int, expected a string"),
    "empty_caption": (json.dumps(_ann([{"file_name": "a.jpg", "id": 1}], [{"image_id": 1, "caption": "  "}])),
                      "annotations[0] caption is empty"),
    "duplicate_file": (json.dumps(_ann([{"file_name": "a.jpg", "id": 1}, {"file_name": "a.jpg", "id": 2}],
                                       [{"image_id": 1, "caption": "x"}])), "duplicate file name 'a.jpg'"),
    "duplicate_id": (json.dumps(_ann([{"file_name": "a.jpg", "id": 1}, {"file_name": "b.jpg", "id": 1}], [])),
                     "duplicate image id 1"),
    "no_caption": (json.dumps(_ann([{"file_name": "a.jpg", "id": 1}, {"file_name": "b.jpg", "id": 2}],
                                   [{"image_id": 1, "caption": "x"}])), "1 image(s) have no caption: 'b.jpg'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_load_captions_malformed(tmp_path: Path, case: str) -> None:
    text, message = BAD_CASES[case]
    p = tmp_path / f"{case}.json"
    p.write_text(text)
    with pytest.raises(DataError) as err:
        load_captions(p)
    assert str(p) in str(err.value) and message in str(err.value)


def test_load_captions_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="annotation file not found"):
        load_captions(tmp_path / "none.json")


def test_predictions_round_trip_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "out" / "pred.json"
    save_predictions(p, {"b": "a blue star", "a": "a red circle"})
    assert load_predictions(p) == {"a": "a red circle", "b": "a blue star"}
    assert list(json.loads(p.read_text())) == ["a", "b"]
    assert load_predictions(p, expected=["a", "b"]) == {"a": "a red circle", "b": "a blue star"}
    with pytest.raises(DataError, match=r"1 missing \('c'\)"):
        load_predictions(p, expected=["a", "b", "c"])
    with pytest.raises(DataError, match="file stems without extension"):
        check_prediction_keys({"a.jpg": "x"}, ["a"])
    with pytest.raises(DataError, match="bad entries: 'x'"):
        save_predictions(tmp_path / "bad.json", {"x": 1})
    assert not (tmp_path / "bad.json").exists()
    (tmp_path / "nonstr.json").write_text('{"a": ["list"]}')
    with pytest.raises(DataError, match="nonstr.json.*not strings for 'a'"):
        load_predictions(tmp_path / "nonstr.json")


def test_zeroshot_csv_round_trip_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "pred.csv"
    write_zeroshot_csv(p, {"3_1.png": 3, "0_0.png": 0})
    assert p.read_text() == "filename,label\n0_0.png,0\n3_1.png,3\n"
    assert read_zeroshot_csv(p) == {"0_0.png": 0, "3_1.png": 3}
    for text, msg in [("file,lab\n", "expected header"), ("filename,label\na.png,cat\n", "line 2: label 'cat'"),
                      ("filename,label\na.png,1,2\n", "line 2: expected 2 columns"),
                      ("filename,label\na.png,1\na.png,2\n", "line 3: duplicate filename")]:
        p.write_text(text)
        with pytest.raises(DataError, match=msg):
            read_zeroshot_csv(p)


def test_objects_and_id2label(tmp_path: Path) -> None:
    p = tmp_path / "objects.json"
    p.write_text(json.dumps({"a": [{"id": 1, "colour": "red", "shape": "circle", "size": "small", "bbox": [1, 2, 5, 6]}]}))
    assert load_objects(p)["a"][0]["bbox"] == [1, 2, 5, 6]
    p.write_text(json.dumps({"a": [{"id": 1, "colour": "red", "shape": "circle", "size": "small", "bbox": [5, 2, 1, 6]}]}))
    with pytest.raises(DataError, match="objects.json: 'a'\\[0\\] bbox"):
        load_objects(p)
    q = tmp_path / "id2label.json"
    q.write_text(json.dumps({"1": "blue star", "0": "red circle"}))
    assert load_id2label(q) == {0: "red circle", 1: "blue star"}
    q.write_text(json.dumps({"zero": "red circle"}))
    with pytest.raises(DataError, match="id2label.json: keys must be integer"):
        load_id2label(q)
