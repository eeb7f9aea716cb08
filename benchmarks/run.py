"""Benchmarks: speed and memory of decoding, training, evaluation and attention capture, side by side in one run.

    .venv/bin/python benchmarks/run.py                 # demo world on CPU (= `make bench`), < 10 min on 2 cores
    .venv/bin/python benchmarks/run.py --quick         # tiny smoke run (seconds)
    .venv/bin/python benchmarks/run.py --only decode,eval
    .venv/bin/python benchmarks/run.py --device cuda --real params/dlcv2024.yaml   # real models (GPU)

Writes reports/bench/bench.json (all rows + run metadata) and bench.png, prints a table with the headline
ratios, and rewrites the README table between `<!-- bench:start -->` and `<!-- bench:end -->`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("CAPTIONLAB_CACHE", str(REPO / ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    from bench_suites import SECTIONS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (small sizes, 1 repeat)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--real", metavar="PARAMS", help="params file with real model specs (e.g. params/dlcv2024.yaml)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (recorded; default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    p.add_argument("--out", default=str(REPO / "reports" / "bench"), help="output directory")
    p.add_argument("--readme", default=str(REPO / "README.md"), help="README whose bench section is rewritten "
                   "('' to skip)")
    return p.parse_args(argv)


def make_setup(args: argparse.Namespace) -> tuple[Any, dict[str, Any], str]:
    """(Setup, params, world name) for the demo world or the `--real` params file."""
    import torch
    from bench_suites import Setup
    from captionlab.utils import get_device

    device = get_device(args.device)
    if args.real:
        from captionlab.params import load_params

        params = load_params(args.real)
        setup = Setup(device=device, data_root=Path(params["data_root"]), encoder=params["encoder"],
                      decoder=params["decoder"], clip=params["clip_model"], llava=params["llava_model"],
                      quick=args.quick, threads=args.threads, repeats=args.repeats, real=True,
                      cross={k: params[k] for k in ("cross_every", "cross_dim") if k in params})
        return setup, params, str(params.get("world", "real"))
    from captionlab.demo import ensure_model, ensure_world

    root = ensure_world(0)
    for name in ("clip", "gpt2", "llava"):
        ensure_model(name)
    params = {"data_root": str(root)}
    setup = Setup(device=device, data_root=root, encoder=f"hfclip:{root}/models/clip",
                  decoder=str(root / "models" / "gpt2" / "decoder_model.bin"), clip=str(root / "models" / "clip"),
                  llava=str(root / "models" / "llava"), quick=args.quick, threads=args.threads,
                  repeats=1 if args.quick else args.repeats)
    torch.manual_seed(0)
    return setup, params, "demo"


def _find(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["name"] == name), None)


def ratios(rows: list[dict]) -> dict[str, float]:
    """Headline ratios: ours/naive and ours/HF at the largest batch, training cache speed-up, capture overheads."""
    out: dict[str, float] = {}
    for m in ("greedy", "beam3"):
        dec = [r for r in rows if r["section"] == "decode" and r["name"].startswith(m + " ours b")]
        if dec:
            top = max(dec, key=lambda r: r["batch"])
            b = top["batch"]
            naive, hf = _find(rows, f"{m} naive"), _find(rows, f"{m} hf b{b}")
            lora = _find(rows, f"{m} ours+lora b{b}")
            if naive:
                out[f"{m} ours/naive @b{b} (img/s)"] = top["throughput"] / naive["throughput"]
            if hf:
                out[f"{m} ours/hf @b{b} (img/s)"] = top["throughput"] / hf["throughput"]
            if lora and hf:
                out[f"{m} ours+lora/hf @b{b} (img/s)"] = lora["throughput"] / hf["throughput"]
    for model in ("llava", "llava576"):
        for m in ("greedy", "beam3"):
            for b in (1, 8):
                o, h = _find(rows, f"{model} {m} ours b{b}"), _find(rows, f"{model} {m} hf b{b}")
                if o and h:
                    out[f"{model} {m} ours/hf @b{b} (img/s)"] = o["throughput"] / h["throughput"]
    for suffix, label in (("", "prefix"), (" (cross)", "cross")):
        c, u = _find(rows, f"train cached features{suffix}"), _find(rows, f"train encoder every step{suffix}")
        if c and u:
            out[f"train cached/uncached, {label} (samples/s)"] = c["throughput"] / u["throughput"]
    for metric, label in (("CIDEr", "CIDEr"), ("CLIPScore", "CLIPScore")):
        ev = sorted((r for r in rows if r["section"] == "eval" and r["name"].startswith(label + " ")),
                    key=lambda r: r["n"])
        if len(ev) >= 2:
            lo, hi = ev[0], ev[-1]
            out[f"{metric} time n={hi['n']}/n={lo['n']} ({hi['n'] / lo['n']:.0f}x captions)"] = \
                hi["seconds"] / lo["seconds"]
    for model, full in (("captioner", "all layers"), ("llava", "output_attentions"), ("llava576", "output_attentions")):
        plain = _find(rows, f"{model} plain")
        for label in ("capture 1 layer", full):
            r = _find(rows, f"{model} {label}")
            if plain and r:
                out[f"{model} {label}/plain (time)"] = r["seconds"] / plain["seconds"]
    return out


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """Rows as an aligned text table or a markdown table."""
    head = ["section", "benchmark", "batch", "median s", "throughput", "peak MiB"]
    body = [[r["section"], r["name"], str(r["batch"]), f"{r['seconds']:.4f}", f"{r['throughput']:.1f} {r['unit']}",
             "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def plot(rows: list[dict], path: Path) -> None:
    """One panel per section: throughput bars (log scale for decoding)."""
    import matplotlib.pyplot as plt
    from captionlab.utils import atomic_path

    sections = [s for s in ("decode", "train", "eval", "attention", "llava_decode") if any(r["section"] == s for r in rows)]
    fig, axes = plt.subplots(len(sections), 1, figsize=(10, 3.2 * len(sections)), squeeze=False)
    for ax, sec in zip(axes[:, 0], sections):
        rs = [r for r in rows if r["section"] == sec]
        colours = {"naive": "tab:red", "ours": "tab:green", "ours+lora": "tab:olive", "hf": "tab:blue"}
        ax.barh([r["name"] for r in rs], [r["throughput"] for r in rs],
                color=[colours.get(r["method"], "tab:gray") for r in rs])
        ax.set_xlabel(rs[0]["unit"] + (" (log)" if sec == "decode" else ""))
        if sec == "decode":
            ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(sec)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def readme_section(rows: list[dict], rat: dict[str, float], meta: dict[str, Any]) -> str:
    """The markdown written between the README markers."""
    b = meta["bench"]
    lines = [START, "## Benchmarks", "",
             (f"`make bench` ({b['world']} world, {b['device']}, {b['torch_threads']} torch thread(s), median of "
             f"{b['repeats']} after a warm-up; {b['cpu_count']} CPU cores, load average {b['load_avg_start']} at "
             f"start; shared machine, so wall times are noisy). Full rows: `reports/bench/bench.json`, plot: "
             "`reports/bench/bench.png`."), "",
             ("Decoding forces a fixed number of new tokens (eos banned) so every method generates the same work. "
             "*ours* = batched KV-cache search (`captionlab.decode`) on our GPT, *ours+lora* = the same on the "
             "captioner's PEFT decoder (untrained LoRA), *naive* = batch-1 full recompute "
             "(`reference_greedy` / `reference_beam`, timed on a subset, per-image throughput), *hf* = "
             "`GPT2LMHeadModel.generate` with the same weights and the same visual prefix as `inputs_embeds`. "
             f"Peak memory: {b['memory_method']}."), "",
             ("Ratios are throughput ratios (> 1: the first is faster) or, for attention, time ratios (> 1: "
             "slower than plain generation)."), "",
             "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in rat.items()]
    lines += ["", format_table(rows, markdown=True), END]
    return "\n".join(lines)


def update_readme(path: Path, section: str) -> None:
    """Replace the text between the bench markers (appending the markers at the end if missing)."""
    from captionlab.utils import atomic_write_text

    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    """Run the selected sections, write bench.json / bench.png, print the table, update the README."""
    args = parse_args(argv)
    import torch
    from bench_suites import SECTIONS

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {unknown}; choose from {list(SECTIONS)}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, only)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, only: list[str]) -> int:
    import torch
    from bench_measure import memory_method
    from bench_suites import SECTIONS
    from captionlab.utils import atomic_write_json, run_metadata

    setup, params, world = make_setup(args)
    meta = run_metadata(params, world, 0)
    meta["bench"] = {"world": world, "device": str(setup.device), "torch_threads": torch.get_num_threads(),
                     "repeats": setup.repeats, "warmup": 1, "quick": args.quick, "sections": only,
                     "cpu_count": os.cpu_count(), "load_avg_start": round(os.getloadavg()[0], 2),
                     "platform": platform.platform(), "memory_method": memory_method(setup.device),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    for name in only:
        t = time.time()
        print(f"== {name}", flush=True)
        rows += SECTIONS[name](setup)
        meta["bench"][f"{name}_wall_s"] = round(time.time() - t, 1)
    meta["bench"]["total_wall_s"] = round(time.time() - t0, 1)
    meta["bench"]["load_avg_end"] = round(os.getloadavg()[0], 2)
    rat = ratios(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench.json", {"run_metadata": meta, "ratios": rat, "rows": rows})
    plot(rows, out / "bench.png")
    print(format_table(rows))
    print("\nratios:")
    for k, v in rat.items():
        print(f"  {k}: {v:.2f}x")
    print(f"\nwrote {out / 'bench.json'} and {out / 'bench.png'} in {meta['bench']['total_wall_s']} s")
    if args.readme:
        update_readme(Path(args.readme), readme_section(rows, rat, meta))
        print(f"updated the bench section of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
