"""The demo world generator: determinism, atomic builds, layout, and captions/masks/objects that agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from captionlab.data import list_images, load_captions, load_id2label, load_image, load_mask, load_objects
from captionlab.data import world as W

SMALL = {"p2_train": 12, "p2_val": 6, "p1_val": 4, "p1_cls_train": 2, "p1_cls_val": 1}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "world.json"}


def test_small_world_is_byte_identical_per_seed(tmp_path: Path) -> None:
    a = W.build_world(tmp_path / "a", seed=7, sizes=SMALL, workers=1)
    b = W.build_world(tmp_path / "b", seed=7, sizes=SMALL, workers=2)
    c = W.build_world(tmp_path / "c", seed=8, sizes=SMALL, workers=1)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) > 50 and fa == fb
    assert fa.keys() == fc.keys() and fa != fc
    info = json.loads((a / "world.json").read_text())
    assert info["generator_version"] == W.GENERATOR_VERSION and info["seed"] == 7 and info["sizes"]["p2_train"] == 12
    assert not [p for p in a.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_small_world_layout(tmp_path: Path) -> None:
    root = W.build_world(tmp_path / "w", seed=1, sizes=SMALL, workers=1)
    for split, n in (("train", 12), ("val", 6)):
        cs = load_captions(root / "p2_data" / f"{split}.json")
        assert len(cs) == n and all(len(c) == 5 for c in cs.captions.values())
        assert len(list_images(root / "p2_data" / "images" / split)) == n
        assert len(list(root.joinpath("p2_data", "masks", split).glob("*.png"))) == n
        assert set(load_objects(root / "p2_data" / f"objects_{split}.json")) == set(cs.stems)
    assert len(load_captions(root / "p1_data" / "val.json")) == 4
    assert sorted(p.name for p in (root / "p3_data" / "images").iterdir()) == sorted(f"{n}.jpg" for n in W.P3_SCENES)
    assert len(list((root / "p1_data" / "train").glob("*.png"))) == 2 * 20
    assert load_id2label(root / "p1_data" / "id2label.json")[0] == "red circle"
    assert load_image(root / "p1_data" / "val" / "19_0.png").size == (64, 64)


def test_failed_build_leaves_no_half_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = W.build_world(tmp_path / "w", seed=0, sizes=SMALL, workers=1)
    assert (root / "world.json").exists()

    def boom(tmp: Path, seed: int) -> None:
        (tmp / "p3_data").mkdir()
        raise RuntimeError("killed")

    monkeypatch.setattr(W, "_build_p3", boom)
    with pytest.raises(RuntimeError):
        W.build_world(root, seed=0, sizes=SMALL, workers=1)
    assert not (root / "world.json").exists()  # marked incomplete, so ensure_world will rebuild
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_unknown_size_key_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="p2_trian"):
        W.build_world(tmp_path, sizes={"p2_trian": 3})


def test_mentioned_objects_parser() -> None:
    assert W.mentioned_objects("two red circles and a small blue star") == [("red", "circle"), ("blue", "star")]
    assert W.mentioned_objects("A photo of a Yellow Square") == [("yellow", "square")]


# ------------------------------------------------------------------------------------------------ full world

_REL = re.compile(r"^a (?:(small|large) )?(\w+) (\w+) (to the left of|to the right of|above|below) "
                  r"a (?:(small|large) )?(\w+) (\w+)(?:,|$)")
_COUNT = re.compile(r"\b(two|three) (\w+) (\w+)s\b")


def _check_split(root: Path, ann: Path, objects: Path, masks: Path) -> int:
    cs = load_captions(ann)
    objs = load_objects(objects)
    assert set(objs) == set(cs.stems)
    n_rel = 0
    for stem in cs.stems:
        mask = load_mask(masks / f"{stem}.png")
        assert mask.shape == (64, 64)
        ids = [o["id"] for o in objs[stem]]
        assert ids == list(range(1, len(ids) + 1)) and 1 <= len(ids) <= 3
        assert set(np.unique(mask).tolist()) == {0, *ids}, stem
        for o in objs[stem]:
            ys, xs = np.nonzero(mask == o["id"])
            assert len(ys) > 20, stem
            assert o["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], stem
            assert 0 <= o["bbox"][0] < o["bbox"][2] <= 64 and 0 <= o["bbox"][1] < o["bbox"][3] <= 64
        present = {(o["colour"], o["shape"]) for o in objs[stem]}
        for cap in cs.captions[stem]:
            named = W.mentioned_objects(cap)
            assert named and set(named) <= present, (stem, cap)
            for num, colour, shape in _COUNT.findall(cap):
                k = sum((o["colour"], o["shape"]) == (colour, shape) for o in objs[stem])
                assert k == {"two": 2, "three": 3}[num], (stem, cap)
            m = _REL.match(cap)
            if m:  # some object pair must satisfy the stated relation
                sa, ca, sha, rel, sb, cb, shb = m.groups()
                fits = lambda o, s, c, sh: (o["colour"], o["shape"]) == (c, sh) and s in (None, o["size"])
                centre = lambda o: ((o["bbox"][0] + o["bbox"][2]) / 2, (o["bbox"][1] + o["bbox"][3]) / 2)
                ok = False
                for a in objs[stem]:
                    for b in objs[stem]:
                        if a is b or not fits(a, sa, ca, sha) or not fits(b, sb, cb, shb):
                            continue
                        (ax, ay), (bx, by) = centre(a), centre(b)
                        ok |= {"to the left of": ax < bx, "to the right of": ax > bx,
                               "above": ay < by, "below": ay > by}[rel]
                assert ok, (stem, cap)
                n_rel += 1
    return n_rel


def test_full_world_captions_masks_objects_agree(demo_world: Path) -> None:
    r = demo_world
    n_rel = _check_split(r, r / "p2_data/train.json", r / "p2_data/objects_train.json", r / "p2_data/masks/train")
    n_rel += _check_split(r, r / "p2_data/val.json", r / "p2_data/objects_val.json", r / "p2_data/masks/val")
    n_rel += _check_split(r, r / "p1_data/val.json", r / "p1_data/objects_val.json", r / "p1_data/masks/val")
    assert n_rel > 1000  # relation captions are common and all verified
    p3 = load_objects(r / "p3_data/objects.json")
    assert set(p3) == set(W.P3_SCENES)
    for name, objs in p3.items():
        assert [(o["colour"], o["shape"]) for o in objs] == [(c, s) for c, s, _, _ in W.P3_SCENES[name]]
        assert set(np.unique(load_mask(r / "p3_data/masks" / f"{name}.png")).tolist()) == {0, *range(1, len(objs) + 1)}


def test_full_world_sizes_vocab_and_build_time(demo_world: Path) -> None:
    info = json.loads((demo_world / "world.json").read_text())
    assert info["generator_version"] == W.GENERATOR_VERSION and info["sizes"] == W.DEFAULT_SIZES
    assert info["vocab"]["colours"] == list(W.COLOURS) and info["vocab"]["shapes"] == list(W.SHAPES)
    # measured once when the fixture built the world: CPU time is the load-independent budget (wall time on a
    # shared 2-core box can be several times larger than on an idle one, so it only gets a loose bound)
    assert info["build_cpu_seconds"] < 60 and info["build_seconds"] < 180
    assert len(load_captions(demo_world / "p2_data/train.json")) == 4000
    assert len(load_captions(demo_world / "p2_data/val.json")) == 500
    assert len(load_captions(demo_world / "p1_data/val.json")) == 200
    id2label = load_id2label(demo_world / "p1_data/id2label.json")
    assert len(id2label) == 20 and len(set(id2label.values())) == 20
    for split, per_class in (("train", 50), ("val", 15)):
        names = [p.stem for p in (demo_world / "p1_data" / split).glob("*.png")]
        counts = np.bincount([int(n.split("_")[0]) for n in names], minlength=20)
        assert counts.tolist() == [per_class] * 20
    caps = [c for cs in load_captions(demo_world / "p2_data/train.json").captions.values() for c in cs]
    assert len(set(caps)) > 3000  # varied templates, not five copies of one sentence
    for phrase in ("a photo of a", "to the left of", "above", "two ", "three shapes", "small", "large"):
        assert any(phrase in c for c in caps), phrase


def test_cli_world_info(demo_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from captionlab.cli import main

    assert main(["world", "info", "--root", str(demo_world)]) == 0
    out = capsys.readouterr().out
    assert f"generator_version: {W.GENERATOR_VERSION}" in out and "p2_train=4000" in out and "model clip:" in out
    assert main(["world", "info", "--root", str(tmp_path)]) == 2
    assert "world.json" in capsys.readouterr().err
