"""Report bar charts stay readable: many or long labels are drawn vertically on wider panels."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402

from captionlab.report.figures import bar_chart  # noqa: E402


def _rotations(fig) -> set[float]:
    fig.canvas.draw()
    return {t.get_rotation() for t in fig.axes[0].get_xticklabels()}


def test_crowded_labels_are_vertical_and_few_stay_horizontal():
    runs = [f"{m} {layer}" for m in ("grad", "raw", "relevancy") for layer in range(4)]  # 04's method x layer
    many = bar_chart(pd.DataFrame({"run": runs, "pointing": range(12)}), "run", ["pointing", "random"])
    few = bar_chart(pd.DataFrame({"rank": [2, 4, 8], "CIDEr": [1.9, 2.0, 2.1]}), "rank", ["CIDEr"])
    assert _rotations(many) == {90.0} and _rotations(few) == {0.0}
    assert len(many.axes) == 1  # a metric missing from the table gets no panel
    # the labels do not overlap: each tick label's box is narrower than the spacing between ticks
    many.canvas.draw()
    boxes = [t.get_window_extent() for t in many.axes[0].get_xticklabels()]
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:]))
