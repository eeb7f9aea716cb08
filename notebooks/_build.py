"""Generate the report notebooks (the source of truth): `python notebooks/_build.py` rewrites notebooks/*.ipynb.

Notebooks are committed without outputs. Each has a tagged `parameters` cell whose defaults equal
params/demo.yaml (so `papermill notebooks/02_train.ipynb out.ipynb -p rank 8` runs on the demo world), a setup
cell calling `captionlab.report.start(...)`, narrative markdown mirroring the course report questions, short
cells calling the library, and markdown placeholders for your own analysis. Edit this file, not the .ipynb.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

COMMON_PARAMS = '''\
# Parameters (defaults = the demo world on CPU, as in params/demo.yaml). The report runner injects a params
# file's values after this cell; by hand: `papermill notebooks/{name}.ipynb out.ipynb -p NAME VALUE`.
params_file = ""   # the params file these values came from (recorded with the results)
run_dir = ""       # report folder; this notebook writes into run_dir/{name}/ (empty: reports/adhoc)
world = "demo"     # "demo": generated data + tiny models (built on first use) | e.g. "dlcv2024": data at data_root
seed = 0
quick = False      # small sizes: a fast smoke test of the whole notebook
data_root = "{{cache}}/demo/seed{{seed}}"
'''

YOUR_NOTES = "> **Your analysis.** _Replace this with what you observe: {what}_"


def md(text: str) -> nbformat.NotebookNode:
    """A markdown cell (dedented)."""
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str) -> nbformat.NotebookNode:
    """A code cell (dedented)."""
    return new_code_cell(textwrap.dedent(text).strip())


def parameters(name: str, extra: str) -> nbformat.NotebookNode:
    """The tagged parameters cell: the common parameters plus the notebook's own."""
    cell = code(COMMON_PARAMS.format(name=name) + textwrap.dedent(extra))
    cell.metadata["tags"] = ["parameters"]
    return cell


def parameter_names(cell: nbformat.NotebookNode) -> list[str]:
    """Names assigned at the top level of a parameters cell."""
    return re.findall(r"^([A-Za-z_]\w*)\s*=", cell.source, flags=re.MULTILINE)


def setup(name: str, params_cell: nbformat.NotebookNode, models: list[str], imports: str = "") -> nbformat.NotebookNode:
    """The setup cell: resolve parameters, prepare the world and models, seed; `ctx` describes the run."""
    args = [f"{n}={n}" for n in parameter_names(params_cell)]
    lines, line = [], f'ctx = report.start("{name}", models={json.dumps(models)},'
    for a in args:
        if len(line) + len(a) + 2 > 112:
            lines.append(line)
            line = " " * 19 + a + ","
        else:
            line += " " + a + ","
    lines.append(line.rstrip(",") + ")")
    head = "from captionlab import report\n" + (textwrap.dedent(imports).strip() + "\n" if imports else "")
    return code(head + "\n" + "\n".join(lines) + "\nctx")


def notebook(name: str, title: str, intro: str, params: str, models: list[str], body: list, imports: str = "") -> nbformat.NotebookNode:
    """Assemble one notebook: title + intro, parameters, setup, body."""
    p = parameters(name, params)
    nb = new_notebook(cells=[md(f"# {title}\n\n" + textwrap.dedent(intro).strip()), p,
                             setup(name, p, models, imports), *body])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["captionlab"] = {"generated_by": "notebooks/_build.py"}
    for i, cell in enumerate(nb.cells):
        cell.id = f"{name[:2]}-{i:02d}"  # stable ids: regenerating gives identical files
    return nb


WORLD_NOTE = ("The numbers in this notebook come from the world named in the setup cell's output (demo: "
              "generated shapes data and tiny models trained on it on CPU; they show the method works, not "
              "how well it does on the course data).")

# ---------------------------------------------------------------------------------------------------------
NOTEBOOKS: dict[str, nbformat.NotebookNode] = {}

NOTEBOOKS["00_demo_world"] = notebook(
    "00_demo_world", "00 · The data",
    f"""
    What the rest of the report runs on: split sizes, sample images with their reference captions (and masks,
    where the world has them), caption statistics, and the five images used for attention analysis. With
    `world: demo` this is the generated shapes world (course layout, built on first use); with your course
    params (`params/dlcv2024.yaml`) the same cells describe `hw3_data`.

    {WORLD_NOTE}
    """,
    """
    n_samples = 8      # images in the sample grid
    """,
    [],
    [
        md("## Splits"),
        code("""
        splits = report.show_table(dataset.overview(ctx.data_root), ctx.path("splits.csv"))
        """),
        md("## Samples: image, first reference caption, object mask"),
        code("""
        name, annotations, images_dir, masks_dir, objects = dataset.caption_splits(ctx.data_root)[0]
        fig = dataset.sample_figure(annotations, images_dir, masks_dir, n=4 if ctx.quick else n_samples, seed=ctx.seed)
        report.show(fig, ctx.path("samples.png"));
        """),
        md("## Caption (and object) statistics"),
        code("""
        report.show(dataset.stats_figure(annotations, objects), ctx.path("stats.png"));
        """),
        md("## The five attention images (p3)"),
        code("""
        p3 = list_images(ctx.data_root / "p3_data" / "images")
        report.show(report.image_grid([load_image(p) for p in p3], [p.stem for p in p3], ncols=5), ctx.path("p3.png"));
        """),
        code("""
        ctx.headline({row["split"]: int(row["images"]) for _, row in splits.iterrows()}, title="00 · The data",
                     notes="images per split")
        """),
        md(YOUR_NOTES.format(what="how varied are the captions, how many objects per image, what could be hard.")),
    ],
    imports="""
    from captionlab.data import list_images, load_image
    from captionlab.report import dataset
    """,
)

NOTEBOOKS["01_llava_prompts"] = notebook(
    "01_llava_prompts", "01 · Zero-shot captioning with LLaVA: prompts and decoding",
    f"""
    **Course question (P1).** Caption the validation images zero-shot with LLaVA. Compare at least two
    instructions (prompts) and decoding strategies, and report CIDEr and CLIPScore for each; discuss which
    prompt works best and why.

    Every prompt × generation config below is run on the same images and scored by `captionlab.metrics`
    (CIDEr as the course computes it, CLIPScore with the `clip_model`). {WORLD_NOTE}
    """,
    """
    llava_model = "{data_root}/models/llava"
    clip_model = "{data_root}/models/clip"
    llava_prompts = [
        "Write a one-sentence caption for this image.",
        "Describe the image.",
        "What objects are in the image and where are they?",
    ]
    llava_configs = {
        "greedy": {"num_beams": 1, "do_sample": False, "max_new_tokens": 24},
        "beam3": {"num_beams": 3, "do_sample": False, "max_new_tokens": 24},
    }
    max_images = 0     # 0: every validation image
    llava_batch_size = 8
    """,
    ["llava", "clip"],
    [
        code("""
        captioner = load_llava(ctx["llava_model"])
        images_dir, annotations = ctx.data_root / "p1_data" / "images" / "val", ctx.data_root / "p1_data" / "val.json"
        """),
        md("## Prompt × decoding table (sorted by CIDEr)"),
        code("""
        configs = dict(list(llava_configs.items())[:1]) if ctx.quick else llava_configs
        limit = 12 if ctx.quick else (max_images or None)
        table = run_prompt_study(captioner, images_dir, annotations, llava_prompts, configs, ctx.path("prompt_study"),
                                 clip=ctx["clip_model"], limit=limit, batch_size=llava_batch_size)
        table["setting"] = table["prompt_idx"].astype(str) + "/" + table["config"]
        report.show_table(table, ctx.path("prompt_table.csv"))
        report.show(report.bar_chart(table, "setting", ["CIDEr", "CLIPScore"]), ctx.path("prompt_table.png"));
        """),
        md("## The best setting: sample captions"),
        code("""
        best = table.iloc[0]
        preds = load_predictions(ctx.path("prompt_study", f"{best.prompt_idx}_{best.config}.json"))
        save_predictions(ctx.path("predictions.json"), preds)
        refs = load_captions(annotations)
        stems = sorted(preds)[:8]
        images = [load_image(refs.image_path(images_dir, s)) for s in stems]
        report.show(report.image_grid(images, [preds[s] for s in stems]), ctx.path("best_samples.png"));
        """),
        code("""
        ctx.headline({"CIDEr": best.CIDEr, "CLIPScore": best.CLIPScore}, title="01 · LLaVA prompts",
                     notes=f"best: prompt {best.prompt_idx} ({best.prompt!r}), {best.config}")
        """),
        md(YOUR_NOTES.format(what="which prompt and decoding work best, typical failure cases, caption length "
                                  "vs. CIDEr.")),
    ],
    imports="""
    from captionlab.data import load_captions, load_image, load_predictions, save_predictions
    from captionlab.models.llava import load_llava, run_prompt_study
    """,
)

NOTEBOOKS["02_train"] = notebook(
    "02_train", "02 · PEFT captioner: training",
    f"""
    **Course question (P2).** Train an image captioner from a frozen vision encoder and a frozen GPT-2 decoder
    with parameter-efficient fine-tuning (LoRA; also adapters / prefix tuning), within the trainable-parameter
    budget. Report your best setting with its CIDEr and CLIPScore on the validation set, and a table of your
    PEFT attempts.

    This notebook trains the setting given by its parameters (the sweep `params/sweeps/lora_rank.yaml` reruns
    it per LoRA rank) plus the other PEFT methods listed in `peft_attempts` and the other ways of conditioning
    the decoder on the image listed in `conditioning_attempts` (`prefix`: visual tokens in front of the caption
    in GPT-2's self-attention; `cross`: gated cross-attention layers, Flamingo-style), with the same data and
    schedule.
    {WORLD_NOTE}
    """,
    """
    encoder = "hfclip:{data_root}/models/clip"
    decoder = "{data_root}/models/gpt2/decoder_model.bin"
    clip_model = "{data_root}/models/clip"
    peft = "lora"      # lora | adapter | prefix | none
    conditioning = "prefix"   # prefix | cross (gated cross-attention layers)
    cross_every = 1    # cross: a cross-attention layer in front of every k-th GPT-2 block
    cross_dim = 0      # cross: inner width of those layers (0: the decoder's width)
    rank = 4
    lora_alpha = 16
    epochs = 2
    batch_size = 64
    lr = 0.001
    trainable_budget = 10000000
    beam_size = 3
    max_new_tokens = 24
    peft_attempts = ["adapter", "prefix"]   # other PEFT methods trained for the comparison table
    conditioning_attempts = ["cross"]       # other conditionings (with `peft`) trained for the table
    """,
    ["clip", "gpt2"],
    [
        md("""
        ## Training
        `train_setting` trains one PEFT method (projector + PEFT weights only; the encoder features are cached)
        and keeps the checkpoint with the best validation CIDEr; `caption_split` captions the validation set.
        """),
        code("""
        val_dir = ctx.data_root / "p2_data" / "images" / "val"
        val = dataset.subset(load_captions(ctx.data_root / "p2_data" / "val.json"), 32 if ctx.quick else 0)

        def train_setting(method: str, name: str, conditioning: str = conditioning) -> tuple[dict, Path]:
            cap = CaptionerConfig(encoder=ctx["encoder"], decoder=ctx["decoder"], peft=method, lora_rank=rank,
                                  lora_alpha=lora_alpha, trainable_budget=trainable_budget, conditioning=conditioning,
                                  cross_every=cross_every, cross_dim=cross_dim)
            cfg = TrainConfig(epochs=1 if ctx.quick else epochs, batch_size=batch_size, lr=lr, seed=ctx.seed,
                              train_images=256 if ctx.quick else 0, eval_images=32 if ctx.quick else 100,
                              out_dir=str(ctx.path(name)))
            history = train(cap, cfg, ctx.data_root)
            return history, Path(history["best"]["dir"])

        def caption_split(model) -> dict[str, str]:
            images = [val.image_path(val_dir, s) for s in val.stems]
            return dict(zip(val.stems, model.generate(images, beam_size=beam_size, max_new_tokens=max_new_tokens)))
        """),
        code("""
        history, checkpoint = train_setting(peft, "checkpoint")
        steps = pd.DataFrame(history["steps"])
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(steps["step"], steps["loss"])
        ax.set(xlabel="step", ylabel="loss", title=f"{peft} training loss")
        report.show(fig, ctx.path("loss.png"));
        """),
        md("## Validation: CIDEr and CLIPScore (beam search)"),
        code("""
        model = load_captioner(checkpoint)
        preds = caption_split(model)
        save_predictions(ctx.path("predictions.json"), preds)
        result = evaluate(preds, val, val_dir, clip=ctx["clip_model"], metrics=("CIDEr", "CLIPScore"))
        ctx.save_json("metrics.json", {"metrics": result.summary, "trainable": model.report, "checkpoint": str(checkpoint)})
        report.show_table(result.per_image[["stem", "caption", "cider", "clipscore"]].head(8));
        """),
        md("## PEFT attempts"),
        code("""
        def attempt_row(method: str, cond: str, m, summary: dict) -> dict:
            return {"peft": method, "conditioning": cond, "rank": str(rank) if method == "lora" else "-",
                    "trainable_params": m.report["trainable"], "CIDEr": summary["CIDEr"],
                    "CLIPScore": summary["CLIPScore"]}

        rows = [attempt_row(peft, conditioning, model, result.summary)]
        attempts_to_run = [(m, conditioning) for m in peft_attempts if m != peft]
        attempts_to_run += [(peft, c) for c in conditioning_attempts if c != conditioning]
        for method, cond in attempts_to_run:
            _, ckpt = train_setting(method, f"attempt_{method}_{cond}", cond)
            m = load_captioner(ckpt)
            r = evaluate(caption_split(m), val, val_dir, clip=ctx["clip_model"], metrics=("CIDEr", "CLIPScore"))
            rows.append(attempt_row(method, cond, m, r.summary))
        attempts = report.show_table(rows, ctx.path("peft_attempts.csv"))
        """),
        code("""
        ctx.headline({"CIDEr": result.summary["CIDEr"], "CLIPScore": result.summary["CLIPScore"],
                      "trainable_params": model.report["trainable"]}, title="02 · PEFT captioner",
                     notes=f"{peft} rank {rank}, {conditioning} conditioning, {len(history['epochs'])} epoch(s), "
                           f"{len(val)} val images")
        """),
        md(YOUR_NOTES.format(what="your best setting and why; how rank / method / conditioning trade trainable "
                                  "parameters against CIDEr and CLIPScore.")),
    ],
    imports="""
    from pathlib import Path

    import matplotlib.pyplot as plt
    import pandas as pd

    from captionlab.data import load_captions, save_predictions
    from captionlab.metrics.evaluate import evaluate
    from captionlab.models.captioner import CaptionerConfig, load_captioner
    from captionlab.report import dataset
    from captionlab.train import TrainConfig, train
    """,
)

NOTEBOOKS["03_evaluate"] = notebook(
    "03_evaluate", "03 · Evaluation: CIDEr, CLIPScore, best and worst captions",
    f"""
    **Course question.** Evaluate the captioner of 02 (and LLaVA's best predictions from 01) on the validation
    set with CIDEr and CLIPScore; compare decoding (greedy vs. beam search); find the **top-1 and last-1
    image–caption pairs by CLIPScore** (used again for attention in 04). {WORLD_NOTE}
    """,
    """
    checkpoint = "{run_dir}/02_train/checkpoint/best"   # a captioner checkpoint directory (from 02_train)
    clip_model = "{data_root}/models/clip"
    decodings = {"greedy": {"method": "greedy"}, "beam3": {"method": "beam", "beam_size": 3}}
    metrics = ["CIDEr", "CLIPScore", "RefCLIPScore"]
    max_new_tokens = 24
    """,
    ["clip", "gpt2"],
    [
        code("""
        model = load_captioner(ctx["checkpoint"])
        val_dir = ctx.data_root / "p2_data" / "images" / "val"
        val = dataset.subset(load_captions(ctx.data_root / "p2_data" / "val.json"), 32 if ctx.quick else 0)
        images = [val.image_path(val_dir, s) for s in val.stems]
        """),
        md("## Systems and decoding strategies"),
        code("""
        rows, results = [], {}
        for name, kw in decodings.items():
            preds = dict(zip(val.stems, model.generate(images, max_new_tokens=max_new_tokens, **kw)))
            save_predictions(ctx.path(f"predictions_{name}.json"), preds)
            results[name] = evaluate(preds, val, val_dir, clip=ctx["clip_model"], metrics=metrics)
            results[name].save(ctx.out, prefix=f"eval_{name}")
            rows.append({"system": f"captioner · {name}", "split": "p2 val", "images": len(preds),
                         **{m: results[name].summary.get(m) for m in metrics}})
        llava = ctx.section("01_llava_prompts") / "predictions.json"
        if llava.exists():  # LLaVA's best setting from 01, on the p1 split it was run on
            p1, llava_preds = ctx.data_root / "p1_data", load_predictions(llava)
            refs = dataset.subset(load_captions(p1 / "val.json"), llava_preds)
            r = evaluate(llava_preds, refs, p1 / "images" / "val", clip=ctx["clip_model"], metrics=metrics)
            rows.append({"system": "LLaVA · best prompt", "split": "p1 val", "images": len(llava_preds),
                         **{m: r.summary.get(m) for m in metrics}})
        table = report.show_table(rows, ctx.path("systems.csv"))
        """),
        md("## Top-1 and last-1 CLIPScore pairs"),
        code("""
        best = max(results, key=lambda n: results[n].summary["CIDEr"])
        pairs = top_last_pairs(results[best].per_image, k=1, score="clipscore")[["which", "stem", "clipscore", "caption"]]
        report.show_table(pairs, ctx.path("clipscore_pairs.csv"))
        pics = [load_image(val.image_path(val_dir, s)) for s in pairs["stem"]]
        titles = [f"{w}: {c} (CLIPScore {v:.3f})" for w, c, v in zip(pairs["which"], pairs["caption"], pairs["clipscore"])]
        report.show(report.image_grid(pics, titles, ncols=2, size=3), ctx.path("top_last.png"));
        """),
        code("""
        ctx.headline({m: results[best].summary.get(m) for m in ("CIDEr", "CLIPScore")}, title="03 · Evaluation",
                     notes=f"captioner, {best} decoding, {len(val)} val images")
        """),
        md(YOUR_NOTES.format(what="greedy vs. beam, captioner vs. LLaVA, what distinguishes the top-1 and "
                                  "last-1 pairs.")),
    ],
    imports="""
    from captionlab.attention.figures import top_last_pairs
    from captionlab.data import load_captions, load_image, load_predictions, save_predictions
    from captionlab.metrics.evaluate import evaluate
    from captionlab.models.captioner import load_captioner
    from captionlab.report import dataset
    """,
)

NOTEBOOKS["04_attention"] = notebook(
    "04_attention", "04 · Attention: which image regions each word looks at",
    f"""
    **Course questions (P3).** (1) For each of the five test images, show LLaVA's attention between every
    generated word and the image patches: a series of maps, one per word. (2) For the captioner of 02, show the
    same for the **top-1 and last-1 CLIPScore** pairs found in 03, and discuss whether attention explains the
    caption quality.

    Interactive: `attention_browser(results[0])` (from `captionlab.attention.widgets`) adds layer / head /
    word controls in Jupyter. Widgets render blank in HTML/PDF, so every series here is a saved PNG.
    {WORLD_NOTE}
    """,
    """
    llava_model = "{data_root}/models/llava"
    llava_prompt = "Write a one-sentence caption for this image."
    checkpoint = "{run_dir}/02_train/checkpoint/best"
    attention_layer = -1   # decoder layer whose attention is shown
    attention_heads = "mean"   # mean | max | a head index
    """,
    ["llava", "clip", "gpt2"],
    [
        md("## Five attention series: LLaVA on the p3 images"),
        code("""
        llava = load_llava(ctx["llava_model"])
        p3_dir = ctx.data_root / "p3_data" / "images"
        p3 = list_images(p3_dir)
        results = capture_llava(llava, p3, llava_prompt, layer=attention_layer, heads=attention_heads)
        for res in results:
            report.show(attention_series(res), ctx.path("llava", f"{res.name}.png"))
        """),
        md("Where the world has object masks (the demo world), score whether each colour/shape word attends to "
           "the object it names (pointing game, attention mass inside the mask, vs. a random point)."),
        code("""
        objects_json = p3_dir.parent / "objects.json"
        pointing = None
        if objects_json.exists():
            _, objects, masks = load_annotated(p3_dir, p3_dir.parent / "masks", objects_json)
            pointing = summarize(word_table(results, objects, masks))
            report.show_table(pointing, ctx.path("llava_pointing.csv"))
        """),
        md("## The captioner on the top-1 and last-1 CLIPScore pairs (from 03)"),
        code("""
        captioner = load_captioner(ctx["checkpoint"])
        pairs = pd.read_csv(ctx.section("03_evaluate") / "clipscore_pairs.csv")
        val_dir = ctx.data_root / "p2_data" / "images" / "val"
        val = load_captions(ctx.data_root / "p2_data" / "val.json")
        pair_results = capture_captioner(captioner, [val.image_path(val_dir, s) for s in pairs["stem"]], layer=attention_layer,
                                         heads=attention_heads)
        for (which, score), res in zip(zip(pairs["which"], pairs["clipscore"]), pair_results):
            report.show(attention_series(res, title=f'{which}-1 CLIPScore {score:.3f}: "{res.caption}"'), ctx.path(f"captioner_{which}.png"))
        """),
        md("## Which captioner layer localises? Pointing game per layer (demo world: object masks known)\n"
           "For every caption word that names one object (a colour or shape word), is the attention peak inside "
           "that object's mask, and what share of attention mass falls inside it? `random_point` is the baseline "
           "(the mask's share of the image)."),
        code("""
        layers_table = None
        val_objects = ctx.data_root / "p2_data" / "objects_val.json"
        if val_objects.exists():
            images, objects, masks = load_annotated(val_dir, ctx.data_root / "p2_data" / "masks" / "val", val_objects,
                                                    limit=40 if ctx.quick else 200)
            layers_table = layer_report(captioner, images, objects, masks, layers="all", heads=attention_heads)
            report.show_table(layers_table, ctx.path("captioner_layers.csv"))
            report.show(report.bar_chart(layers_table, "layer", ["pointing_pixel", "random_point"]), ctx.path("captioner_layers.png"))
        """),
        md("## Browse interactively\nIn JupyterLab the browser below has a word slider and layer / head selectors "
           "(widgets render blank in HTML/PDF, so its frames are also saved as PNG files)."),
        code("""
        browser_cache = cache_for(captioner, pair_results[0].image, layers=None)
        frames = save_frames(pair_results[0], ctx.path("frames"))
        attention_browser(browser_cache)
        """),
        code("""
        headline = {"series": len(results) + len(pair_results)}
        if layers_table is not None:
            best = layers_table.sort_values("pointing_pixel", ascending=False).iloc[0]
            headline.update({"captioner_best_layer": int(best["layer"]),
                             "captioner_pointing": float(best["pointing_pixel"]),
                             "captioner_random_point": float(best["random_point"])})
        if pointing is not None:
            headline.update({"llava_p3_pointing_gain": float(pointing["pointing_gain"].iloc[0]),
                             "llava_p3_mass_gain": float(pointing["mass_gain"].iloc[0])})
        ctx.headline(headline, title="04 · Attention", notes=f"layer {attention_layer}, heads {attention_heads}")
        """),
        md(YOUR_NOTES.format(what="do words attend to the objects they name? how do the top-1 and last-1 pairs "
                                  "differ?")),
    ],
    imports="""
    import pandas as pd

    from captionlab.attention import capture_captioner, capture_llava
    from captionlab.attention.faithfulness import layer_report, load_annotated, summarize, word_table
    from captionlab.attention.figures import attention_series
    from captionlab.attention.widgets import attention_browser, cache_for, save_frames
    from captionlab.data import list_images, load_captions
    from captionlab.models.captioner import load_captioner
    from captionlab.models.llava import load_llava
    """,
)

NOTEBOOKS["05_clip_zero_shot"] = notebook(
    "05_clip_zero_shot", "05 · CLIP zero-shot classification: prompt templates",
    f"""
    **Course question.** Classify the validation images zero-shot with CLIP by comparing each image with a text
    prompt per class. Compare the prompt templates *"This is a photo of {{object}}"*, *"This is not a photo of
    {{object}}"* and *"No {{object}}, no score."* (and an ensemble), report their accuracy, and show the top-5
    class probabilities for a few images. {WORLD_NOTE}
    """,
    """
    clip_model = "{data_root}/models/clip"
    zeroshot_templates = [
        "This is a photo of {object}",
        "This is not a photo of {object}",
        "No {object}, no score.",
        "a photo of a {object}.",
    ]
    zeroshot_batch_size = 64
    n_examples = 3     # images with a top-5 probability plot
    """,
    ["clip"],
    [
        code("""
        clip = load_clip(ctx["clip_model"])
        val_dir, id2label_json = ctx.data_root / "p1_data" / "val", ctx.data_root / "p1_data" / "id2label.json"
        id2label = zeroshot.load_id2label(id2label_json)
        clip
        """),
        md("## Accuracy per prompt template"),
        code("""
        templates = [*zeroshot_templates, zeroshot.ENSEMBLE]
        result = zeroshot.run_zero_shot(clip, val_dir, id2label_json, templates, batch_size=zeroshot_batch_size)
        best = result.best_template()
        zeroshot.write_predictions_csv(ctx.path("pred.csv"), list(result.predictions["filename"]), list(result.predictions[best]))
        report.show_table(result.table, ctx.path("zeroshot_table.csv"));
        """),
        md("## Top-5 probabilities"),
        code("""
        class_names = [id2label[i] for i in range(len(id2label))]
        for path in zeroshot.list_image_files(val_dir)[:: max(1, len(result.predictions) // n_examples)][:n_examples]:
            fig = zeroshot.top5_barplot(clip, zeroshot.open_image(path), class_names, title=path.name)
            report.show(fig, ctx.path(f"top5_{path.stem}.png"))
        """),
        code("""
        acc = dict(zip(result.table["template"], result.table["accuracy"]))
        ctx.headline({"best accuracy": acc[best], "'This is a photo of'": acc.get(zeroshot.template_name(zeroshot_templates[0]))},
                     title="05 · CLIP zero-shot", notes=f"best template: {best}")
        """),
        md(YOUR_NOTES.format(what="why the negated and nonsense templates still work (or do not), what the "
                                  "ensemble adds.")),
    ],
    imports="""
    from captionlab.models import zeroshot
    from captionlab.models.clip import load_clip
    """,
)

NOTEBOOKS["06_vit_analysis"] = notebook(
    "06_vit_analysis", "06 · ViT analysis: position embeddings and [CLS] attention",
    f"""
    **Course questions.** Fine-tune a ViT classifier on the classification data and report its accuracy;
    visualise the cosine similarity between the learned position embeddings (one map per patch, as in the ViT
    paper) and the last layer's **[CLS] attention** over the patches for a few images. {WORLD_NOTE}
    """,
    """
    vit_model = "hfclip:{data_root}/models/clip"
    vit_epochs = 2
    vit_lr = 0.0003
    vit_batch_size = 32
    attention_images = 4
    """,
    ["clip"],
    [
        code("""
        p1 = ctx.data_root / "p1_data"
        id2label = load_id2label(p1 / "id2label.json")
        model = vit.load_vit(ctx["vit_model"], num_classes=len(id2label))
        """),
        md("## Fine-tuning"),
        code("""
        train_dir, val_dir = p1 / "train", p1 / "val"
        if ctx.quick:  # a few images per class
            train_dir = dataset.class_folder_subset(train_dir, ctx.path("quick", "train"), per_class=8)
            val_dir = dataset.class_folder_subset(val_dir, ctx.path("quick", "val"), per_class=4)
        history = vit.finetune_classifier(model, train_dir, val_dir, id2label, epochs=1 if ctx.quick else vit_epochs,
                                          lr=vit_lr, batch_size=vit_batch_size, seed=ctx.seed)
        report.show_table(history, ctx.path("finetune_history.csv"));
        """),
        md("## Position-embedding similarity"),
        code("""
        sim = vit.position_embedding_similarity(model)
        report.show(vit.plot_position_similarity(sim), ctx.path("position_similarity.png"));
        """),
        md("## [CLS] attention (last layer, mean over heads)"),
        code("""
        files = list_images(p1 / "val", check=False)
        files = files[:: max(1, len(files) // attention_images)][:attention_images]
        images = [load_image(f) for f in files]
        maps = vit.cls_attention(model, vit.pixel_values_for(model, images), layer=-1)
        titles = [id2label[label_from_filename(f.name)] for f in files]
        report.show(vit.plot_cls_attention(images, maps, titles=titles), ctx.path("cls_attention.png"));
        """),
        code("""
        ctx.headline({"val accuracy": history[-1]["val_acc"]}, title="06 · ViT analysis",
                     notes=f"{ctx['vit_model'].split('/')[-1]}, {len(history)} epoch(s)")
        """),
        md(YOUR_NOTES.format(what="what structure the position embeddings learned, where [CLS] attends.")),
    ],
    imports="""
    from captionlab.data import list_images, load_image
    from captionlab.models import vit
    from captionlab.models.zeroshot import label_from_filename, load_id2label
    from captionlab.report import dataset
    """,
)


def main(argv: list[str]) -> int:
    """Write every notebook (or only those named on the command line)."""
    names = argv or list(NOTEBOOKS)
    for name in names:
        path = HERE / f"{name}.ipynb"
        nbformat.validate(NOTEBOOKS[name])
        text = nbformat.writes(NOTEBOOKS[name]) + "\n"
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
