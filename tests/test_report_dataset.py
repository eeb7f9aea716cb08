"""Dataset overview helpers used by the report notebooks, on the demo world."""

from __future__ import annotations

from pathlib import Path

from captionlab.data import load_captions
from captionlab.report import dataset


def test_overview_and_subsets(demo_world: Path, tmp_path: Path) -> None:
    rows = {r["split"]: r for r in dataset.overview(demo_world)}
    val = load_captions(demo_world / "p2_data" / "val.json")
    assert rows["p2 val"]["images"] == len(val) and rows["p2 val"]["captions/image"] == 5
    assert rows["p3 (attention)"]["images"] == 5 and rows["p1 zero-shot val"]["classes"] == 20

    first = dataset.subset(val, 3)
    assert first.stems == val.stems[:3] and first.captions[first.stems[0]] == val.captions[val.stems[0]]
    picked = dataset.subset(val, {val.stems[5], val.stems[1]})
    assert picked.stems == [val.stems[1], val.stems[5]]  # annotation order kept
    assert len(dataset.subset(val, 0)) == len(val)

    sub = dataset.class_folder_subset(demo_world / "p1_data" / "val", tmp_path / "q", per_class=2)
    names = sorted(p.name for p in sub.iterdir())
    labels = [n.split("_", 1)[0] for n in names]
    assert len(names) == 40 and all(labels.count(label) == 2 for label in set(labels))
