"""Grids, figures, widgets and faithfulness scoring on small constructed inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from captionlab.attention.capture import AttentionResult
from captionlab.attention.faithfulness import score_map, score_result, summarize, word_objects, word_table
from captionlab.attention.figures import attention_series, save_series, top_last_pairs
from captionlab.attention.grids import (center_crop_square, image_token_span, infer_grid, key_of_patch,
                                        mask_to_grid, normalize, patch_of_key, reduce_heads, span_to_grid, upsample)
from captionlab.attention.widgets import ResultCache, attention_browser, save_frames
from captionlab.errors import ConfigError, DataError


def test_image_token_span_and_grid():
    ids = [1, 5, 9, 9, 9, 9, 7, 2]
    assert image_token_span(ids, 9) == (2, 6)
    assert image_token_span(torch.tensor(ids), 9) == (2, 6)
    with pytest.raises(ConfigError, match="no image token"):
        image_token_span(ids, 4)
    with pytest.raises(ConfigError, match="not contiguous"):
        image_token_span([9, 1, 9], 9)
    assert infer_grid(576) == (24, 24) and infer_grid(64, (8, 8)) == (8, 8) and infer_grid(6, (2, 3)) == (2, 3)
    with pytest.raises(ConfigError):
        infer_grid(6)


def test_span_to_grid_matches_manual_index():
    gh, gw = 3, 4
    span = (5, 5 + gh * gw)
    att = torch.arange(2 * 20, dtype=torch.float32).reshape(2, 20)  # (rows, keys)
    g = span_to_grid(att, span, (gh, gw))
    assert g.shape == (2, gh, gw)
    for r in range(gh):
        for c in range(gw):
            k = key_of_patch(r, c, span, (gh, gw))
            assert patch_of_key(k, span, (gh, gw)) == (r, c)
            assert torch.equal(g[:, r, c], att[:, k])
    with pytest.raises(ConfigError):
        span_to_grid(att, (0, 5), (gh, gw))
    with pytest.raises(IndexError):
        patch_of_key(4, span, (gh, gw))


def test_reduce_heads_normalize_upsample():
    att = torch.rand(2, 3, 4, 5)
    assert torch.allclose(reduce_heads(att, "mean"), att.mean(1))
    assert torch.allclose(reduce_heads(att, "max"), att.amax(1))
    assert torch.equal(reduce_heads(att, 2), att[:, 2])
    with pytest.raises(ConfigError):
        reduce_heads(att, 3)
    with pytest.raises(ConfigError):
        reduce_heads(att, "median")
    m = np.array([[1.0, 3.0], [0.0, 4.0]])
    assert normalize(m, "sum").sum() == pytest.approx(1.0)
    assert normalize(m, "max").max() == 1.0 and normalize(m, "minmax").min() == 0.0
    assert np.all(normalize(np.zeros((2, 2)), "minmax") == 0)
    up = upsample(m, (4, 4))
    assert up.shape == (4, 4)
    # align_corners=False: each patch's value sits at its patch centre; corners stay the corner patch values
    assert up[0, 0] == pytest.approx(1.0) and up[3, 3] == pytest.approx(4.0) and up[0, 3] == pytest.approx(3.0)
    assert upsample(np.ones((5, 2, 2)), (8, 8)).shape == (5, 8, 8)


def test_mask_to_grid_and_crop():
    mask = np.zeros((8, 8), bool)
    mask[:4, :2] = True  # half of patch (0, 0) of a 2x2 grid
    cover = mask_to_grid(mask, (2, 2))
    assert cover[0, 0] == pytest.approx(0.5) and cover.sum() == pytest.approx(0.5)
    img = Image.new("RGB", (10, 6))
    assert center_crop_square(img).size == (6, 6)
    assert center_crop_square(np.zeros((6, 10))).shape == (6, 6)


def _result(maps: np.ndarray, tokens: list[str], name: str = "bike") -> AttentionResult:
    n, gh, gw = maps.shape
    hm = np.stack([maps, maps * 0.5], axis=1)  # two heads
    return AttentionResult(tokens=tokens, maps=maps.astype(np.float32), grid=(gh, gw),
                           image=Image.new("RGB", (gw * 8, gh * 8), (200, 100, 50)), caption=" ".join(tokens),
                           layer=1, heads="mean", name=name, token_ids=list(range(n)),
                           token_strs=[(" " if i else "") + t for i, t in enumerate(tokens)],
                           head_maps=hm.astype(np.float32), word_groups=[[i] for i in range(n)])


def test_series_figure_and_files(tmp_path):
    res = _result(np.random.default_rng(0).random((3, 4, 4)), ["a", "red", "circle"])
    fig = attention_series(res, cols=2)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:4] == ["<image>", "a", "red", "circle"]
    assert len(fig.axes) == 4  # 2 x 2 panels
    heat = fig.axes[1].images[-1].get_array()
    assert heat.shape == (32, 32)  # upsampled to the image size
    path = save_series(res, tmp_path / "out", name="bike.jpg")
    assert path == tmp_path / "out" / "bike.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["bike.png"]  # atomic: no temp files left
    frames = save_frames(res, tmp_path / "frames")
    assert [p.name for p in frames] == ["00_a.png", "01_red.png", "02_circle.png", "bike.png"]
    assert all(p.stat().st_size > 0 for p in frames)


def test_series_of_a_caption_with_dollar_signs_renders_literally(tmp_path):
    """Random-weight models (the rehearsal) emit words like '$$o': matplotlib must not parse them as mathtext."""
    from captionlab.report.figures import image_grid

    import warnings

    res = _result(np.random.default_rng(0).random((2, 4, 4)), ["$$o", "A'$\u4801"])
    fig = attention_series(res, cols=3)
    assert [ax.get_title() for ax in fig.axes][1:3] == ["$$o", "A'$\u4801"] and "4x4 patches" in fig.get_suptitle()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CJK glyph DejaVu lacks is drawn as a box, without a warning in the report
        save_series(res, tmp_path, name="ski.jpg")  # draws every title
    image_grid([Image.new("RGB", (8, 8))], ["costs $5 or $$"]).savefig(tmp_path / "grid.png")


def test_with_heads_and_browser():
    res = _result(np.random.default_rng(1).random((2, 3, 3)), ["blue", "star"])
    np.testing.assert_allclose(res.with_heads(1).maps, res.head_maps[:, 1], atol=1e-7)
    calls = []
    cache = ResultCache(lambda layer: calls.append(layer) or res)
    cache.get(1, "max")
    cache.get(1, 0)
    assert calls == [1]  # head switches reuse the captured layer
    box = attention_browser(cache, layers=[0, 1])
    _, layer_dd, head_dd = box.children[0].children
    slider = box.children[1]
    assert slider.max == 1 and list(head_dd.options) == ["mean", "max", 0, 1]
    slider.value = 1
    assert "[star]" in box.children[2].value
    layer_dd.value = 0
    assert calls == [1, 0]


def test_top_last_pairs():
    df = pd.DataFrame({"stem": ["a", "b", "c", "d"], "CLIPScore": [0.5, 0.9, np.nan, 0.1]})
    out = top_last_pairs(df, k=1)
    assert out[["which", "stem"]].values.tolist() == [["top", "b"], ["last", "d"]]
    indexed = pd.DataFrame({"CLIPScore": [0.2, 0.3]}, index=pd.Index(["x", "y"], name="image"))
    assert top_last_pairs(indexed)["image"].tolist() == ["y", "x"]
    with pytest.raises(DataError):
        top_last_pairs(df, score="CIDEr")


OBJECTS = [{"id": 1, "colour": "red", "shape": "circle", "size": "large", "bbox": [0, 0, 4, 4]},
           {"id": 2, "colour": "blue", "shape": "circle", "size": "small", "bbox": [4, 4, 8, 8]}]


def test_word_objects():
    assert word_objects("red", OBJECTS) == ("colour", [1])
    assert word_objects("Blue,", OBJECTS) == ("colour", [2])
    assert word_objects("circles", OBJECTS) == ("shape", [1, 2])  # ambiguous
    assert word_objects("square", OBJECTS) == ("shape", [])  # absent (hallucinated)
    assert word_objects("green", OBJECTS) == ("colour", [])
    assert word_objects("the", OBJECTS) == (None, [])


def test_score_map_against_hand_computation():
    mask = np.zeros((8, 8), bool)
    mask[0:4, 0:4] = True  # exactly patch (0, 0) of a 2x2 grid
    on = np.array([[0.7, 0.1], [0.1, 0.1]])
    s = score_map(on, mask)
    assert s["pointing_patch"] == 1.0 and s["pointing_pixel"] == 1.0 and s["random_point"] == 0.25
    assert 0.5 < s["mass_share"] < 0.7  # bilinear spreads some of the 0.7 outside the patch
    off = score_map(np.array([[0.1, 0.1], [0.1, 0.7]]), mask)
    assert off["pointing_patch"] == 0.0 and off["pointing_pixel"] == 0.0 and off["mass_share"] < 0.25
    uniform = score_map(np.ones((2, 2)), mask)
    assert uniform["mass_share"] == pytest.approx(0.25)  # uniform attention = the random baseline


def test_score_result_and_summary():
    label = np.zeros((8, 8), np.uint8)
    label[0:4, 0:4] = 1
    label[4:8, 4:8] = 2
    maps = np.zeros((5, 2, 2), np.float32)
    maps[1, 0, 0] = 1.0  # "red" -> object 1 at top-left: hit
    maps[2, 0, 0] = 1.0  # "circle": ambiguous, skipped
    maps[4, 0, 0] = 1.0  # "blue" -> object 2 at bottom-right: miss
    res = _result(maps, ["a", "red", "circle", "and", "blue"], name="x")
    rows = score_result(res, OBJECTS, label)
    assert [(r["word"], r["status"]) for r in rows] == [("red", "scored"), ("circle", "ambiguous"),
                                                        ("blue", "scored")]
    table = word_table({3: [res]}, [OBJECTS], [label])
    summary = summarize(table)
    row = summary.iloc[0]
    assert row["layer"] == 3 and row["n_scored"] == 2 and row["ambiguous"] == 1
    assert row["pointing_patch"] == 0.5 and row["random_point"] == 0.25 and row["pointing_gain"] == 0.25
    with pytest.raises(DataError):
        word_table([res], [OBJECTS, OBJECTS], [label])
