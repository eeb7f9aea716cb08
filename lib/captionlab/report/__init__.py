"""Report infrastructure: notebook context, save-and-show figures, papermill runner, HTML/PDF rendering, sweeps.

In a notebook:  `from captionlab import report; ctx = report.start("02_train", globals(), models=["clip"])`,
then `report.show(fig, ctx.path("loss.png"))`, `report.show_table(rows, ctx.path("table.csv"))`,
`ctx.headline({...})`. From the shell: `captionlab report run --params params/demo.yaml`.
"""

from captionlab.report.context import NotebookContext, start
from captionlab.report.figures import bar_chart, image_grid, save_figure, show, show_image, show_table

__all__ = [
    "NotebookContext",
    "bar_chart",
    "image_grid",
    "run_report",
    "run_sweep",
    "save_figure",
    "show",
    "show_image",
    "show_table",
    "start",
]


def run_report(*args, **kwargs):
    """Execute the report notebooks and render them (see `captionlab.report.runner.run_report`)."""
    from captionlab.report.runner import run_report as _run

    return _run(*args, **kwargs)


def run_sweep(*args, **kwargs):
    """Run a parameter sweep (see `captionlab.report.sweep.run_sweep`)."""
    from captionlab.report.sweep import run_sweep as _run

    return _run(*args, **kwargs)
