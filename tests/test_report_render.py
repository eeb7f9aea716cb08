"""HTML rendering embeds images and can hide code; the index page lists sections; Chromium prints a PDF."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from captionlab.report import render
from captionlab.report.render import Section


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _executed_notebook(path: Path, image_file: Path) -> Path:
    """A notebook as papermill leaves it: a code cell with a PNG display output, markdown with a file image."""
    image_file.write_bytes(_png())
    cell = new_code_cell("make_figure()  # SECRET_CODE_MARKER", execution_count=1)
    cell.outputs = [new_output("stream", name="stderr",
                               text="PTBTokenizer tokenized 12 tokens at 99.5 tokens per second.\n"),
                    new_output("display_data", data={"image/png": base64.b64encode(_png()).decode(),
                                                      "text/plain": "<Figure>"})]
    nb = new_notebook(cells=[new_markdown_cell(f"# Title\n\n![local]({image_file.name})"), cell])
    nbformat.write(nb, str(path))
    return path


def test_html_embeds_images_and_hides_input(tmp_path: Path) -> None:
    nb = _executed_notebook(tmp_path / "n.ipynb", tmp_path / "local.png")
    html = render.render_html(nb, tmp_path / "out" / "n.html").read_text()
    assert html.count("data:image/png;base64") >= 2  # the output and the markdown file image
    assert "SECRET_CODE_MARKER" in html
    assert "PTBTokenizer" not in html  # tool chatter on stderr is dropped
    assert "cdnjs.cloudflare.com/ajax/libs/mathjax" not in html and "require.min.js" not in html
    hidden = render.render_html(nb, tmp_path / "out" / "h.html", hide_input=True).read_text()
    assert "SECRET_CODE_MARKER" not in hidden and "data:image/png;base64" in hidden


def test_index_lists_sections_with_headlines(tmp_path: Path) -> None:
    (tmp_path / "a.html").write_text("<html></html>")
    sections = [
        Section("01_llava_prompts", "ok", 12.0, html=tmp_path / "a.html",
                headline={"title": "01 · LLaVA prompts", "world": "demo", "metrics": {"CIDEr": 0.123456}}),
        Section("02_train", "failed", 3.0, error="notebook 02_train.ipynb failed at cell 5/9"),
        Section("03_evaluate"),
    ]
    page = render.write_index(tmp_path, sections, title="My report", info={"params": "params/demo.yaml"}).read_text()
    assert "My report" in page and "params/demo.yaml" in page
    assert '<a href="a.html">01 · LLaVA prompts</a>' in page
    assert "demo world" in page and "0.1235" in page
    assert "failed at cell 5/9" in page and "not run" in page and "03_evaluate" in page
    assert render.read_headline(tmp_path / "missing") is None


@pytest.mark.skipif(render.find_chromium() is None, reason="chromium not installed (make chromium)")
def test_pdf_with_chromium(tmp_path: Path) -> None:
    nb = _executed_notebook(tmp_path / "n.ipynb", tmp_path / "local.png")
    html = render.render_html(nb, tmp_path / "n.html")
    pdf = render.html_to_pdf(html, tmp_path / "n.pdf")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    combined = render.combine_pdfs([pdf, pdf], tmp_path / "both.pdf")
    if shutil.which("pdfinfo") and combined is not None:
        info = subprocess.run(["pdfinfo", str(combined)], capture_output=True, text=True, check=True).stdout
        pages = int(next(line.split()[-1] for line in info.splitlines() if line.startswith("Pages:")))
        single = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
        assert pages == 2 * int(next(line.split()[-1] for line in single.splitlines() if line.startswith("Pages:")))


def test_pdf_without_chromium_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render, "find_chromium", lambda: None)
    (tmp_path / "x.html").write_text("<p>x</p>")
    with pytest.raises(render.RenderError, match="x.html.*chromium is not installed"):
        render.html_to_pdf(tmp_path / "x.html", tmp_path / "x.pdf")
