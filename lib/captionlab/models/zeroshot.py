"""CLIP zero-shot image classification: prompt templates, template ensembles, accuracy tables and plots.

Works with any `captionlab.models.clip.ClipBackend` (open_clip or an HF CLIP dir): images and prompts are
encoded once, L2-normalised, and each image gets the class whose prompt embedding is most similar. A template
is a string with an `{object}` slot, or a tuple of such strings: an ensemble, whose class embedding is the
renormalised mean of the normalised embeddings of its prompts (Radford et al. 2021, sec. 3.1.4).

Classification data follow the course: `<dir>/<label_id>_<n>.png` + `id2label.json` ({"0": "name", ...});
predictions are a CSV `filename,label` with the predicted label id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from captionlab.errors import DataError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure
    from PIL import Image

Template = Union[str, tuple[str, ...]]

ENSEMBLE: tuple[str, ...] = (
    "a photo of a {object}.",
    "This is a photo of {object}",
    "a picture of a {object}.",
    "a rendering of a {object}.",
    "a close-up photo of a {object}.",
    "a {object}.",
)
TEMPLATES: list[Template] = [
    "This is a photo of {object}",
    "This is not a photo of {object}",
    "No {object}, no score.",
    "a photo of a {object}.",
    ENSEMBLE,
]
_LABEL_RE = re.compile(r"^(\d+)_[^/]*$")


# ----------------------------------------------------------------------------------------------------------
# Files


def label_from_filename(name: str) -> int:
    """The label id in a course file name `<label_id>_<n>.png`; raise DataError otherwise."""
    m = _LABEL_RE.match(Path(name).name)
    if not m:
        raise DataError(f"{name}: file name does not follow '<label_id>_<n>.png'; cannot read its label")
    return int(m.group(1))


def list_image_files(images_dir: str | os.PathLike) -> list[Path]:
    """Image files in `images_dir`, sorted (not decoded)."""
    from captionlab.data.images import list_images

    return list_images(images_dir, check=False)


def open_image(path: str | os.PathLike) -> "Image.Image":
    """An image as RGB PIL (ImageLoadError names the file when it cannot be read)."""
    from captionlab.data.images import load_image

    return load_image(path)


def load_id2label(path: str | os.PathLike) -> dict[int, str]:
    """Read `id2label.json` ({"0": "apple", ...}) into {0: "apple", ...} (DataError names the file)."""
    from captionlab.data import load_id2label as _load

    return _load(path)


def write_predictions_csv(path: str | os.PathLike, filenames: Sequence[str], labels: Sequence[int]) -> Path:
    """Write the course's prediction CSV (`filename,label`, rows sorted by filename) atomically."""
    from captionlab.data import write_zeroshot_csv

    if len(filenames) != len(labels):
        raise ValueError(f"{len(filenames)} file names but {len(labels)} labels")
    return write_zeroshot_csv(path, {Path(f).name: int(y) for f, y in zip(filenames, labels)})


def read_predictions_csv(path: str | os.PathLike) -> dict[str, int]:
    """Read a `filename,label` CSV into {filename: label id} (DataError names the file and line)."""
    from captionlab.data import read_zeroshot_csv

    return read_zeroshot_csv(path)


def accuracy(pred_csv: str | os.PathLike, images_dir: str | os.PathLike | None = None) -> float:
    """Accuracy of a `filename,label` CSV, true labels parsed from `<label>_<id>.png`; with `images_dir`,
    the CSV must cover exactly the images in it."""
    preds = read_predictions_csv(pred_csv)
    if images_dir is not None:
        expected = {p.name for p in list_image_files(images_dir)}
        missing, extra = sorted(expected - set(preds)), sorted(set(preds) - expected)
        if missing or extra:
            raise DataError(f"{pred_csv}: does not match the images in {images_dir} "
                            f"({len(missing)} missing e.g. {missing[:3]}, {len(extra)} extra e.g. {extra[:3]})")
    if not preds:
        raise DataError(f"{pred_csv}: no predictions")
    return sum(label_from_filename(f) == y for f, y in preds.items()) / len(preds)


# ----------------------------------------------------------------------------------------------------------
# Classification


def template_name(template: Template) -> str:
    """A readable name for a template or an ensemble."""
    return template if isinstance(template, str) else f"ensemble of {len(template)} templates"


def prompt_name(label: str) -> str:
    """How a label is put into a prompt (`aquarium_fish` -> `aquarium fish`)."""
    return label.replace("_", " ")


@torch.no_grad()
def class_text_embeddings(clip, class_names: Sequence[str], template: Template) -> Tensor:
    """(C, D) normalised class embeddings; an ensemble averages the normalised embeddings of its prompts."""
    prompts = [template] if isinstance(template, str) else list(template)
    if not prompts or any("{object}" not in p for p in prompts):
        raise ValueError(f"every template needs an {{object}} slot: {prompts}")
    names = [prompt_name(c) for c in class_names]
    feats = torch.stack([F.normalize(clip.encode_texts([p.format(object=n) for n in names]).float(), dim=-1)
                         for p in prompts])  # (T, C, D)
    return F.normalize(feats.mean(0), dim=-1)


def _logit_scale(clip) -> float:
    scale = getattr(clip, "logit_scale", 100.0)
    return float(scale() if callable(scale) else scale)


def classify_features(image_feats: Tensor, text_feats: Tensor, logit_scale: float = 100.0) -> tuple[Tensor, Tensor]:
    """(pred_idx (N,), probs (N, C)) from normalised image (N, D) and class (C, D) embeddings."""
    logits = logit_scale * F.normalize(image_feats.float(), dim=-1) @ text_feats.float().T
    probs = logits.softmax(dim=-1)
    return probs.argmax(dim=-1), probs


@torch.no_grad()
def classify(clip, images: Sequence["Image.Image"], class_names: Sequence[str], template: Template = ENSEMBLE,
             batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """Zero-shot classify PIL images: (pred_idx (N,), probs (N, C)) over `class_names`."""
    image_feats = clip.encode_images(list(images), batch_size=batch_size)
    return classify_features(image_feats, class_text_embeddings(clip, class_names, template), _logit_scale(clip))


class ZeroShotResult(NamedTuple):
    """`table`: accuracy per template, best first; `predictions`: one row per image, a column per template."""

    table: "pd.DataFrame"
    predictions: "pd.DataFrame"

    def best_template(self) -> str:
        """Name of the most accurate template."""
        return str(self.table.iloc[0]["template"])


@torch.no_grad()
def run_zero_shot(clip, images_dir: str | os.PathLike, id2label_path: str | os.PathLike,
                  templates: Sequence[Template] | None = None, batch_size: int = 64) -> ZeroShotResult:
    """Classify every image in `images_dir` with each template; accuracy needs `<label>_<id>.png` names."""
    import pandas as pd

    id2label = load_id2label(id2label_path)
    class_ids = torch.tensor(sorted(id2label))
    class_names = [id2label[int(i)] for i in class_ids]
    paths = list_image_files(images_dir)
    if not paths:
        raise DataError(f"{images_dir}: no images")
    images = [open_image(p) for p in paths]
    image_feats = F.normalize(clip.encode_images(images, batch_size=batch_size).float(), dim=-1)
    try:
        truth: Tensor | None = torch.tensor([label_from_filename(p.name) for p in paths])
    except DataError:
        truth = None
    preds = pd.DataFrame({"filename": [p.name for p in paths]})
    if truth is not None:
        preds["label"] = truth.numpy()
    rows = []
    scale = _logit_scale(clip)
    for template in templates if templates is not None else TEMPLATES:
        name = template_name(template)
        idx, probs = classify_features(image_feats, class_text_embeddings(clip, class_names, template), scale)
        pred = class_ids[idx]
        preds[name] = pred.numpy()
        correct = int((pred == truth).sum()) if truth is not None else None
        rows.append({"template": name, "accuracy": correct / len(paths) if truth is not None else float("nan"),
                     "correct": correct, "n": len(paths), "mean_top_prob": float(probs.max(-1).values.mean())})
    table = pd.DataFrame(rows).sort_values("accuracy", ascending=False, kind="stable").reset_index(drop=True)
    return ZeroShotResult(table, preds)


@torch.no_grad()
def top5_barplot(clip, image: "Image.Image", class_names: Sequence[str], template: Template = ENSEMBLE,
                 k: int = 5, title: str | None = None) -> "Figure":
    """The image next to horizontal bars of its top-k class probabilities (CLIP paper style)."""
    import matplotlib.pyplot as plt

    _, probs = classify(clip, [image], class_names, template)
    top = probs[0].topk(min(k, len(class_names)))
    names = [prompt_name(class_names[i]) for i in top.indices.tolist()]
    fig, (ax_img, ax_bar) = plt.subplots(1, 2, figsize=(7, 2.6), gridspec_kw={"width_ratios": [1, 1.6]})
    ax_img.imshow(image)
    ax_img.axis("off")
    if title:
        ax_img.set_title(title, fontsize=9)
    y = list(range(len(names)))[::-1]
    ax_bar.barh(y, top.values.numpy(), color=["tab:orange"] + ["tab:blue"] * (len(names) - 1))
    ax_bar.set_yticks(y, [template_name(template).format(object=n) if isinstance(template, str) else n
                          for n in names], fontsize=8)
    ax_bar.set_xlim(0, 1)
    ax_bar.set_xlabel("probability")
    fig.tight_layout()
    return fig
