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
    run.add_argument("--skip-check", action="store_true", help="do not run the preflight check first")
    run.add_argument("--jobs", type=int, default=None,
                     help="notebooks run side by side (default: 2 on the demo world with 2+ cores, else 1)")
    run.set_defaults(func=_run)

    check = sub.add_parser("check", help="preflight: data, annotations, model specs, tokenizer, Java, Chromium, "
                                         "device memory and run-time estimates (downloads and trains nothing)")
    check.add_argument("--params", default="params/demo.yaml", help="params file (default: params/demo.yaml)")
    check.add_argument("--only", default=None, help="comma-separated notebooks to check for (default: all)")
    check.add_argument("--gpu", default=None, help="estimate for a reference GPU instead of this machine's "
                                                   "(e.g. A100, T4, 'RTX 4090')")
    check.add_argument("--no-pdf", action="store_true", help="Chromium missing is then only a warning")
    check.set_defaults(func=_check)

    sweep = sub.add_parser("sweep", help="run one notebook per setting of a sweep file; write a comparison table")
    sweep.add_argument("sweep_file", help="e.g. params/sweeps/lora_rank.yaml")
    sweep.add_argument("--out", default=None, help="output folder (default: reports/sweeps/<sweep name>)")
    sweep.add_argument("--quick", action="store_true", default=None, help="small sizes")
    sweep.set_defaults(func=_sweep)
    report.set_defaults(func=lambda args: (report.print_help(), 1)[1])


def _preflight(params: str, only: str | None, pdf: bool, gpu: str | None = None):
    from captionlab.report.preflight import preflight
    from captionlab.report.runner import select_notebooks

    names = [p.stem for p in select_notebooks(only)]
    return preflight(params, notebooks=names, pdf=pdf, gpu=gpu)


def _check(args: argparse.Namespace) -> int:
    result = _preflight(args.params, args.only, not args.no_pdf, args.gpu)
    print(result.table())
    return 0 if result.ok else 1


def _run(args: argparse.Namespace) -> int:
    from captionlab.errors import ConfigError
    from captionlab.report.runner import run_report, start_builds, stop_builds

    builder = start_builds(args.params, args.out, args.only)  # demo world: generate it while the preflight runs
    try:
        if not args.skip_check:
            result = _preflight(args.params, args.only, pdf=False)  # Chromium missing: the runner falls back to HTML
            print(result.table(), file=sys.stderr)
            if not result.ok:
                raise ConfigError(f"preflight of {args.params} found {len(result.problems)} problem(s) (listed "
                                  "above); fix them or pass --skip-check")
        result = run_report(args.params, out_dir=args.out, notebooks=args.only, quick=args.quick,
                            pdf=not args.no_pdf, hide_input=args.hide_input, jobs=args.jobs, builder=builder)
    finally:
        stop_builds(builder)
    from captionlab.report.stages import format_table

    print(format_table(result.stages, result.wall))
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
