"""Executed notebooks -> self-contained HTML (nbconvert) -> PDF (headless Chromium), plus the index page."""

from __future__ import annotations

import datetime as _dt
import html
import json
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from captionlab.errors import CaptionlabError
from captionlab.utils import atomic_path, atomic_write_text

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--disable-extensions", "--hide-scrollbars"]


HEADLINE = "headline.json"


class RenderError(CaptionlabError):
    """HTML or PDF rendering failed."""


def render_html(notebook: str | Path, html_path: str | Path, hide_input: bool = False) -> Path:
    """Render an executed notebook to one self-contained HTML file (images embedded, no CDN scripts)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    _drop_noise(nb)
    _drop_live_widgets(nb)
    exporter = HTMLExporter(template_name="lab", embed_images=True, exclude_input=hide_input,
                            exclude_input_prompt=hide_input, exclude_output_prompt=hide_input)
    # Offline: no require.js / MathJax from a CDN (Chromium would wait for them; the HTML must stand alone).
    exporter.mathjax_url = ""
    exporter.require_js_url = ""
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": Path(notebook).stem}})
    body = body.replace('<script src=""></script>', "").replace("</head>", f"<style>{_PRINT_CSS}</style>\n</head>", 1)
    return atomic_write_text(html_path, body)


# Wrap long code lines and keep wide tables/figures on the page when Chromium prints to PDF.
_PRINT_CSS = """
@page { size: A4; margin: 12mm 10mm; }
.jp-InputArea-editor pre, .jp-OutputArea-output pre, .highlight pre { white-space: pre-wrap !important; word-break: break-word; }
.jp-OutputArea-output table { font-size: 0.82em; }
.jp-OutputArea-output img { max-width: 100%; height: auto; }
@media print { .jp-Cell { break-inside: auto; } .jp-OutputArea-output img { break-inside: avoid; } }
"""


# stderr lines that are progress chatter of external tools, not results (Java PTB tokenizer of pycocoevalcap).
NOISE = re.compile(r"^PTBTokenizer tokenized \d+ tokens at [\d.]+ tokens per second\.\n?", re.MULTILINE)


def _drop_noise(nb: Any) -> None:
    """Remove known tool chatter from stderr outputs (and outputs left empty by that)."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.outputs:
            if out.output_type == "stream" and out.name == "stderr":
                out.text = NOISE.sub("", out.text)
        cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and not o.text.strip())]


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _drop_live_widgets(nb: Any) -> None:
    """Live ipywidgets cannot run in a saved page (their JavaScript comes from a CDN): drop the widget state and
    views so outputs show their static alternative (text/html, images) or a note."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW in data:
                del data[WIDGET_VIEW]
                if set(data) <= {"text/plain"}:
                    data["text/plain"] = "[interactive widget: shown when the notebook runs in Jupyter]"


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def html_to_pdf(html_path: str | Path, pdf_path: str | Path, chromium: str | None = None,
                timeout: float = 180) -> Path:
    """Print an HTML file to PDF with headless Chromium (raises RenderError naming the file on failure)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise RenderError(f"{html_path}: cannot print to PDF, chromium is not installed (make chromium)")
    html_path, pdf_path = Path(html_path).resolve(), Path(pdf_path)
    with tempfile.TemporaryDirectory(prefix="captionlab-chromium-") as profile, atomic_path(pdf_path) as tmp:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--print-to-pdf={tmp}",
               html_path.as_uri()]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise RenderError(f"{html_path}: chromium did not finish printing to PDF within {timeout:.0f} s") from None
        if proc.returncode != 0 or not tmp.exists() or tmp.stat().st_size == 0:
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            raise RenderError(f"{html_path}: chromium failed to print a PDF (exit {proc.returncode}): "
                              + " | ".join(tail))
    return pdf_path


def combine_pdfs(pdfs: Sequence[str | Path], out: str | Path) -> Path | None:
    """Concatenate PDFs with poppler's pdfunite; None (with a warning) when pdfunite is missing."""
    pdfunite = shutil.which("pdfunite")
    pdfs = [str(p) for p in pdfs if Path(p).exists()]
    if not pdfs:
        return None
    if pdfunite is None:
        warnings.warn("pdfunite (poppler-utils) not found: no combined report PDF", stacklevel=2)
        return None
    with atomic_path(out) as tmp:
        proc = subprocess.run([pdfunite, *pdfs, str(tmp)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RenderError(f"{out}: pdfunite failed: {proc.stderr.strip()}")
    return Path(out)


@dataclass
class Section:
    """One notebook of a report run: its status, files and headline numbers."""

    name: str
    status: str = "not run"  # ok | failed | not run
    seconds: float | None = None
    notebook: Path | None = None
    html: Path | None = None
    pdf: Path | None = None
    headline: dict[str, Any] | None = None
    error: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able summary."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def read_headline(section_dir: str | Path) -> dict[str, Any] | None:
    """A section's headline.json, or None when missing or unreadable."""
    path = Path(section_dir) / HEADLINE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _link(path: Path | None, out_dir: Path, label: str) -> str:
    if path is None or not Path(path).exists():
        return ""
    path, root = Path(path).resolve(), out_dir.resolve()
    href = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_uri()
    return f'<a href="{html.escape(href)}">{label}</a>'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} .meta{color:#666;font-size:.9em;margin-bottom:1.5em}
table{border-collapse:collapse;width:100%} th,td{border-bottom:1px solid #ddd;padding:.45em .6em;text-align:left;vertical-align:top}
th{background:#f5f5f5} .ok{color:#1a7f37;font-weight:600} .failed{color:#cf222e;font-weight:600} .not{color:#888}
.metrics span{display:inline-block;margin-right:1em;white-space:nowrap} .err{color:#cf222e;font-size:.85em;white-space:pre-wrap}
.world{font-size:.85em;background:#eef;border-radius:3px;padding:0 .35em}
"""


def _stages_html(stages: Sequence[Any], wall: float | None = None) -> str:
    if not stages:
        return ""
    rows = "".join(f"<tr><td>{html.escape(st.name)}</td><td>{'' if st.seconds is None else f'{st.seconds:.0f} s'}</td>"
                   f"<td>{'ran' if st.ran else 'cached'}</td><td>{html.escape(st.detail)}</td></tr>" for st in stages)
    total = sum(st.seconds or 0.0 for st in stages if st.ran)
    return (f'<h2>Time per stage</h2><table class="stages"><thead><tr><th>Stage</th><th>Time</th><th>This run</th>'
            f"<th></th></tr></thead><tbody>{rows}"
            + ("" if wall is None else f"<tr><td><b>wall clock (this run)</b></td><td><b>{wall:.0f} s</b></td>"
               "<td></td><td>stages overlap: models build while notebooks run, two at a time</td></tr>")
            + f"<tr><td><b>sum of stages (this run)</b></td><td><b>{total:.0f} s</b></td>"
            "<td></td><td></td></tr></tbody></table><p><small>cached: built before this run (the time it took "
            "then).</small></p>")


def write_index(out_dir: str | Path, sections: Sequence[Section], title: str = "captionlab report",
                info: dict[str, Any] | None = None, combined_pdf: Path | None = None,
                stages: Sequence[Any] = (), wall: float | None = None) -> Path:
    """Write `index.html` linking every section, with its headline metrics, the world they came from and the time
    per stage (`captionlab.report.stages.Stage` rows: venv, world, each model, each notebook)."""
    out_dir = Path(out_dir)
    info = info or {}
    rows = []
    for s in sections:
        h = s.headline or {}
        name = html.escape(h.get("title") or s.name)
        world = f' <span class="world">{html.escape(str(h["world"]))} world</span>' if h.get("world") else ""
        metrics = "".join(f"<span><b>{html.escape(str(k))}</b> {html.escape(_fmt(v))}</span>"
                          for k, v in (h.get("metrics") or {}).items())
        if h.get("notes"):
            metrics += f'<div class="note">{html.escape(str(h["notes"]))}</div>'
        if s.error:
            metrics += f'<div class="err">{html.escape(s.error)}</div>'
        css = {"ok": "ok", "failed": "failed"}.get(s.status, "not")
        secs = f"{s.seconds:.0f} s" if s.seconds is not None else ""
        if s.extras.get("peak_memory_mb"):
            secs += f", peak RSS {s.extras['peak_memory_mb'] / 1024:.1f} GB"
        links = " · ".join(x for x in (_link(s.html, out_dir, "HTML"), _link(s.pdf, out_dir, "PDF"),
                                       _link(s.notebook, out_dir, "notebook")) if x)
        first = _link(s.html, out_dir, name) or name
        rows.append(f"<tr><td>{first}{world}<br><small>{html.escape(s.name)}</small></td>"
                    f'<td class="{css}">{html.escape(s.status)}<br><small>{secs}</small></td>'
                    f'<td class="metrics">{metrics}</td><td>{links}</td></tr>')
    meta = " · ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in info.items() if v not in (None, ""))
    pdf = f'<p>{_link(combined_pdf, out_dir, "Whole report as one PDF")}</p>' if combined_pdf else ""
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body><h1>{html.escape(title)}</h1>
<div class="meta">{meta}<br>generated {created}</div>{pdf}
<table><thead><tr><th>Section</th><th>Status</th><th>Headline</th><th>Files</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>{_stages_html(stages, wall)}</body></html>
"""
    return atomic_write_text(out_dir / "index.html", page)
