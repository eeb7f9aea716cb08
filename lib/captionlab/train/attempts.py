"""Training attempts (02's main setting and its comparison table), cached by what produced them.

An attempt trains one captioner setting, captions the validation images and scores them. Its result is keyed by
the *effective* captioner and training configuration (settings that do not apply to a method, such as the LoRA
rank of an adapter run, are left out), the evaluation settings, and the fingerprints of the data and the frozen
models (`captionlab.resultcache`). Rerunning 02 with only `rank` changed retrains only the settings that use it.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from captionlab.models.specs import parse_spec
from captionlab.params import RunConfig
from captionlab.resultcache import CachedResult, ResultCache, held_fingerprints
from captionlab.train.config import captioner_config, train_config
from captionlab.utils import atomic_dir, atomic_write_json, cpu_cores

KIND = "train_attempt"
# CaptionerConfig fields that only matter for one PEFT method / one conditioning.
_METHOD_FIELDS = {"lora": ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets"),
                  "adapter": ("adapter_dim",), "prefix": ("prefix_len",)}
_CROSS_FIELDS = ("cross_every", "cross_dim")
# TrainConfig fields that do not change the result (where it is written, resuming, bookkeeping).
_TRAIN_IGNORED = ("out_dir", "resume", "save_every_steps", "keep_checkpoints", "cpu_threads", "micro_threads")


@dataclass
class Attempt:
    """One trained and scored setting: its checkpoint, training history, metrics and where they came from."""

    peft: str
    conditioning: str
    rank: int | None  # the LoRA rank (None for other methods)
    checkpoint: Path  # the best checkpoint (trainable weights + captioner.json)
    history: dict[str, Any]
    summary: dict[str, Any]  # corpus metrics (CIDEr, CLIPScore, ...)
    trainable: dict[str, Any]  # the trainable-parameter report
    predictions: Path  # {stem: caption} of the validation images
    per_image: Path  # per-image metrics CSV
    val_images: int  # how many validation images were scored
    result: CachedResult

    def row(self) -> dict[str, Any]:
        """The attempt's row in 02's comparison table."""
        return {"peft": self.peft, "conditioning": self.conditioning,
                "rank": str(self.rank) if self.rank is not None else "-",
                "trainable_params": self.trainable.get("trainable"), "CIDEr": self.summary.get("CIDEr"),
                "CLIPScore": self.summary.get("CLIPScore"), "cached": self.result.reused}

    def describe(self) -> str:
        """One line: which setting, and whether it was trained now or reused from the cache."""
        return self.result.describe(_label(self.peft, self.conditioning, self.rank))

    def copy_checkpoint(self, dest: str | Path) -> Path:
        """Copy the best checkpoint to `dest` (replaced atomically), e.g. where 03 and 04 expect it."""
        dest = Path(dest)
        with atomic_dir(dest) as tmp:
            shutil.copytree(self.checkpoint, tmp, dirs_exist_ok=True)
        return dest


def effective_config(cfg: RunConfig, **changes: Any) -> dict[str, Any]:
    """The settings that determine an attempt's result (inapplicable method/conditioning fields dropped)."""
    cap = asdict(captioner_config(cfg, **changes))
    for method, names in _METHOD_FIELDS.items():
        if cap["peft"] != method:
            for name in names:
                cap.pop(name)
    if cap["conditioning"] != "cross":
        for name in _CROSS_FIELDS:
            cap.pop(name)
    train = asdict(train_config(cfg))
    for name in _TRAIN_IGNORED:
        train.pop(name)
    return {"captioner": cap, "train": train,
            "eval": {"val_images": val_count(cfg), "beam_size": cfg.beam_size, "max_new_tokens": cfg.max_new_tokens,
                     "clip_model": cfg.clip_model}}


def reference_config(cfg: RunConfig) -> RunConfig:
    """`cfg` with the params file's LoRA `rank` and `lora_alpha`: the comparison attempts of a rank sweep."""
    from captionlab.params import load_config

    file_cfg = load_config(cfg.params_file)
    return cfg.replace(rank=file_cfg.rank, lora_alpha=file_cfg.lora_alpha)


def val_count(cfg: RunConfig) -> int:
    """How many validation images an attempt is scored on (0 = all; quick mode: 32)."""
    return 32 if cfg.quick else 0


def _model_paths(cfg: RunConfig) -> list[Path]:
    paths = []
    for spec in (cfg.encoder, cfg.decoder, cfg.clip_model, getattr(cfg, "tokenizer", None)):
        if spec:
            local = parse_spec(spec).local_path
            if local is not None:
                paths.append(local)
    return paths


def _cache_args(cfg: RunConfig, **changes: Any) -> tuple[dict[str, Any], list[Path], list[Path]]:
    """(configuration, input files, listed folders) that key an attempt's result."""
    p2 = Path(cfg.data_root) / "p2_data"
    return (effective_config(cfg, **changes), [p2 / "train.json", p2 / "val.json", *_model_paths(cfg)],
            [p2 / "images" / "train", p2 / "images" / "val"])


def attempt_key(cfg: RunConfig, cache: ResultCache | None = None, **changes: Any) -> str:
    """The result key of `run_attempt(cfg, **changes)` (whether it is stored: `cache.stored(KIND, key)`)."""
    config, inputs, listings = _cache_args(cfg, **changes)
    return (cache or ResultCache()).key(KIND, config, inputs, listings)


def default_workers(cfg: RunConfig, todo: int) -> int:
    """Processes for `todo` uncached attempts: one per core (at most two) on a CPU; one on a GPU (the attempts
    would share its memory) and in quick mode (its attempts train in seconds, less than starting a process)."""
    import torch

    if todo <= 1 or cfg.quick or torch.cuda.is_available():
        return 1
    return min(2, cpu_cores(), todo)


def _attempt_worker(args: tuple[RunConfig, dict[str, Any], str, int | None, int | None, str | None, bool]
                    ) -> str | None:
    """A worker process (forked by the warm worker server, or spawned): one attempt with the notebook's cache folder
    and torch thread count (None: torch's default) and its share of the cores for side-by-side micro-batches
    (`TrainConfig.micro_threads`, which does not change the result; None: the share of the moment, as the server's
    running attempts come and go: `captionlab.train.loop.side_by_side`), its progress bars and prints
    going to `log` (default: the attempt's log in the cache), as two workers' bars would interleave on the
    notebook's terminal; returns its key. `early` (02's setup cell submitting the notebook's own setting before
    its imports): nothing is trained on a GPU (attempts train in the notebook there); returns None."""
    cfg, changes, cache_root, threads, share, log, early = args
    import contextlib

    import torch

    if early and torch.cuda.is_available():
        return None
    if threads:
        torch.set_num_threads(threads)
    cfg = cfg.replace(train={**cfg.train, "micro_threads": share or 0})  # 0: the share of the moment
    cache = ResultCache(cache_root)
    if log is None:
        log = str(cache.root / KIND / ".logs" / f"{attempt_key(cfg, cache, **changes)}.log")
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return run_attempt(cfg, cache, **changes).result.key


_STEP = re.compile(rb"epoch \d+/\d+:\s+\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)")


def _label(peft: str, conditioning: str, rank: int | None) -> str:
    """An attempt's name: method/conditioning, and the LoRA rank (None for other methods)."""
    return f"{peft}/{conditioning}" + (f" rank {rank}" if rank is not None else "")


def _setting_label(cfg: RunConfig, changes: dict[str, Any]) -> str:
    cap = captioner_config(cfg, **changes)
    return _label(cap.peft, cap.conditioning, cap.lora_rank if cap.peft == "lora" else None)


def _follow(jobs: dict[int, Any], logs: dict[int, Path], labels: dict[int, str]) -> None:
    """Until the workers' jobs are done, a progress bar per attempt in this process, read from the training-step
    bars the workers write to their logs."""
    from concurrent.futures import wait

    from tqdm.auto import tqdm

    bars: dict[int, Any] = {}
    pending = set(jobs.values())
    while pending:
        _, pending = wait(pending, timeout=0.5)
        for i, log in logs.items():
            try:
                with open(log, "rb") as f:
                    f.seek(max(0, log.stat().st_size - 4096))
                    found = _STEP.findall(f.read())
            except OSError:
                continue
            if not found:
                continue
            step, total = (int(x) for x in found[-1])
            if i not in bars:
                bars[i] = tqdm(total=total, desc=labels[i], unit="step", leave=False)
            bars[i].update(step - bars[i].n)
    for bar in bars.values():
        bar.close()


def run_attempts(settings: list[tuple[RunConfig, dict[str, Any]]], cache: ResultCache | None = None,
                 workers: int | None = None) -> list[Attempt]:
    """`run_attempt(cfg, **changes)` for each (cfg, changes), in order; the uncached ones train side by side.

    Each attempt runs exactly as it would alone (same seed, same torch thread count; side-by-side micro-batches do
    not change a result), so the results equal a one-by-one run. After `captionlab.workers.start_workers` they
    train in children of the warm worker server (two at a time on a CPU, a lone one on all cores; the setting that
    call submitted is taken over here), else in `workers` (default `default_workers`) spawned processes when more
    than one is due, each with its share of the cores; each attempt trained here is reported as computed, not
    reused. Spawned workers need the usual `__main__` guard in a script.
    """
    with held_fingerprints():  # the settings share their data and model files (read-only): fingerprinted once
        return _run_attempts(settings, cache or ResultCache(), workers)


def _run_attempts(settings: list[tuple[RunConfig, dict[str, Any]]], cache: ResultCache,
                  workers: int | None) -> list[Attempt]:
    import torch

    from captionlab import workers as warm

    keys = [attempt_key(cfg, cache, **changes) for cfg, changes in settings]
    todo = [i for i, key in enumerate(keys) if not cache.stored(KIND, key)]
    explicit = workers is not None
    if workers is None:
        workers = default_workers(settings[0][0], len(todo)) if settings else 1
    here = (not todo or not cache.enabled or (explicit and workers < 2) or settings[0][0].quick
            or torch.cuda.is_available())  # nothing to train, or it trains in this process
    server, early = warm.server_pool(), warm.take_early()
    threads = torch.get_num_threads()
    jobs: dict[int, Any] = {}
    if early is not None:  # 02's setup cell submitted the notebook's own setting: the job is one of these, or waste
        (cfg0, changes0, root0, threads0, *_), future = early
        key0 = attempt_key(cfg0, ResultCache(root0), **changes0) if Path(root0) == cache.root else None
        match = [i for i in todo if keys[i] == key0 and threads0 in (None, threads)]
        if match and not here:
            jobs[match[0]] = future
        elif server is not None:
            server.hang_up(future)  # its child exits
    if here:
        server = None
    if server is not None or (not here and workers > 1 and len(todo) > 1):
        pool = server or warm.spawn_pool(workers)
        procs = min(pool.max_workers if server else workers, len(todo))
        share = max(1, cpu_cores() // (procs * threads))
        logs = {i: cache.root / KIND / ".logs" / f"{keys[i]}.log" for i in todo}
        where = f"forked from the warm worker ({pool.path.name})" if server else "spawned"
        print(f"training {len(todo)} attempt{'s' * (len(todo) > 1)} in {procs} process{'es' * (procs > 1)} "
              f"({share} core{'s' * (share > 1)} each; each as it would run alone; {where}"
              f"{', the first one submitted by the setup cell' if jobs else ''}); progress in {logs[todo[0]].parent}/",
              flush=True)
        with contextlib.nullcontext(pool) if server else pool:  # the server pool stays open for the next call
            try:
                for i in todo:
                    if i not in jobs:
                        jobs[i] = pool.submit(_attempt_worker, (settings[i][0], settings[i][1], str(cache.root),
                                                                threads, None if server else share, str(logs[i]),
                                                                False))
                _follow(jobs, logs, {i: _setting_label(settings[i][0], settings[i][1]) for i in todo})
            except BaseException:  # an interrupted notebook: the server's children of this call exit
                for job in jobs.values():
                    if server:
                        server.hang_up(job)
                raise
            for i, job in jobs.items():
                try:
                    job.result()  # re-raises a worker's error here
                except warm.WorkerUnavailable as e:  # trained below, in this process
                    print(f"{e}: attempt {settings[i][1] or 'main'} trains in this process", flush=True)
                except Exception as e:
                    raise RuntimeError(f"attempt {settings[i][1] or 'main'} failed ({type(e).__name__}: {e}); "
                                       f"its log: {logs[i]}") from e
        if not server:
            warm.stop_resource_tracker()
    out = []
    trained_here = {keys[i] for i in todo}
    for cfg, changes in settings:
        attempt = run_attempt(cfg, cache, **changes)
        if attempt.result.key in trained_here and attempt.result.reused:  # trained by a worker of this call
            attempt.result = replace(attempt.result, reused=False)
        out.append(attempt)
    return out


def run_attempt(cfg: RunConfig, cache: ResultCache | None = None, **changes: Any) -> Attempt:
    """Train, caption and score the run's setting with `changes` (CaptionerConfig fields), or reuse the result."""
    cache = cache or ResultCache()
    root = Path(cfg.data_root)
    p2 = root / "p2_data"
    config, inputs, listings = _cache_args(cfg, **changes)

    def compute(out: Path) -> dict[str, Any]:
        from captionlab.data import load_captions, save_predictions
        from captionlab.metrics.evaluate import evaluate
        from captionlab.models.captioner import load_captioner
        from captionlab.report.dataset import subset
        from captionlab.train.loop import side_by_side, train

        tcfg = train_config(cfg, out / "run")
        if (out / "run" / "latest.json").exists():  # a killed attempt: continue from its last checkpoint
            tcfg.resume = True
        history = train(captioner_config(cfg, **changes), tcfg, root)
        best = Path(history["best"]["dir"]) if history.get("best") else out / "run" / "best"
        model = load_captioner(best)
        val = subset(load_captions(p2 / "val.json"), val_count(cfg))
        val_dir = p2 / "images" / "val"
        images = [val.image_path(val_dir, s) for s in val.stems]
        preds = dict(zip(val.stems, model.generate_cached(images, beam_size=cfg.beam_size,
                                                          max_new_tokens=cfg.max_new_tokens,
                                                          threads=side_by_side(tcfg))))
        save_predictions(out / "predictions.json", preds)
        scored = evaluate(preds, val, val_dir, clip=cfg.clip_model, metrics=("CIDEr", "CLIPScore"))
        scored.per_image.to_csv(out / "per_image.csv", index=False)
        atomic_write_json(out / "history.json", history)
        return {"checkpoint": str(best), "summary": scored.summary, "trainable": model.report,
                "predictions": str(out / "predictions.json"), "per_image": str(out / "per_image.csv"),
                "val_images": len(val.stems)}

    result = cache.run(KIND, config, compute, inputs=inputs, listings=listings)
    value = result.value
    cap = config["captioner"]
    return Attempt(peft=cap["peft"], conditioning=cap["conditioning"], rank=cap.get("lora_rank"),
                   checkpoint=Path(value["checkpoint"]),
                   history=json.loads((result.dir / "history.json").read_text(encoding="utf-8")),
                   summary=value["summary"], trainable=value["trainable"], predictions=Path(value["predictions"]),
                   per_image=Path(value["per_image"]), val_images=int(value["val_images"]), result=result)
