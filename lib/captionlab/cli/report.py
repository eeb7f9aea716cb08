"""`captionlab report run|sweep`: execute the notebooks, render HTML/PDF and the index page."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `report run` and `report sweep`."""
    report = subparsers.add_parser("report", help="run the report notebooks and render HTML/PDF")
    sub = report.add_subparsers(dest="report_command", metavar="ACTION")

    run = sub.add_parser("run", help="execute the notebooks with a params file; write reports/<run>/")
    run.add_argument("--params", default="params/demo.yaml", help="params file (default: params/demo.yaml)")
    run.add_argument("--out", default=None, help="output folder (default: reports/<params file stem>)")
    run.add_argument("--only", default=None, help="comma-separated notebooks, e.g. 00_demo_world,02_train or 00,02")
    run.add_argument("--quick", action="store_true", help="small sizes (smoke test of the whole report)")
    run.add_argument("--hide-input", action="store_true", help="hide code cells in the HTML/PDF")
    run.add_argument("--no-pdf", action="store_true", help="HTML only")
    run.set_defaults(func=_run)

    sweep = sub.add_parser("sweep", help="run one notebook per setting of a sweep file; write a comparison table")
    sweep.add_argument("sweep_file", help="e.g. params/sweeps/lora_rank.yaml")
    sweep.add_argument("--out", default=None, help="output folder (default: reports/sweeps/<sweep name>)")
    sweep.add_argument("--quick", action="store_true", default=None, help="small sizes")
    sweep.set_defaults(func=_sweep)
    report.set_defaults(func=lambda args: (report.print_help(), 1)[1])


def _run(args: argparse.Namespace) -> int:
    from captionlab.report.runner import run_report

    result = run_report(args.params, out_dir=args.out, notebooks=args.only, quick=args.quick,
                        pdf=not args.no_pdf, hide_input=args.hide_input)
    print(f"report: {result.index}" + (f"\n   pdf: {result.pdf}" if result.pdf else ""))
    for note in result.warnings:
        print(f"warning: {note}", file=sys.stderr)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from captionlab.report.sweep import run_sweep

    result = run_sweep(args.sweep_file, out_dir=args.out, quick=args.quick)
    with __import__("pandas").option_context("display.width", 120):
        print(result.table.to_string(index=False))
    print(f"table: {result.csv}" + (f"\n  plot: {result.png}" if result.png else ""))
    return 0
