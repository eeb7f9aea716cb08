"""Every report notebook runs end to end on the demo world in quick mode (papermill, the report runner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captionlab.report import runner


# Split in two so the notebooks that need no LLaVA run while the demo LLaVA is still building (conftest); the
# second half runs on the same xdist worker, after the first, into the same report folder (04 reads 02's and
# 03's outputs there). Run alone, the second half runs 02 and 03 first itself (the runner's upstream rule).
WITHOUT_LLAVA = ("00_demo_world", "02_train", "03_evaluate", "05_clip_zero_shot", "06_vit_analysis")
WITH_LLAVA = ("01_llava_prompts", "04_attention")


@pytest.fixture(scope="session")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One report folder shared by both halves of the quick run."""
    return tmp_path_factory.mktemp("quick_report")


def _run_quick(out: Path, notebooks: tuple[str, ...]) -> runner.ReportResult:
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
@pytest.mark.xdist_group("quick_report")
def test_notebooks_without_llava_run_in_quick_mode(quick_report: Path, demo_clip: Path, demo_gpt2: Path) -> None:
    _run_quick(quick_report, WITHOUT_LLAVA)


@pytest.mark.slow
@pytest.mark.xdist_group("quick_report")
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
