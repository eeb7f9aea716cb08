"""Zero-shot classification on constructed inputs: file names, CSV format, accuracy, templates and ensembles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from captionlab.errors import DataError
from captionlab.models import zeroshot as zs

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class FakeClip:
    """Images embed as their mean RGB; a text embeds as its colour word's axis, negated when it says 'not'."""

    logit_scale = 100.0

    def __init__(self) -> None:
        self.texts_seen: list[str] = []

    def encode_images(self, images, batch_size: int = 64) -> torch.Tensor:
        v = torch.tensor(np.stack([np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0) for im in images]))
        return F.normalize(v + 1.0, dim=-1)

    def encode_texts(self, texts) -> torch.Tensor:
        self.texts_seen += list(texts)
        rows = []
        for t in texts:
            v = torch.full((3,), 0.1)
            for axis, colour in enumerate(COLOURS):
                if colour in t:
                    v[axis] = 1.0
            rows.append(-v if " not " in t else v)
        return F.normalize(torch.stack(rows), dim=-1)


@pytest.fixture()
def tiny_split(tmp_path: Path) -> tuple[Path, Path]:
    """Six solid-colour images named `<label>_<n>.png` and their id2label.json."""
    images = tmp_path / "val"
    images.mkdir()
    for label, rgb in enumerate(COLOURS.values()):
        for n in range(2):
            Image.new("RGB", (8, 8), rgb).save(images / f"{label}_{n}.png")
    id2label = tmp_path / "id2label.json"
    id2label.write_text(json.dumps({str(i): c for i, c in enumerate(COLOURS)}))
    return images, id2label


def test_label_from_filename() -> None:
    assert zs.label_from_filename("12_345.png") == 12
    assert zs.label_from_filename("/a/b/0_0.jpg") == 0
    with pytest.raises(DataError, match="cat.png"):
        zs.label_from_filename("cat.png")


def test_csv_format_and_accuracy(tmp_path: Path, tiny_split: tuple[Path, Path]) -> None:
    images, _ = tiny_split
    names = sorted(p.name for p in images.iterdir())
    labels = [0, 0, 1, 2, 2, 2]  # 1_1.png predicted as 2: 5/6 correct
    out = zs.write_predictions_csv(tmp_path / "pred.csv", names, labels)
    text = out.read_text().replace("\r\n", "\n")
    assert text.splitlines()[0] == "filename,label"
    assert text.splitlines()[1:] == [f"{n},{y}" for n, y in zip(names, labels)]
    assert zs.read_predictions_csv(out) == dict(zip(names, labels))
    assert zs.accuracy(out, images) == pytest.approx(5 / 6)
    assert zs.accuracy(out) == pytest.approx(5 / 6)

    # The CSV must cover exactly the folder's images when the folder is given.
    zs.write_predictions_csv(tmp_path / "short.csv", names[:-1], labels[:-1])
    with pytest.raises(DataError, match="1 missing"):
        zs.accuracy(tmp_path / "short.csv", images)
    (tmp_path / "bad.csv").write_text("filename,label\n0_0.png,zero\n")
    with pytest.raises(DataError, match="bad.csv: line 2"):
        zs.read_predictions_csv(tmp_path / "bad.csv")
    (tmp_path / "hdr.csv").write_text("file,pred\n0_0.png,0\n")
    with pytest.raises(DataError, match="header"):
        zs.read_predictions_csv(tmp_path / "hdr.csv")


def test_prompt_names_and_sparse_label_ids(tmp_path: Path, tiny_split: tuple[Path, Path]) -> None:
    assert zs.prompt_name("aquarium_fish") == "aquarium fish"
    images, _ = tiny_split
    for p in images.iterdir():  # relabel 0/1/2 as 3/7/9: predictions must be ids, not class indices
        p.rename(p.with_name(f"{[3, 7, 9][zs.label_from_filename(p.name)]}_{p.name.split('_', 1)[1]}"))
    id2label = tmp_path / "sparse.json"
    id2label.write_text(json.dumps({"9": "blue", "3": "red", "7": "green"}))
    result = zs.run_zero_shot(FakeClip(), images, id2label, ["a {object}."])
    assert list(result.predictions["a {object}."]) == [3, 3, 7, 7, 9, 9]
    assert result.table["accuracy"].item() == 1.0
    with pytest.raises(DataError, match="not found"):
        zs.load_id2label(tmp_path / "missing.json")


def test_ensemble_is_normalised_mean_of_prompt_embeddings() -> None:
    clip = FakeClip()
    names = list(COLOURS)
    ens = zs.class_text_embeddings(clip, names, ("a {object}.", "This is not a photo of {object}", "{object} thing"))
    parts = [zs.class_text_embeddings(clip, names, t)
             for t in ("a {object}.", "This is not a photo of {object}", "{object} thing")]
    expected = F.normalize(torch.stack(parts).mean(0), dim=-1)
    assert torch.allclose(ens, expected, atol=1e-6)
    assert torch.allclose(ens.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="object"):
        zs.class_text_embeddings(clip, names, "a photo of a thing")


def test_classify_and_prompt_table(tiny_split: tuple[Path, Path]) -> None:
    images, id2label = tiny_split
    clip = FakeClip()
    pil = [Image.new("RGB", (8, 8), rgb) for rgb in COLOURS.values()]
    pred, probs = zs.classify(clip, pil, list(COLOURS), "This is a photo of {object}")
    assert pred.tolist() == [0, 1, 2]
    assert probs.shape == (3, 3) and torch.allclose(probs.sum(-1), torch.ones(3))
    assert "This is a photo of green" in clip.texts_seen

    result = zs.run_zero_shot(clip, images, id2label, zs.TEMPLATES)
    table = result.table
    assert len(table) == len(zs.TEMPLATES)
    assert list(table["accuracy"]) == sorted(table["accuracy"], reverse=True)
    acc = dict(zip(table["template"], table["accuracy"]))
    assert acc["This is a photo of {object}"] == 1.0
    assert acc[zs.template_name(zs.ENSEMBLE)] == 1.0
    assert acc["This is not a photo of {object}"] == 0.0  # negated prompts pick a wrong colour every time
    preds = result.predictions
    assert list(preds["filename"]) == sorted(p.name for p in images.iterdir())
    assert list(preds["label"]) == [0, 0, 1, 1, 2, 2]
    assert list(preds["This is a photo of {object}"]) == [0, 0, 1, 1, 2, 2]


def test_top5_barplot(tiny_split: tuple[Path, Path]) -> None:
    clip = FakeClip()
    fig = zs.top5_barplot(clip, Image.new("RGB", (8, 8), (0, 0, 255)), list(COLOURS), "a photo of a {object}.")
    ax_bar = fig.axes[1]
    assert len(ax_bar.patches) == 3  # top-k capped at the number of classes
    widths = [p.get_width() for p in ax_bar.patches]
    assert widths == sorted(widths, reverse=True) and widths[0] > 0.9
    ticks = dict(zip(ax_bar.get_yticks(), (t.get_text() for t in ax_bar.get_yticklabels())))
    assert ticks[max(ticks)] == "a photo of a blue."  # the top bar is the best class
