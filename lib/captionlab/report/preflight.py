"""Preflight: check a params file's data, models, tools and device before spending GPU hours.

    result = preflight("params/dlcv2024.yaml")     # nothing is downloaded, loaded in full or trained
    print(result.table())
    result.problems                                  # [] when the run can start

Checks: the data layout and counts; every annotation names an image that exists and opens; every model spec
resolves to a local file or an HF-cache entry; the decoder's vocabulary and the tokenizer agree (and which
tokenizer will be used); Java (CIDEr's PTB tokenizer) and Chromium (PDF); the device, its free memory against an
*estimated* peak per notebook, and an *estimated* run time per notebook from FLOP counts and the device's nominal
throughput. Estimates are rough (±2x): they are labelled as such and never fail the check unless the memory
estimate exceeds the device's memory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captionlab.errors import ConfigError

OK, PROBLEM, WARNING, INFO, ESTIMATE = "ok", "PROBLEM", "warning", "info", "estimate"
# Nominal dense bf16 tensor throughput (TFLOP/s) and memory bandwidth (GB/s) of common GPUs (vendor sheets).
GPUS: dict[str, tuple[float, float, float]] = {  # name: (TFLOP/s, GB/s, memory GB)
    "H100": (989.0, 3350.0, 80.0), "A100-80GB": (312.0, 2039.0, 80.0), "A100": (312.0, 1555.0, 40.0),
    "L40S": (362.0, 864.0, 48.0), "A6000": (155.0, 768.0, 48.0), "L4": (121.0, 300.0, 24.0),
    "A10": (125.0, 600.0, 24.0), "RTX 4090": (165.0, 1008.0, 24.0), "RTX 3090": (71.0, 936.0, 24.0),
    "V100": (125.0, 900.0, 16.0), "T4": (65.0, 320.0, 16.0), "RTX 3060": (51.0, 360.0, 12.0),
}
MFU = 0.35  # share of the nominal throughput a compute-bound step reaches (an assumption)
STEP_OVERHEAD = 0.025  # seconds of framework overhead per generated token of a 32-layer LLaVA batch (assumption)
IMAGE_LOAD = 0.01  # seconds to decode + resize one photo-sized JPEG on one CPU core (assumption)
# Image counts used for estimates when the data folder is absent (placeholders, shown as "assumed").
ASSUMED_COUNTS = {"p1_val": 100, "p2_train": 10000, "p2_val": 1500, "p3": 5, "cls_train": 2500, "cls_val": 500}
SPLITS = (("p1_val", "p1_data/images/val", "p1_data/val.json"), ("p2_train", "p2_data/images/train", "p2_data/train.json"),
          ("p2_val", "p2_data/images/val", "p2_data/val.json"))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class Check:
    """One line of the preflight table."""

    area: str
    item: str
    status: str
    detail: str


@dataclass
class PreflightResult:
    """All checks of one preflight; `problems` lists what must be fixed before a run."""

    params_file: str
    checks: list[Check] = field(default_factory=list)

    @property
    def problems(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if c.status == PROBLEM]

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.problems

    def add(self, area: str, item: str, status: str, detail: str) -> Check:
        """Append a check and return it."""
        check = Check(area, item, status, detail)
        self.checks.append(check)
        return check

    def table(self) -> str:
        """A fixed-width text table of every check, then the list of problems."""
        w_area = max([4] + [len(c.area) for c in self.checks])
        w_item = max([4] + [min(len(c.item), 34) for c in self.checks])
        w_stat = max(len(s) for s in (OK, PROBLEM, WARNING, INFO, ESTIMATE))
        lines = [f"preflight: {self.params_file}", f"{'area':<{w_area}}  {'item':<{w_item}}  {'status':<{w_stat}}  detail"]
        lines.append("-" * (w_area + w_item + w_stat + 40))
        for c in self.checks:
            lines.append(f"{c.area:<{w_area}}  {c.item[:34]:<{w_item}}  {c.status:<{w_stat}}  {c.detail}")
        if self.problems:
            lines.append(f"\n{len(self.problems)} problem(s):")
            lines += [f"  - {c.area} / {c.item}: {c.detail}" for c in self.problems]
        else:
            lines.append("\nno problems found")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (for report.json)."""
        return {"params_file": self.params_file, "ok": self.ok, "checks": [c.__dict__ for c in self.checks]}


def preflight(params: str | os.PathLike | dict[str, Any], notebooks: list[str] | None = None, pdf: bool = True,
              gpu: str | None = None, check_images: bool = True) -> PreflightResult:
    """Run every check for a params file (or resolved params dict) and the notebooks it will run."""
    from captionlab.params import load_params
    from captionlab.report.runner import ORDER

    name = str(params) if not isinstance(params, dict) else str(params.get("params_file", "(params)"))
    p = load_params(params) if not isinstance(params, dict) else params
    selected = set(notebooks or ORDER)
    res = PreflightResult(name)
    if _demo_unbuilt(p):  # a fresh checkout: the run generates the data and trains the tiny models first
        root = Path(str(p["data_root"]))
        res.add("data", "data_root", OK, f"{root}: demo world not generated yet (the run builds it first, ~10 s)")
        from captionlab.data.world import CLASS_NAMES, DEFAULT_SIZES as n

        counts = {"p1_val": n["p1_val"], "p2_train": n["p2_train"], "p2_val": n["p2_val"], "p3": 5,
                  "cls_train": n["p1_cls_train"] * len(CLASS_NAMES), "cls_val": n["p1_cls_val"] * len(CLASS_NAMES),
                  "assumed": []}  # what the generator will write
    else:
        counts = check_data(res, p, selected, check_images)
    check_models(res, p, selected)
    check_tools(res, pdf)
    check_device(res, p, selected, counts, gpu)
    return res


# ------------------------------------------------------------------------------------------------------ data


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def _opens(path: Path) -> str | None:
    """None if the image file opens and verifies, else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the user's data problem
        return f"{type(exc).__name__}: {exc}"


def check_annotations(json_path: Path, images_dir: Path, check_images: bool = True) -> tuple[list[str], int, int]:
    """Problems of one course annotation file (bad JSON, missing keys, dangling references, images that do not
    exist or open), plus (#images, #captions)."""
    problems: list[str] = []
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{json_path}: not readable JSON ({exc})"], 0, 0
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        return [f"{json_path}: expected {{'images': [...], 'annotations': [...]}}"], 0, 0
    ids: dict[Any, str] = {}
    for i, im in enumerate(data["images"]):
        missing = [k for k in ("file_name", "id") if not isinstance(im, dict) or k not in im]
        if missing:
            problems.append(f"{json_path}: images[{i}] has no {', '.join(repr(k) for k in missing)}")
            continue
        ids[im["id"]] = im["file_name"]
    n_caps = 0
    for i, ann in enumerate(data["annotations"]):
        missing = [k for k in ("image_id", "caption") if not isinstance(ann, dict) or k not in ann]
        if missing:
            problems.append(f"{json_path}: annotations[{i}] has no {', '.join(repr(k) for k in missing)}")
            continue
        if ann["image_id"] not in ids:
            problems.append(f"{json_path}: annotations[{i}] references image_id {ann['image_id']!r}, not in 'images'")
            continue
        n_caps += 1
    for image_id, file_name in ids.items():
        path = images_dir / file_name
        if not path.is_file():
            problems.append(f"{json_path}: image {file_name} (id {image_id}) does not exist in {images_dir}")
        elif check_images:
            why = _opens(path)
            if why:
                problems.append(f"{path}: does not open as an image ({why})")
    return problems, len(ids), n_caps


def _summarise(res: PreflightResult, area: str, item: str, problems: list[str], ok_detail: str, limit: int = 5) -> None:
    for msg in problems[:limit]:
        res.add(area, item, PROBLEM, msg)
    if len(problems) > limit:
        res.add(area, item, PROBLEM, f"... and {len(problems) - limit} more like these")
    if not problems:
        res.add(area, item, OK, ok_detail)


def check_data(res: PreflightResult, p: dict[str, Any], selected: set[str], check_images: bool = True) -> dict[str, Any]:
    """Layout, counts and annotations under data_root; returns the counts (assumed ones when data is missing)."""
    root = Path(str(p.get("data_root") or ""))
    counts: dict[str, Any] = {"assumed": []}
    if not root.is_dir():
        res.add("data", "data_root", PROBLEM, f"{root}: not a directory (expected the course's hw3_data layout)")
        counts.update(ASSUMED_COUNTS)
        counts["assumed"] = sorted(ASSUMED_COUNTS)
        return counts
    res.add("data", "data_root", OK, str(root))
    for key, images, ann in SPLITS:
        folder, json_path = root / images, root / ann
        if not folder.is_dir() or not json_path.is_file():
            what = [str(x) for x in (folder, json_path) if not x.exists()]
            res.add("data", key, PROBLEM, f"missing {', '.join(what)}")
            counts[key] = ASSUMED_COUNTS[key]
            counts["assumed"].append(key)
            continue
        problems, n_images, n_caps = check_annotations(json_path, folder, check_images)
        on_disk = len(_images_in(folder))
        _summarise(res, "data", key, problems, f"{n_images} images ({on_disk} files), {n_caps} captions in {json_path.name}")
        counts[key] = n_images
    p3 = _images_in(root / "p3_data" / "images")
    bad = [f"{f}: does not open ({why})" for f in p3 if (why := _opens(f))] if check_images else []
    if len(p3) != 5:
        bad.insert(0, f"{root / 'p3_data' / 'images'}: expected 5 images, found {len(p3)}")
    _summarise(res, "data", "p3", bad, f"{len(p3)} images: {', '.join(f.stem for f in p3)}")
    counts["p3"] = len(p3)
    if selected & {"05_clip_zero_shot", "06_vit_analysis"}:
        labels = root / "p1_data" / "id2label.json"
        for split in ("val", "train") if "06_vit_analysis" in selected else ("val",):
            files = _images_in(root / "p1_data" / split)
            if not files:
                res.add("data", f"p1 {split} (classes)", PROBLEM, f"{root / 'p1_data' / split}: no <label>_<n>.png images")
            else:
                res.add("data", f"p1 {split} (classes)", OK, f"{len(files)} images")
            counts[f"cls_{split}"] = len(files)
        if not labels.is_file():
            res.add("data", "id2label.json", PROBLEM, f"{labels}: missing")
    return counts


# ---------------------------------------------------------------------------------------------------- models


def _hf_cached(repo_id: str, filenames: tuple[str, ...] = ("config.json",)) -> Path | None:
    """A file of `repo_id` in the local HF hub cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        try:
            hit = try_to_load_from_cache(repo_id, name)
        except Exception:  # noqa: BLE001 - an invalid repo id
            return None
        if isinstance(hit, str):
            return Path(hit)
    return None


def resolve_spec(kind: str, spec: str) -> tuple[str, str]:
    """(status, detail) for one model spec: does it name a local file/dir or an HF-cache entry? (nothing loaded)"""
    spec = str(spec or "")
    if not spec:
        return PROBLEM, "empty spec"
    scheme, _, rest = spec.partition(":")
    if scheme == "timm":
        import timm

        name, _, weights = rest.partition("@")
        if not timm.is_model(name):
            return PROBLEM, f"{spec}: timm has no model {name!r}"
        if weights:
            return (OK, f"local weights {weights}") if Path(weights).is_file() else (PROBLEM, f"{weights}: weights file does not exist")
        cfg = timm.models.get_pretrained_cfg(name)
        hub = getattr(cfg, "hf_hub_id", None) if cfg else None
        files = tuple(f for f in (getattr(cfg, "hf_hub_filename", None), "model.safetensors", "open_clip_model.safetensors",
                                  "open_clip_pytorch_model.bin", "pytorch_model.bin") if f)
        hit = _hf_cached(hub, files) if hub else None
        return (OK, f"HF cache {hit}") if hit else (PROBLEM, f"{spec}: {hub or name} is not in the HF cache "
                                                           f"(download it, or use timm:{name}@<file>)")
    if scheme == "open_clip":
        import open_clip

        arch, _, tag = rest.partition(":")
        if arch not in open_clip.list_models():
            return PROBLEM, f"{spec}: open_clip has no architecture {arch!r}"
        if not tag:
            return WARNING, f"{spec}: no pretrained tag: random weights"
        if Path(tag).expanduser().exists() or "/" in tag:
            return (OK, f"local weights {tag}") if Path(tag).is_file() else (PROBLEM, f"{tag}: weights file does not exist")
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        if not cfg:
            return PROBLEM, f"{spec}: open_clip has no pretrained tag {tag!r} for {arch}"
        hub = (cfg.get("hf_hub") or "").strip("/")
        hit = _hf_cached(hub, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")) if hub else None
        return (OK, f"HF cache {hit}") if hit else (PROBLEM, f"{spec}: {hub or tag} is not in the HF cache")
    if scheme in ("hfclip", "hf"):
        spec = rest
    path = Path(spec).expanduser()
    if path.is_file():
        return OK, f"file {path}"
    if path.is_dir():
        if kind in ("llava", "clip", "encoder", "vit") and not (path / "config.json").is_file():
            return PROBLEM, f"{path}: no config.json"
        return OK, f"directory {path}"
    if spec.startswith(("/", ".", "~")) or spec.count("/") != 1:
        return PROBLEM, f"{spec}: does not exist"
    hit = _hf_cached(spec, ("config.json",))
    return (OK, f"HF cache {hit.parent}") if hit else (PROBLEM, f"{spec}: not in the local HF cache (download it first)")


def _vocab_rows(decoder: str) -> int | None:
    """Rows of the decoder's token embedding, read without loading the whole file into memory."""
    import torch

    path = Path(decoder)
    if path.is_dir():
        path = next((path / n for n in ("model.safetensors", "pytorch_model.bin", "decoder_model.bin")
                     if (path / n).exists()), path)
    if not path.is_file():
        return None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            key = next(k for k in f.keys() if k.endswith("wte.weight"))
            return int(f.get_slice(key).get_shape()[0])
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    key = next((k for k in state if k.endswith("wte.weight")), None)
    return int(state[key].shape[0]) if key else None


def _demo_unbuilt(p: dict[str, Any], spec: str | None = None) -> bool:
    """Demo world: whether its data (or, with `spec`, that model spec's file) is not built yet. The demo world and
    its tiny models are generated on first use, so their absence before the first run is not a problem."""
    if p.get("world") != "demo" or not p.get("data_root"):
        return False
    root = Path(str(p["data_root"])).expanduser()
    if spec is None:
        return not (root / "world.json").is_file()
    from captionlab.errors import ConfigError
    from captionlab.models.specs import parse_spec

    try:
        parsed = parse_spec(spec, allowed=("path", "hfclip", "hf"))
    except ConfigError:  # another kind (timm:, open_clip:, a hub id): not one of the demo world's files
        return False
    path = Path(parsed.name).expanduser()
    return path.is_relative_to(root / "models") and not path.exists()


def check_models(res: PreflightResult, p: dict[str, Any], selected: set[str]) -> None:
    """Every model spec the selected notebooks use, and decoder/tokenizer agreement."""
    needs = {"llava_model": ("llava", {"01_llava_prompts", "04_attention"}),
             "clip_model": ("clip", {"01_llava_prompts", "02_train", "03_evaluate", "05_clip_zero_shot"}),
             "encoder": ("encoder", {"02_train"}), "decoder": ("decoder", {"02_train"}),
             "vit_model": ("vit", {"06_vit_analysis"})}
    for key, (kind, users) in needs.items():
        if not users & selected:
            continue
        if key not in p:
            res.add("models", key, PROBLEM, "not set in the params file")
            continue
        if _demo_unbuilt(p, str(p[key])):
            res.add("models", key, OK, f"{p[key]}: demo model not trained yet (the run trains it first)")
            continue
        status, detail = resolve_spec(kind, p[key])
        res.add("models", key, status, detail)
    if "02_train" in selected and p.get("decoder") and not _demo_unbuilt(p, str(p["decoder"])):
        check_tokenizer(res, str(p["decoder"]), str(p.get("tokenizer") or ""))


def check_tokenizer(res: PreflightResult, decoder: str, tokenizer: str) -> None:
    """Say which tokenizer the captioner will use and whether it agrees with the decoder's vocabulary."""
    from captionlab.models.decoder import load_tokenizer

    rows = None
    try:
        rows = _vocab_rows(decoder)
    except Exception as exc:  # noqa: BLE001
        res.add("tokenizer", "decoder vocabulary", PROBLEM, f"{decoder}: cannot read the token embedding ({exc})")
    weights_dir = Path(decoder) if Path(decoder).is_dir() else Path(decoder).parent
    src = tokenizer or None
    where = (f"{tokenizer} (params `tokenizer`)" if tokenizer else
             f"next to the decoder in {weights_dir}, else the HF-cache gpt2 tokenizer")
    try:
        tok = load_tokenizer(src, weights_dir if not tokenizer else None, rows)
    except ConfigError as exc:
        res.add("tokenizer", "tokenizer", PROBLEM, f"{exc} (looked: {where})")
        return
    res.add("tokenizer", "tokenizer", OK, f"will use {where}: {type(tok).__name__}, {len(tok)} tokens, "
                                          f"eos {tok.eos_token!r} = {tok.eos_token_id}")
    if rows is not None:
        if len(tok) > rows or tok.eos_token_id >= rows:
            res.add("tokenizer", "decoder vs tokenizer", PROBLEM,
                    f"tokenizer has {len(tok)} tokens (eos {tok.eos_token_id}) but the decoder embeds {rows}")
        else:
            res.add("tokenizer", "decoder vs tokenizer", OK, f"decoder vocabulary {rows} = tokenizer {len(tok)}"
                    if rows == len(tok) else f"decoder vocabulary {rows} >= tokenizer {len(tok)}")


# ----------------------------------------------------------------------------------------------------- tools


def check_tools(res: PreflightResult, pdf: bool) -> None:
    """Java (CIDEr's PTB tokenizer, as graded) and Chromium (HTML -> PDF)."""
    from captionlab.report.render import find_chromium

    java = shutil.which("java")
    if java:
        try:
            out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
            version = (out.stderr or out.stdout).splitlines()[0] if (out.stderr or out.stdout) else "?"
            res.add("tools", "java", OK if out.returncode == 0 else PROBLEM, f"{java}: {version}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            res.add("tools", "java", PROBLEM, f"{java} does not run: {exc}")
    else:
        res.add("tools", "java", PROBLEM, "java not found: CIDEr's PTB tokenizer needs it (`make java`)")
    chromium = find_chromium()
    if chromium:
        res.add("tools", "chromium", OK, chromium)
    else:
        res.add("tools", "chromium", PROBLEM if pdf else WARNING,
                "chromium not found: no PDF (`make chromium`, or run with --no-pdf)")


# ------------------------------------------------------------------------------------------ device estimates


@dataclass
class Device:
    """What the estimates are computed for."""

    name: str
    kind: str  # cuda | cpu | reference
    tflops: float
    bandwidth_gbs: float
    total_gb: float
    free_gb: float


def detect_device(gpu: str | None = None) -> Device:
    """The CUDA device (free memory from the driver), a named reference GPU from GPUS, or this CPU (measured)."""
    import torch

    if gpu:
        key = next((k for k in GPUS if k.lower() == gpu.lower()), None)
        if key is None:
            raise ConfigError(f"--gpu {gpu!r}: unknown; known: {', '.join(GPUS)}")
        tf, bw, mem = GPUS[key]
        return Device(f"{key} (reference, not present)", "reference", tf, bw, mem, mem)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        free, total = torch.cuda.mem_get_info(0)
        key = next((k for k in sorted(GPUS, key=len, reverse=True) if k.lower().replace(" ", "") in
                    name.lower().replace(" ", "")), None)
        tf, bw, _ = GPUS.get(key, (50.0, 500.0, 0.0))
        return Device(name + ("" if key else " (throughput unknown: assumed 50 TFLOP/s)"), "cuda", tf, bw,
                      total / 1e9, free / 1e9)
    import time

    import psutil

    a = torch.randn(512, 512)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.3:
        a @ a
        n += 1
    tflops = 2 * 512**3 * n / (time.perf_counter() - t0) / 1e12 / MFU  # so that MFU x nominal = measured
    mem = psutil.virtual_memory()
    return Device(f"CPU ({os.cpu_count()} cores, fp32 matmul measured)", "cpu", tflops, 20.0, mem.total / 1e9,
                  mem.available / 1e9)


def _llava_shapes(spec: str) -> dict[str, float]:
    """Parameter counts of a LLaVA (from its config when local / cached, else llava-1.5-7b's)."""
    shapes = {"lm": 6.74e9, "vision": 0.30e9, "projector": 0.021e9, "layers": 32, "hidden": 4096, "tokens": 576,
              "vocab": 32064}
    path = Path(spec)
    cfg_file = path / "config.json" if path.is_dir() else _hf_cached(spec, ("config.json",))
    if cfg_file and Path(cfg_file).is_file():
        c = json.loads(Path(cfg_file).read_text())
        t, v = c.get("text_config", {}), c.get("vision_config", {})
        h, i, L = t.get("hidden_size", 4096), t.get("intermediate_size", 11008), t.get("num_hidden_layers", 32)
        vocab = t.get("vocab_size", 32064)
        vh, vi, vL = v.get("hidden_size", 1024), v.get("intermediate_size", 4096), v.get("num_hidden_layers", 24)
        shapes.update(lm=L * (4 * h * h + 3 * h * i) + 2 * vocab * h, vision=vL * (4 * vh * vh + 2 * vh * vi),
                      projector=vh * h + h * h, layers=L, hidden=h, vocab=vocab,
                      tokens=(v.get("image_size", 336) // v.get("patch_size", 14)) ** 2)
    return shapes


def estimates(p: dict[str, Any], counts: dict[str, Any], dev: Device) -> dict[str, dict[str, Any]]:
    """Per notebook: estimated peak memory (GB) and run time (s), with the assumptions in a note."""
    gen = p.get("llava_configs") or {"greedy": {"num_beams": 1, "max_new_tokens": 40}}
    prompts = max(1, len(p.get("llava_prompts") or [1]))
    lv = _llava_shapes(str(p.get("llava_model") or ""))
    prompt_tokens = lv["tokens"] + 40
    bf16 = dev.kind != "cpu"
    wbytes = 2 if bf16 else 4
    n_p1 = int(p.get("max_images") or 0) or int(counts.get("p1_val", 0))
    llava_params = lv["lm"] + lv["vision"] + lv["projector"]

    def gen_time(n_images: int, beams: int, new_tokens: int, weight_bytes: float) -> float:
        prefill = 2 * (lv["lm"] - lv["vocab"] * lv["hidden"]) * prompt_tokens + 2 * lv["vision"] * (lv["tokens"] + 1)
        decode_flops = 2 * lv["lm"] * beams * new_tokens
        compute = n_images * (prefill + decode_flops) / (dev.tflops * 1e12 * MFU)
        batches = max(1, -(-n_images // 8))
        memory_bound = batches * new_tokens * weight_bytes / (dev.bandwidth_gbs * 1e9)
        overhead = batches * new_tokens * STEP_OVERHEAD * lv["layers"] / 32 + n_images * IMAGE_LOAD
        return compute + memory_bound + overhead

    def kv_gb(batch: int, beams: int, new_tokens: int) -> float:
        return 2 * lv["layers"] * lv["hidden"] * wbytes * batch * beams * (prompt_tokens + new_tokens) / 1e9

    out: dict[str, dict[str, Any]] = {}
    llava_spec = str(p.get("llava_model") or "")
    llava_missing = llava_spec.startswith(("/", ".", "~")) and not Path(llava_spec).exists()
    t01 = sum(gen_time(n_p1, int(c.get("num_beams", 1)), int(c.get("max_new_tokens", 40)), llava_params * wbytes)
              for c in gen.values()) * prompts
    max_beams = max(int(c.get("num_beams", 1)) for c in gen.values())
    max_new = max(int(c.get("max_new_tokens", 40)) for c in gen.values())
    weights_gb = llava_params * wbytes / 1e9
    out["01_llava_prompts"] = {"memory_gb": weights_gb + kv_gb(8, max_beams, max_new) + 1.0, "seconds": t01,
                               "note": f"LLaVA {llava_params / 1e9:.2f} B params {'bf16' if bf16 else 'fp32'}, "
                                       f"{n_p1} images x {prompts} prompts x {len(gen)} configs, batch 8"}
    q4_gb = (lv["lm"] - 2 * lv["vocab"] * lv["hidden"]) * 0.56 / 1e9 + (2 * lv["vocab"] * lv["hidden"] + lv["vision"]) * 2 / 1e9
    out["01_llava_prompts (4-bit)"] = {"memory_gb": q4_gb + kv_gb(8, max_beams, max_new) + 1.0,
                                       "seconds": t01 * 1.3, "note": "load_in_4bit (nf4 weights, bf16 compute)"}
    if llava_missing:  # a local LLaVA that is not there (already a problem): no size to estimate from
        del out["01_llava_prompts"], out["01_llava_prompts (4-bit)"]
    # 02: ViT-L features once (cached), GPT-2 trained on [visual prefix + caption] tokens.
    n_train, n_val = int(counts.get("p2_train", 0)), int(counts.get("p2_val", 0))
    epochs, batch = int(p.get("epochs") or 1), int(p.get("batch_size") or 32)
    enc_params, dec_params, dec_layers, dec_h, dec_heads = 0.304e9, 0.124e9, 12, 768, 12
    seq = 257 + 32 if p.get("conditioning", "prefix") == "prefix" else 32
    enc_flops = 2 * enc_params * 257 * (n_train + n_val)
    train_flops = 6 * dec_params * seq * n_train * epochs
    beams, new_tokens = int(p.get("beam_size") or 3), int(p.get("max_new_tokens") or 30)
    eval_flops = 2 * dec_params * (seq + beams * new_tokens) * min(n_val, 100) * epochs
    act = dec_layers * seq * batch * dec_h * (34 + 5 * dec_heads * seq / dec_h) / 1e9  # Megatron-style, 16-bit
    logits = batch * 32 * 50257 * 4 * 3 / 1e9
    out["02_train"] = {"memory_gb": (enc_params + dec_params) * 4 / 1e9 + act + logits + 1.0,
                       "seconds": (enc_flops + train_flops + eval_flops) / (dev.tflops * 1e12 * MFU)
                       + (n_train + n_val) * IMAGE_LOAD + min(n_val, 100) * epochs * new_tokens * STEP_OVERHEAD / 8,
                       "note": f"ViT-L/14 + GPT-2 small, batch {batch}, {seq} tokens, {n_train} train images x {epochs} "
                               f"epochs, features cached once"}
    decodings = 2
    out["03_evaluate"] = {"memory_gb": (enc_params + dec_params) * 4 / 1e9 + 1.5,
                          "seconds": decodings * (2 * enc_params * 257 + 2 * dec_params * (seq + beams * new_tokens))
                          * n_val / (dev.tflops * 1e12 * MFU), "note": f"{n_val} val images x {decodings} decodings"}
    n_p3 = int(counts.get("p3", 5))
    out["04_attention"] = {} if llava_missing else {"memory_gb": weights_gb + kv_gb(4, 1, 40) + 2.0,  # eager attention weights materialised
                           "seconds": gen_time(n_p3, 1, 40, llava_params * wbytes) * 1.5,
                           "note": f"LLaVA eager attention on {n_p3} p3 images + captioner maps"}
    n_cls = int(counts.get("cls_val", 0))
    out["05_clip_zero_shot"] = {"memory_gb": 0.151e9 * wbytes / 1e9 + 0.5,
                                "seconds": 2 * 0.088e9 * 50 * n_cls / (dev.tflops * 1e12 * MFU),
                                "note": f"CLIP ViT-B/32 on {n_cls} images"}
    vit_batch, vit_epochs = 32, int(p.get("vit_epochs") or 1)
    n_cls_train = int(counts.get("cls_train", 0))
    vit_act = 12 * 197 * vit_batch * 768 * (34 + 5 * 12 * 197 / 768) / 1e9
    out["06_vit_analysis"] = {"memory_gb": 0.086e9 * 16 / 1e9 + vit_act + 0.5,
                              "seconds": 6 * 0.086e9 * 197 * (n_cls_train + n_cls) * vit_epochs / (dev.tflops * 1e12 * MFU),
                              "note": f"ViT-B/16 fine-tune, batch {vit_batch}, {n_cls_train} images x {vit_epochs} epochs"}
    return out


def check_device(res: PreflightResult, p: dict[str, Any], selected: set[str], counts: dict[str, Any],
                 gpu: str | None = None) -> None:
    """Device, free memory against each notebook's estimated peak, estimated run time per notebook."""
    dev = detect_device(gpu)
    res.add("device", "device", INFO if dev.kind != "cpu" else WARNING,
            f"{dev.name}: {dev.free_gb:.1f} of {dev.total_gb:.1f} GB free, nominal {dev.tflops:.3g} TFLOP/s"
            + ("" if dev.kind != "cpu" else " — no CUDA GPU: the real route runs on CPU very slowly"))
    if counts.get("assumed"):
        res.add("device", "image counts", WARNING, f"estimates use assumed counts for {', '.join(counts['assumed'])} "
                                                    f"({', '.join(f'{k}={ASSUMED_COUNTS[k]}' for k in counts['assumed'])})")
    for name, est in estimates(p, counts, dev).items():
        if not est:
            continue
        if name.split(" ")[0] not in selected or (name.endswith("(4-bit)") and dev.kind == "cpu"):
            continue
        fits = est["memory_gb"] <= dev.free_gb
        status = ESTIMATE if fits or name.endswith("(4-bit)") else PROBLEM
        res.add("estimate", name, status, f"~{est['memory_gb']:.1f} GB peak (estimate; {dev.free_gb:.1f} GB free"
                f"{'' if fits else ': does NOT fit'}), ~{_duration(est['seconds'])} (estimate) — {est['note']}")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
