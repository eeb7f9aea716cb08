"""Every report notebook runs end to end on the demo world in quick mode (papermill, the report runner)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from captionlab.report import runner
from captionlab.utils import file_lock


# Split in two so the notebooks that need no LLaVA run while the demo LLaVA is still building (conftest); the
# second half runs after the first (conftest orders the LLaVA tests last) into the same report folder, on whichever
# xdist worker is free: 04 reads 02's and 03's outputs there. The folder is shared by the workers and a lock makes
# the second half wait for a first half that is still running (xdist_group would pin both halves to one worker, but
# pytest 9.2's node ids silently disable it: pytest-xdist#1386). Run alone, the second half runs 02 and 03 first
# itself (the runner's upstream rule).
WITHOUT_LLAVA = ("00_demo_world", "02_train", "03_evaluate", "05_clip_zero_shot", "06_vit_analysis")
WITH_LLAVA = ("01_llava_prompts", "04_attention")


@pytest.fixture(scope="session")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One report folder shared by both halves of the quick run (and by the xdist workers of this session)."""
    base = tmp_path_factory.getbasetemp()
    out = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "quick_report"
    out.mkdir(exist_ok=True)
    return out


def _run_quick(out: Path, notebooks: tuple[str, ...]) -> runner.ReportResult:
    with file_lock(out.parent / f"{out.name}.lock"):  # one half at a time: the second finds the first's sections
        result = runner.run_report("params/demo.yaml", out_dir=out, notebooks=list(notebooks), quick=True, pdf=False,
                                   progress=False)
    assert set(notebooks) <= {s.name for s in result.sections}
    for section in result.sections:
        assert section.status == "ok", section.error
        headline = json.loads((out / section.name / "headline.json").read_text())
        assert headline["world"] == "demo" and headline["quick"] is True and headline["metrics"], section.name
        assert "data:image/png;base64" in section.html.read_text(), f"{section.name}: no figure in the HTML"
    index = result.index.read_text()
    assert all(f"{s.name}.html" in index for s in result.sections)
    return result


@pytest.mark.slow
def test_notebooks_without_llava_run_in_quick_mode(quick_report: Path, demo_clip: Path, demo_gpt2: Path) -> None:
    _run_quick(quick_report, WITHOUT_LLAVA)


@pytest.mark.slow
def test_llava_notebooks_run_in_quick_mode(quick_report: Path, demo_clip: Path, demo_gpt2: Path,
                                           demo_llava: Path) -> None:
    _run_quick(quick_report, WITH_LLAVA)
    assert sorted(set(WITHOUT_LLAVA + WITH_LLAVA)) == sorted(runner.ORDER)  # together: every notebook
    slider_check(quick_report / "04_attention.html")


def slider_check(html: Path) -> None:
    """The rendered 04 page: its word sliders change frame in headless Chromium, offline (when available)."""
    try:
        from test_attention_slider_chromium import CHROMIUM, check_sliders
    except pytest.skip.Exception:  # playwright not installed
        return
    if CHROMIUM is not None:
        assert check_sliders(html, min_sliders=7) >= 7  # five p3 series + the top-1 / last-1 pairs
