"""The rehearsal world: the course's data layout and the real checkpoints' shapes and formats."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import pytest
import regex
import torch
import yaml
from PIL import Image

from captionlab.data import load_captions
from captionlab.data import rehearsal as R
from captionlab.params import load_params
from captionlab.utils import REPO_ROOT

RAW = lambda name: yaml.safe_load((REPO_ROOT / "params" / name).read_text())  # noqa: E731


@pytest.fixture(scope="module")
def params(rehearsal_world):
    return load_params("params/rehearsal.yaml")


def test_params_differ_from_the_course_route_only_in_data_models_and_sizes():
    real, reh = RAW("dlcv2024.yaml"), RAW("rehearsal.yaml")
    allowed = {"title", "world", "data_root", "clip_model", "encoder", "decoder", "tokenizer", "llava_model",
               "vit_model", "max_images", "epochs", "batch_size", "max_new_tokens", "zeroshot_batch_size",
               "vit_epochs", "vit_batch_size", "attention_images", "llava_configs",
               "peft_attempts", "conditioning_attempts"}  # counts: the number of extra trainings
    assert set(real) == set(reh)
    changed = {k for k in reh if reh.get(k) != real.get(k)}
    assert changed <= allowed, changed - allowed
    assert reh["world"] == "rehearsal" and reh["peft_attempts"] == [] and reh["conditioning_attempts"] == []
    assert real["llava_configs"].keys() == reh["llava_configs"].keys()
    for name, cfg in real["llava_configs"].items():  # generation settings: only the length is a size
        assert {k: v for k, v in cfg.items() if k != "max_new_tokens"} == \
               {k: v for k, v in reh["llava_configs"][name].items() if k != "max_new_tokens"}
    for key in changed - {"title", "world", "llava_configs", "peft_attempts", "conditioning_attempts"}:
        assert isinstance(reh[key], str) or real[key] == 0 or reh[key] <= real[key], key  # sizes shrink (0 = all)


def test_hw3_data_layout_and_photo_sizes(rehearsal_world, params):
    data = Path(params["data_root"])
    assert data == rehearsal_world / "hw3_data"
    for split, json_name in (("p1_data/images/val", "p1_data/val.json"), ("p2_data/images/train", "p2_data/train.json"),
                             ("p2_data/images/val", "p2_data/val.json")):
        caps = load_captions(data / json_name)
        files = sorted(p.name for p in (data / split).iterdir())
        assert files == sorted(caps.file_names.values())
        assert all(re.fullmatch(r"\d{12}\.jpg", f) for f in files)
        assert all(len(c) == 5 for c in caps.captions.values())
        sizes = {Image.open(data / split / f).size for f in files}
        assert {(640, 480), (480, 640), (500, 375)} <= sizes
    assert sorted(p.stem for p in (data / "p3_data" / "images").iterdir()) == list(R.P3_NAMES)
    raw = json.loads((data / "p2_data" / "train.json").read_text())
    assert set(raw) == {"images", "annotations"} and set(raw["annotations"][0]) == {"caption", "id", "image_id"}
    assert json.loads((data / "p1_data" / "id2label.json").read_text())["0"] == R.CLASSES[0]
    assert len(list((data / "p1_data" / "val").glob("*_*.png"))) == len(R.CLASSES) * R.SIZES["cls_val_per_class"]


# ------------------------------------------------------------------ the course's tokenizer (reference BPE)


class CourseBPE:
    """The GPT-2 byte-level BPE as the course's tokenizer implements it (encoder.json + vocab.bpe), for reference."""

    PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, folder: Path) -> None:
        self.encoder = json.loads((folder / "encoder.json").read_text())
        self.decoder = {v: k for k, v in self.encoder.items()}
        lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
        self.byte_enc = R.bytes_to_unicode()
        self.byte_dec = {v: k for k, v in self.byte_enc.items()}

    @lru_cache(maxsize=None)  # noqa: B019 - test helper
    def bpe(self, word: str) -> tuple[str, ...]:
        parts = tuple(word)
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = tuple(merged)
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.PAT.findall(text):
            word = "".join(self.byte_enc[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(word)]
        return ids

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(self.byte_dec[c] for c in text).decode("utf-8", errors="replace")


def test_gpt2_tokenizer_stand_in_matches_the_course_decoder(rehearsal_world, params):
    from captionlab.models.decoder import load_tokenizer

    folder = Path(params["tokenizer"])
    course = CourseBPE(folder)
    assert len(course.encoder) == R.GPT2_VOCAB and course.encoder[R.EOT] == 50256 and len(course.ranks) == 50000
    ours = load_tokenizer(str(folder))
    assert len(ours) == R.GPT2_VOCAB and ours.eos_token_id == 50256 and ours.pad_token_id == 50256
    texts = ["A man riding a bicycle on a street.", "Two dogs, 3 cats and   a giraffe!", "naïve café — 😀 ok's"]
    for text in texts:
        assert ours(text)["input_ids"] == course.encode(text), text
        assert ours.decode(course.encode(text)) == text
    ids = torch.Generator().manual_seed(0)
    sample = torch.randint(0, 50256, (300,), generator=ids).tolist()
    assert ours.decode(sample) == course.decode(sample)


def test_decoder_model_bin_is_gpt2_small_in_conv1d_layout(rehearsal_world, params):
    from captionlab.models.decoder import load_decoder

    state = torch.load(params["decoder"], map_location="cpu", weights_only=True)
    assert state["h.0.attn.c_attn.weight"].shape == (768, 2304)  # Conv1D: (in, out)
    assert state["wte.weight"].shape == (50257, 768) and not any(k.startswith("transformer.") for k in state)
    model, tok = load_decoder(params["decoder"], tokenizer=params["tokenizer"])
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (12, 768, 12)
    assert tok.eos_token_id == 50256
    with pytest.raises(Exception, match="does not exist|no encoder.json"):
        load_decoder(params["decoder"], tokenizer=str(rehearsal_world / "no-such-dir"))


def test_llava_directory_has_llava_1_5_7b_config_and_processor(rehearsal_world, params):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoProcessor

    d = Path(params["llava_model"])
    cfg = AutoConfig.from_pretrained(d)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_attention_heads, t.vocab_size, t.intermediate_size) == (4096, 32, 32064, 11008)
    assert t.num_hidden_layers == R.LLAVA_TEXT_LAYERS and v.num_hidden_layers == R.LLAVA_VISION_LAYERS
    assert (v.image_size, v.patch_size, v.hidden_size) == (336, 14, 1024)
    assert cfg.vision_feature_layer == -2 and cfg.image_token_id == 32000 and cfg.image_seq_length == 576
    shard = next(d.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() in ("F16", "float16")
    proc = AutoProcessor.from_pretrained(d)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                    add_generation_prompt=True)
    assert text == "USER: <image>\nHi ASSISTANT:"
    proc.num_additional_image_tokens = proc.num_additional_image_tokens or 1
    image = Image.open(next((Path(params["data_root"]) / "p3_data" / "images").iterdir()))
    inputs = proc(images=[image], text=[text], return_tensors="pt")
    assert int((inputs["input_ids"] == 32000).sum()) == 576 and inputs["pixel_values"].shape == (1, 3, 336, 336)


def test_encoder_clip_and_vit_load_from_their_files(rehearsal_world, params):
    from captionlab.models.clip import load_clip
    from captionlab.models.encoder import load_encoder
    from captionlab.models.vit import load_vit

    enc = load_encoder(params["encoder"])
    assert enc.grid == (16, 16) and enc.num_tokens == 257 and enc.dim == 1024
    from safetensors.torch import load_file

    file_state = load_file(params["encoder"].split("@", 1)[1])
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(enc.tower.state_dict()[key], file_state[key].float())  # the file's weights, not random ones
    clip = load_clip(params["clip_model"])
    assert clip.embed_dim == 512 and type(clip.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    vit = load_vit(params["vit_model"], num_classes=5)
    vit_state = load_file(params["vit_model"].split("@", 1)[1])
    assert torch.equal(vit.backbone.state_dict()["blocks.0.attn.qkv.weight"], vit_state["blocks.0.attn.qkv.weight"])
