"""Run the report notebooks with papermill (parameters from a params file), render HTML/PDF and the index page.

    run_report("params/demo.yaml")        # -> reports/demo/{index.html, report.pdf, NN_name.{ipynb,html,pdf}, NN_name/}

Each notebook gets `params_file`, `run_dir` and `quick` (it loads every other setting from the params file
itself) plus the keys under `per_notebook: {<name>: {...}}`, writes its artefacts into `run_dir/<name>/` and a
`headline.json` that the index page shows. The first failing notebook stops the run with an error naming the
notebook, the cell and the exception; what ran so far is still rendered and indexed.
"""

from __future__ import annotations

import contextvars
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from captionlab.errors import CaptionlabError, ConfigError
from captionlab.params import load_config
from captionlab.report import render
from captionlab.report.context import repo_path
from captionlab.report.memory import PeakMemory
from captionlab.report.stages import Stage, build_stages, notebook_stages
from captionlab.report.render import RenderError, Section
from captionlab.utils import REPO_ROOT, atomic_write_json, git_commit

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
ORDER = ("00_demo_world", "01_llava_prompts", "02_train", "03_evaluate", "04_attention",
         "05_clip_zero_shot", "06_vit_analysis")
ALWAYS = ("params_file", "run_dir", "quick")


class NotebookError(CaptionlabError):
    """A report notebook failed; the message names the notebook, the cell and the error."""


@dataclass
class ReportResult:
    """What `run_report` produced."""

    out_dir: Path
    sections: list[Section]
    index: Path
    pdf: Path | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)  # time per stage (venv, world, models, notebooks)
    wall: float | None = None  # wall-clock seconds since the run (or the `make` running it) began


def notebook_path(name: str | Path) -> Path:
    """Resolve `02_train`, `02`, `02_train.ipynb` or a path to a notebook file (ConfigError if unknown)."""
    p = Path(name)
    if p.suffix == ".ipynb" and p.exists():
        return p
    stem = p.stem if p.suffix == ".ipynb" else str(name)
    matches = [NOTEBOOK_DIR / f"{n}.ipynb" for n in ORDER if n == stem or n.split("_", 1)[0] == stem]
    if not matches and (NOTEBOOK_DIR / f"{stem}.ipynb").exists():
        matches = [NOTEBOOK_DIR / f"{stem}.ipynb"]
    if not matches:
        raise ConfigError(f"unknown notebook {str(name)!r}; known: {', '.join(ORDER)}")
    return matches[0]


def select_notebooks(names: Sequence[str] | str | None = None) -> list[Path]:
    """The notebooks to run, in report order (all of them when `names` is empty)."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    if not names:
        return [NOTEBOOK_DIR / f"{n}.ipynb" for n in ORDER]
    paths = [notebook_path(n.strip()) for n in names]
    rank = {n: i for i, n in enumerate(ORDER)}
    return sorted(dict.fromkeys(paths), key=lambda p: rank.get(p.stem, len(ORDER)))


def declared_parameters(notebook: str | Path) -> dict[str, Any]:
    """The names and defaults of the notebook's `parameters` cell (ConfigError if it has none)."""
    import papermill as pm

    declared = pm.inspect_notebook(str(notebook))
    if not declared:
        raise ConfigError(f"{notebook}: no cell tagged 'parameters'")
    return declared


def notebook_parameters(notebook: str | Path, run: dict[str, Any], overrides: dict[str, Any] | None = None,
                        per_notebook: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """What papermill injects: `run` (params_file, run_dir, quick), `overrides` and the notebook's `per_notebook` keys.

    Every override must be a parameter the notebook declares (ConfigError naming the notebook otherwise).
    """
    declared = declared_parameters(notebook)
    name = Path(notebook).stem
    chosen = {k: v for k, v in run.items() if k in declared}
    for source, extra in ((f"per_notebook.{name}", (per_notebook or {}).get(name) or {}),
                          ("overrides", overrides or {})):
        unknown = sorted(set(extra) - set(declared))
        if unknown:
            raise ConfigError(f"{source}: {', '.join(unknown)} not among {name}'s parameters "
                              f"({', '.join(sorted(declared))})")
        chosen.update(extra)
    return chosen


def check_kernel(kernel_name: str = "python3") -> str:
    """The interpreter the kernel will run; warns when it is not this venv's python."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        raise ConfigError(f"no Jupyter kernel named {kernel_name!r} (is ipykernel installed in {sys.prefix}?)") from None
    exe = spec.argv[0]
    # jupyter_client runs a kernelspec whose argv[0] is "python"/"python3" with this interpreter.
    if exe in ("python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"):
        exe = sys.executable
    if Path(exe).resolve() != Path(sys.executable).resolve() and Path(exe) != Path(sys.executable):
        warnings.warn(f"Jupyter kernel {kernel_name!r} ({spec.resource_dir}) runs {exe}, not {sys.executable}; "
                      "notebooks may not see captionlab", stacklevel=2)
    return exe


def _cell_summary(notebook: Path, exc: Any) -> str:
    """'cell 8/20' for the failing cell of the *source* notebook (papermill counts its injected cell too)."""
    import nbformat

    try:
        cells = nbformat.read(str(notebook), as_version=4).cells
    except (OSError, ValueError):
        return f"cell index {exc.cell_index}"
    for i, cell in enumerate(cells):
        if cell.cell_type == "code" and cell.source == exc.source:
            return f"cell {i + 1}/{len(cells)}"
    return f"cell index {exc.cell_index} of the executed copy"


def ipc_kernel_manager() -> type:
    """A jupyter_client kernel manager whose kernel talks over local IPC sockets instead of TCP ports.

    The kernel and papermill share this machine, so nothing needs a network port; over TCP, ipykernel warns
    "Kernel is running over TCP without encryption" for every notebook. Kernel errors are unaffected."""
    import uuid

    from jupyter_client import AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir
    from traitlets import CaselessStrEnum, default

    global _IPC_KM
    if _IPC_KM is None:
        class IPCKernelManager(AsyncKernelManager):
            """AsyncKernelManager over IPC sockets, each kernel's under its own name in the Jupyter runtime dir."""

            transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

            async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
                await super()._async_launch_kernel(kernel_cmd, **kw)
                pids = _KERNEL_PIDS.get()
                if pids is not None and getattr(self.provisioner, "pid", None):
                    pids.append(self.provisioner.pid)  # the run that started it measures its memory

            @default("ip")
            def _unique_ipc_path(self) -> str:
                # jupyter_client's default, "kernel-ipc" in the working directory when no connection file is set
                # yet, gives concurrent kernels (two report runs, xdist workers) the same sockets: one kernel then
                # reads the other's messages ("Invalid Signature").
                runtime = Path(jupyter_runtime_dir())
                runtime.mkdir(parents=True, exist_ok=True)
                return str(runtime / f"kernel-{uuid.uuid4().hex[:12]}-ipc")

        _IPC_KM = IPCKernelManager
    return _IPC_KM


_IPC_KM: type | None = None
# The kernel processes a notebook execution started (set per worker thread by `_execute_section`), so each
# section's peak memory is its own kernel's while notebooks run side by side.
_KERNEL_PIDS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("captionlab_kernel_pids",
                                                                                  default=None)


def execute_notebook(notebook: str | Path, output: str | Path, parameters: dict[str, Any],
                     cwd: str | Path = REPO_ROOT, kernel_name: str | None = None, progress: bool = True,
                     timeout: float | None = None) -> Path:
    """Execute `notebook` into `output` with papermill; on failure raise NotebookError naming notebook and cell."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    notebook, output = Path(notebook), Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        # shutdown_kernel="immediate": once the last cell is done, the kernel is stopped at once. A graceful
        # shutdown waits for ipykernel 7's control thread, which now and then flushes stdout through the IOPub
        # thread the kernel has already stopped; jupyter_client then waits 2.5 s before it sends SIGTERM.
        # Nothing in a notebook here depends on the kernel's atexit hooks (results are written atomically by
        # the cells that compute them, and worker processes are joined before their cell ends).
        pm.execute_notebook(str(notebook), str(output), parameters=parameters, kernel_name=kernel_name,
                            progress_bar=progress, cwd=str(cwd), execution_timeout=timeout,
                            kernel_manager_class=ipc_kernel_manager(), shutdown_kernel="immediate")
    except PapermillExecutionError as exc:
        lines = [ln for ln in (exc.source or "").splitlines() if ln.strip()]
        src = "\n".join("    " + ln for ln in lines[:4]) + ("\n    ..." if len(lines) > 4 else "")
        raise NotebookError(
            f"notebook {notebook.name} failed at {_cell_summary(notebook, exc)} "
            f"(execution count [{exc.exec_count}]): {exc.ename}: {exc.evalue}\n{src}\n"
            f"  full traceback in the executed copy: {output}") from None
    except Exception as exc:  # kernel died, timeout, invalid notebook...
        raise NotebookError(f"notebook {notebook.name} could not be executed: {type(exc).__name__}: {exc}\n"
                            f"  partial executed copy: {output}") from exc
    return output


def _render(section: Section, out_dir: Path, hide_input: bool, pdf: bool, notes: list[str]) -> None:
    if section.notebook is None or not section.notebook.exists():
        return
    section.html = render.render_html(section.notebook, out_dir / f"{section.name}.html", hide_input=hide_input)
    if pdf:
        try:
            section.pdf = render.html_to_pdf(section.html, out_dir / f"{section.name}.pdf")
        except RenderError as exc:
            notes.append(str(exc))
            warnings.warn(str(exc), stacklevel=3)


def run_report(params_file: str | Path, out_dir: str | Path | None = None,
               notebooks: Sequence[str] | str | None = None, quick: bool = False, render_html: bool = True,
               pdf: bool = True, hide_input: bool = False, kernel_name: str | None = None,
               progress: bool = True, jobs: int | None = None,
               builder: subprocess.Popen | None = None) -> ReportResult:
    """Execute the report notebooks, render each to HTML (+PDF), write index.html; stop at the first failure.

    Up to `jobs` notebooks run at once (default: `default_jobs`), each when the notebooks whose outputs it reads
    (`context.NEEDS`) have finished; in the demo world, the tiny models the run needs build in a background process
    meanwhile, and a notebook starts once its models (`context.NOTEBOOK_MODELS`) are built. The sections keep their
    numbered order in the index whatever order they ran in. `builder`: a build already started by `start_builds`
    (the CLI starts it before its preflight, which then runs while the world generates)."""
    t_start = time.time()
    params_path, out, run, cfg, paths = _plan(params_file, out_dir, notebooks, quick)
    check_kernel(kernel_name or "python3")
    notes: list[str] = []
    if pdf and render.find_chromium() is None:
        notes.append("chromium not found: HTML only, no PDF (install it with `make chromium`)")
        warnings.warn(notes[-1], stacklevel=2)
        pdf = False

    sections = [Section(p.stem) for p in paths]
    jobs = jobs if jobs is not None else default_jobs(cfg)
    if builder is None:
        builder = _start_model_builds(cfg, [p.stem for p in paths], out)
    try:
        failure = _execute_sections(paths, sections, cfg, run, out, jobs, builder, kernel_name, progress,
                                    render_html, hide_input, pdf, notes)
    finally:
        stop_builds(builder)  # a notebook failed (or the run was interrupted) while models were still building

    title = cfg.title or f"captionlab report — {params_path.stem}"
    info = {"params": _rel(params_path), "world": cfg.world, "quick": "yes" if quick else None,
            "git": (git_commit() or "")[:10], "total time": f"{time.time() - t_start:.0f} s"}
    # a stage "ran" in this run when it finished after the run began: after `make demo` began (the Makefile exports
    # its start time), or after the background build began (the CLI starts it before its preflight)
    since = min(t_start, getattr(builder, "started", t_start), _make_start() or t_start)
    stages = [*build_stages(cfg.data_root, since=since), *notebook_stages(sections)]
    wall = time.time() - since
    index = render.write_index(out, sections, title=title, info=info, stages=stages, wall=wall)
    combined = None
    pdfs = [s.pdf for s in sections if s.pdf]
    if pdf and pdfs:  # one PDF: the index page as a cover, then every section
        try:
            cover = render.html_to_pdf(index, out / "index.pdf")
            combined = render.combine_pdfs([cover, *pdfs], out / "report.pdf")
        except RenderError as exc:
            notes.append(str(exc))
            warnings.warn(str(exc), stacklevel=2)
        if combined:
            wall = time.time() - since
            index = render.write_index(out, sections, title=title, info=info, combined_pdf=combined, stages=stages,
                                       wall=wall)
    atomic_write_json(out / "report.json", {"params_file": str(params_path), "quick": quick, "notes": notes,
                                            "seconds": round(time.time() - t_start, 1),
                                            "sections": [s.to_json() for s in sections],
                                            "stages": [st.to_json() for st in stages],
                                            "wall_seconds": round(wall, 1)})
    if failure:
        raise NotebookError(f"{failure}\n  report so far: {index}")
    return ReportResult(out, sections, index, combined, time.time() - t_start, notes, stages, wall)


def _plan(params_file: str | Path, out_dir: str | Path | None, notebooks: Sequence[str] | str | None,
          quick: bool) -> tuple[Path, Path, dict[str, Any], Any, list[Path]]:
    """The run's params path, output folder, runner parameters, validated config and notebooks (with the upstream
    notebooks a selection needs)."""
    params_path = repo_path(params_file)
    out = Path(out_dir) if out_dir else REPO_ROOT / "reports" / params_path.stem
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = {"run_dir": str(out), "quick": bool(quick), "params_file": str(params_path)}
    cfg = load_config(params_path, run)  # validates the whole file before any notebook runs
    notebooks = notebooks or cfg.notebooks  # the params file's `notebooks:` list, when no selection is given
    paths = select_notebooks(notebooks)
    if notebooks:  # a selection also runs the upstream notebooks whose outputs it needs and this run lacks
        from captionlab.report.context import upstream_notebooks

        wanted = [n for p in paths for n in upstream_notebooks(p.stem, cfg)] + [p.stem for p in paths]
        paths = select_notebooks(list(dict.fromkeys(wanted)))
    for p in paths:
        if not p.exists():
            raise ConfigError(f"{p}: notebook not found")
    return params_path, out, run, cfg, paths


def start_builds(params_file: str | Path, out_dir: str | Path | None = None,
                 notebooks: Sequence[str] | str | None = None) -> subprocess.Popen | None:
    """Start the background build of the demo world and the models the run's notebooks need (None when there is
    nothing to build, or the world is not the demo one); pass it to `run_report(builder=...)`."""
    _, out, _, cfg, paths = _plan(params_file, out_dir, notebooks, False)
    return _start_model_builds(cfg, [p.stem for p in paths], out)


def stop_builds(builder: subprocess.Popen | None) -> None:
    """Stop a background build (builds write into a temporary folder and rename it: nothing half-built is left)."""
    if builder is not None and builder.poll() is None:
        os.killpg(builder.pid, signal.SIGTERM)
        builder.wait()


def default_jobs(cfg: Any) -> int:
    """Notebooks run side by side: two on the demo world when the machine has two cores or more (its models are
    tiny, and most cells use one core), one otherwise (a real model fills a GPU or all cores by itself)."""
    if cfg.world != "demo":
        return 1
    return max(1, min(2, len(os.sched_getaffinity(0))))


def _start_model_builds(cfg: Any, names: Sequence[str], out: Path) -> subprocess.Popen | None:
    """Demo world: build the models the notebooks `names` need, in a background process, when any is missing."""
    if cfg.world != "demo":
        return None
    from captionlab.demo import is_built
    from captionlab.report.context import NOTEBOOK_MODELS

    root = Path(cfg.data_root).expanduser()
    models = list(dict.fromkeys(m for n in names for m in NOTEBOOK_MODELS.get(n, ())))
    if all(is_built(m, cfg.seed, root) for m in models) and (root / "world.json").exists():
        return None
    log = out / "model-build.log"
    started = time.time()
    with open(log, "ab") as fh:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "captionlab.cli", "world", "build", "--seed", str(cfg.seed),
                                 "--root", str(root), "--models", *models],
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    proc.started = started  # type: ignore[attr-defined]
    return proc


def _make_start() -> float | None:
    """When the `make` invocation running this began (CAPTIONLAB_MAKE_START, exported by the Makefile), if any."""
    try:
        return float(os.environ["CAPTIONLAB_MAKE_START"])
    except (KeyError, ValueError):
        return None


def _ready(name: str, cfg: Any, names: Sequence[str], done: set[str], builder: subprocess.Popen | None) -> bool:
    """Whether notebook `name` can start: the notebooks of this run it reads from (`NEEDS`, `READS`) are done, and
    its models are built (or nothing builds them: then it builds them itself, or says what is missing)."""
    from captionlab.report.context import NEEDS, NOTEBOOK_MODELS, READS

    if any(up in names and up not in done for up in [*NEEDS.get(name, {}), *READS.get(name, ())]):
        return False
    if builder is None or builder.poll() is not None:
        return True
    from captionlab.demo import is_built

    root = Path(cfg.data_root).expanduser()
    return (root / "world.json").exists() and all(is_built(m, cfg.seed, root) for m in NOTEBOOK_MODELS.get(name, ()))


def _execute_sections(paths: list[Path], sections: list[Section], cfg: Any, run: dict[str, Any], out: Path,
                      jobs: int, builder: subprocess.Popen | None, kernel_name: str | None, progress: bool,
                      render_html: bool, hide_input: bool, pdf: bool, notes: list[str]) -> NotebookError | None:
    """Run the notebooks (up to `jobs` at once, each once it is `_ready`), rendering each as it finishes; after
    a failure nothing new starts. Returns the first failure."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    names = [p.stem for p in paths]
    todo = list(zip(paths, sections))
    done: set[str] = set()
    failure: NotebookError | None = None
    started = 0
    kernels: list[list[int]] = []  # each notebook's kernel pids, to stop them if this run is interrupted

    def one(path: Path, section: Section) -> NotebookError | None:
        t0 = time.time()
        section.notebook = out / f"{path.stem}.ipynb"
        (out / path.stem / render.HEADLINE).unlink(missing_ok=True)  # never show a previous run's numbers
        error = None
        pids: list[int] = []  # filled by the kernel manager (ipc_kernel_manager)
        _KERNEL_PIDS.set(pids)
        kernels.append(pids)
        try:
            with PeakMemory(roots=lambda: list(pids)) as mem:  # this notebook's kernel, sampled while it runs
                execute_notebook(path, section.notebook, notebook_parameters(path, run, per_notebook=cfg.per_notebook),
                                 kernel_name=kernel_name, progress=progress and jobs == 1)
            section.status = "ok"
        except NotebookError as exc:
            section.status, section.error, error = "failed", str(exc), exc
        section.seconds = time.time() - t0
        section.extras["peak_memory_mb"] = mem.peak_mb
        section.headline = render.read_headline(out / path.stem)
        if render_html:
            _render(section, out, hide_input, pdf, notes)
        if jobs > 1:
            print(f"      {path.stem} {section.status} in {section.seconds:.0f} s", file=sys.stderr, flush=True)
        return error

    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="notebook")
    running: dict[Any, str] = {}
    try:
        while todo or running:
            if failure is None:
                for item in list(todo):
                    if len(running) >= jobs:
                        break
                    if _ready(item[0].stem, cfg, names, done, builder):
                        todo.remove(item)
                        started += 1
                        print(f"[{started}/{len(paths)}] {item[0].stem}", file=sys.stderr, flush=True)
                        # an empty context: jupyter_core keeps its event loop in a context variable, and a copy
                        # of this thread's would hand every notebook the same loop
                        running[pool.submit(contextvars.Context().run, one, *item)] = item[0].stem
            else:
                todo.clear()
            if not running:
                if todo:
                    time.sleep(0.5)  # waiting for the background model build
                continue
            finished, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in finished:
                name = running.pop(fut)
                error = fut.result()
                done.add(name)
                if error is not None and failure is None:
                    failure = error
    except BaseException:  # interrupted (Ctrl-C): the kernels run in their own sessions, stop them too
        for pid in [p for pids in kernels for p in pids]:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return failure


def _rel(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)
