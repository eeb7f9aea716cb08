"""The rank sweep's rerun, timed as a user runs it: `papermill 02 -p rank A`, then `-p rank B` right after.

    .venv/bin/python benchmarks/rank_rerun.py              # 3 pairs, rank 4 then rank 8 (about 2 min a pair on 2 cores)
    .venv/bin/python benchmarks/rank_rerun.py --pairs 5 --first 4 --second 16

Each pair starts from empty results, encoder-feature and CLIP-embedding caches (a cache folder of its own that
links to the built demo world, so the user's caches and reports are left alone) and with no warm worker server
(a worker folder of its own: the first run starts the server, as a user's first run of the day does, and the rerun
finds it), runs the two papermill commands one after the other and times each from the command's start to its
exit; then it stops that server. The second run should train only the
rank-B attempt and reuse the other three; the script checks that in the executed notebook. It prints every pair
and the median ratio, and writes reports/bench/rank_rerun.json. Issue #17 asks for a ratio under 1/3 on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "02_train.ipynb"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3, help="how many (first, second) pairs to time")
    p.add_argument("--first", type=int, default=4, help="LoRA rank of the first run")
    p.add_argument("--second", type=int, default=8, help="LoRA rank of the rerun")
    p.add_argument("--params", default="params/demo.yaml", help="params file (the demo world by default)")
    p.add_argument("--out", default=str(REPO / "reports" / "bench" / "rank_rerun.json"), help="JSON output")
    return p.parse_args(argv)


def _stream_text(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    return "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")


def run_notebook(out_nb: Path, rank: int, params: str, run_dir: Path, env: dict[str, str]) -> dict:
    """One `papermill 02 -p rank R` (its own run_dir): wall seconds and what it said about cached attempts."""
    cmd = [sys.executable, "-m", "papermill", str(NOTEBOOK), str(out_nb), "-p", "rank", str(rank),
           "-p", "params_file", params, "-p", "run_dir", str(run_dir), "--log-level", "WARNING"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    text = _stream_text(out_nb)
    return {"rank": rank, "seconds": round(seconds, 2), "computed": text.count(": computed result"),
            "reused": text.count(": reused cached result")}


def _cpu() -> str:
    """The CPU model, family/model numbers and vector width (the demo models train differently per float kernels)."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                    if ":" in line)
    except OSError:
        return platform.processor() or platform.machine()
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = info.get("flags", "").split()
    return (f"{info.get('model name', platform.machine())} (family {info.get('cpu family')} model "
            f"{info.get('model')}, {'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("CAPTIONLAB_CACHE", str(REPO / ".cache"))
    from captionlab.demo import MODEL_BUILDERS, ensure_models, world_root
    from captionlab.utils import atomic_write_json, cpu_cores
    from captionlab.workers import DIR_ENV, stop_servers

    ensure_models(MODEL_BUILDERS)  # the world and every demo model (independent ones side by side)
    demo = world_root().resolve().parent
    pairs = []
    for i in range(args.pairs):
        with tempfile.TemporaryDirectory(prefix="rank_rerun_") as tmp:
            tmp = Path(tmp)
            (tmp / "cache").mkdir()
            (tmp / "cache" / "demo").symlink_to(demo, target_is_directory=True)  # built world; empty result caches
            env = {**os.environ, "CAPTIONLAB_CACHE": str(tmp / "cache"), DIR_ENV: str(tmp / "workers")}
            env.pop("PYTHONDONTWRITEBYTECODE", None)  # as `make` runs it: cached bytecode
            try:
                first = run_notebook(tmp / "first.ipynb", args.first, args.params, tmp / "run", env)
                second = run_notebook(tmp / "second.ipynb", args.second, args.params, tmp / "run", env)
            finally:
                stop_servers(tmp / "workers")
        ratio = second["seconds"] / first["seconds"]
        pairs.append({"first": first, "second": second, "ratio": round(ratio, 3)})
        print(f"pair {i + 1}: rank {args.first} {first['seconds']:.1f} s ({first['computed']} attempts trained), "
              f"rank {args.second} {second['seconds']:.1f} s ({second['computed']} trained, {second['reused']} "
              f"reused): ratio {ratio:.3f}", flush=True)
        if second["computed"] != 1:
            print(f"  the rerun trained {second['computed']} attempts, not 1: it is not a rank-only rerun")
    ratios = [p["ratio"] for p in pairs]
    summary = {"median_ratio": round(statistics.median(ratios), 3), "max_ratio": max(ratios),
               "under_a_third": sum(r < 1 / 3 for r in ratios), "pairs": len(pairs)}
    print(f"median ratio {summary['median_ratio']:.3f} (max {summary['max_ratio']:.3f}); "
          f"{summary['under_a_third']} of {len(pairs)} pairs under 1/3")
    meta = {"cpu": _cpu(), "cores": cpu_cores(), "python": platform.python_version(),
            "params": args.params, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {"meta": meta, "summary": summary, "pairs": pairs})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
