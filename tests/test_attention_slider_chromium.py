"""The static word slider in a rendered report: headless Chromium, offline, sees the frame change on a key press."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from captionlab.report import render

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
CHROMIUM = render.find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make chromium)")
REPO = Path(__file__).resolve().parents[1]


def check_sliders(html_path: Path, min_sliders: int = 1) -> int:
    """Open the page offline (any non-file request is refused and recorded); move every slider one step."""
    blocked: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(offline=True)
            page = context.new_page()

            def route(r):
                if r.request.url.startswith(("file:", "data:")):
                    return r.continue_()
                blocked.append(r.request.url)
                return r.abort()

            page.route("**/*", route)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(html_path.resolve().as_uri())
            sliders = page.locator(".captionlab-slider")
            n = sliders.count()
            assert n >= min_sliders
            for k in range(n):
                s = sliders.nth(k)
                img, word, rng = s.locator("img"), s.locator(".cl-word"), s.locator("input[type=range]")
                before = img.get_attribute("src")
                assert before.startswith("data:image/png;base64,")
                if int(rng.get_attribute("max")) == 0:
                    continue
                rng.focus()
                page.keyboard.press("ArrowRight")
                assert rng.input_value() == "1"
                assert img.get_attribute("src") != before  # the next word's frame is shown
                assert word.inner_text().strip()  # its word label is set
            assert not errors, errors
        finally:
            browser.close()
    assert not blocked, f"the page tried to fetch {blocked[:3]}"
    return n


def test_slider_in_rendered_notebook_works_offline(tmp_path):
    import nbformat
    import numpy as np
    from PIL import Image

    from captionlab.attention.explain import explain
    from captionlab.attention.widgets import ExplanationCache, attention_browser, word_slider
    from test_attention_capture import _captioner, _tiny_captioner_dirs

    dirs = _tiny_captioner_dirs(tmp_path / "m")
    model = _captioner(dirs, "lora")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    slider = word_slider(explain(model, img, "a red circle on the left", method="relevancy", layer=1))
    bundle = attention_browser(ExplanationCache(model, img, "a blue star"))._repr_mimebundle_()
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2,
                                                                             "version_minor": 0}}
    nb.cells = [nbformat.v4.new_markdown_cell("# sliders"),
                nbformat.v4.new_code_cell("word_slider(res)", outputs=[nbformat.v4.new_output(
                    "display_data", data={"text/html": slider.html, "text/plain": "<WordSlider>"})]),
                nbformat.v4.new_code_cell("attention_browser(cache)", outputs=[nbformat.v4.new_output(
                    "display_data", data=bundle)])]
    nbformat.write(nb, tmp_path / "nb.ipynb")
    html = render.render_html(tmp_path / "nb.ipynb", tmp_path / "nb.html")
    text = html.read_text()
    assert "widget-view+json" not in text and "unpkg" not in text and "jsdelivr" not in text
    assert check_sliders(html, min_sliders=2) == 2


def _rendered_04() -> Path | None:
    env = os.environ.get("CAPTIONLAB_04_HTML")
    if env:
        return Path(env)
    found = sorted((REPO / "reports").glob("**/04_attention*.html"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


@pytest.mark.skipif(_rendered_04() is None, reason="no rendered 04 report (make report, or set CAPTIONLAB_04_HTML)")
def test_rendered_04_report_sliders_work_offline():
    assert check_sliders(_rendered_04(), min_sliders=7) >= 7  # five p3 series + the top-1 / last-1 pairs
