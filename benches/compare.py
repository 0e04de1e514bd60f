#!/usr/bin/env python3
"""deltadoc against its peers, side by side on one machine, on one set of random weights.

One run measures, at each prompt length, interleaved so that drift on a shared machine hits every
engine alike:
  deltadoc          fp32 / int8 / int4 model folders (`deltadoc bench`)
  deltadoc+ORT ops  the same fp32 graph with ONNX Runtime's built-in DeltaNet operators
  llama.cpp         F16 / Q8_0 / Q4_K_M GGUF of the same weights (`llama-bench`)
  transformers      fp32 on CPU, the reference implementation
then prints prefill and decode tokens/s, the ratios the long-context issue asks for, and every
figure as a fraction of this machine's measured ceilings, and prepends the tables, the machine,
the versions and the exact commands to benches/RESULTS.md.

Everything built or downloaded lives in --work (default $XDG_CACHE_HOME/deltadoc-bench), never in
the repository: llama.cpp is compiled from the source vendored in the PyPI sdist of
llama-cpp-python, the GGUF files come from llama.cpp's own converter run unmodified on the
Hugging Face checkpoint that `deltadoc model synth --hf-out` writes beside the deltadoc folder.

Needs: cargo, cmake (Debian: apt-get install cmake), Python with torch, transformers, numpy and
safetensors (the venv of onnx/make_goldens.py). Typical run, about 40 minutes at 512 and 4K:
    python3 benches/compare.py --lengths 512,4096
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON = "0.3.36"
# Random prompt ids are drawn below this bound: ordinary tokens of the Qwen3.5 vocabulary.
ORDINARY_TOKENS = 248_000

# Precision classes: which builds of each engine are compared with each other.
CLASSES = {
    "fp32": {"deltadoc": "fp32", "llama": "F16", "transformers": "fp32"},
    "int8": {"deltadoc": "int8", "llama": "Q8_0"},
    "int4": {"deltadoc": "int4", "llama": "Q4_K_M"},
    # int4 in blocks of 128 instead of 32: fewer scales per weight, coarser rounding.
    "int4-128": {"deltadoc": "int4-128", "llama": "Q4_K_M"},
}
# What benches/compare.py and benches/pipeline.py run of llama.cpp.
LLAMA_TARGETS = ("llama-bench", "llama-quantize", "llama-server")
ENGINES = ("deltadoc", "ort-ops", "llama", "transformers")

COMMANDS: list[str] = []
# Measurements that failed (an engine out of memory at 32K, say): the run goes on and reports them.
FAILURES: list[str] = []


def home_as_tilde(text: str) -> str:
    return text.replace(str(Path.home()), "~")


def last_json(out: str | None) -> dict:
    """The JSON object a measuring command prints last; {} when it failed."""
    return {} if out is None else json.loads(out.strip().splitlines()[-1])


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def announce(cmd: list) -> str:
    """Records `cmd` for the results and logs it; returns it as a shell would read it."""
    text = " ".join(shlex.quote(str(c)) for c in cmd)
    COMMANDS.append(text)
    log(f"$ {text}")
    return text


def run(cmd: list, capture: bool = False, env: dict | None = None, cwd: Path | None = None, may_fail: bool = False) -> str | None:
    """Runs `cmd`, recording it for the results; on failure, names the command and its output and
    stops, or with `may_fail` records the failure and returns None (an hour-long grid should not be
    lost to one engine that cannot run one point)."""
    text = announce(cmd)
    started = time.time()
    p = subprocess.run(
        [str(c) for c in cmd],
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
        text=True,
        env=env,
        cwd=cwd,
    )
    log(f"  ({time.time() - started:.0f} s, exit {p.returncode})")
    if p.returncode != 0:
        tail = (p.stderr or "")[-4000:] if capture else "(output above)"
        if may_fail:
            last = (tail.strip().splitlines() or ["no output"])[-1]
            FAILURES.append(f"`{home_as_tilde(text)}`: exit {p.returncode} ({last.strip()})")
            log(f"  failed; going on without this measurement\n{tail}")
            return None
        sys.exit(f"compare.py: command failed with exit {p.returncode}: {text}\n{tail}")
    return p.stdout if capture else ""


def done_marker(path: Path) -> Path:
    return path.parent / f".{path.name}.done"


def step(path: Path, what: str, make, key: str = "") -> Path:
    """Builds `path` once: a marker written after success makes an interrupted step start over.
    With a `key` (what the result depends on, such as the graph-building sources and the flags), a
    marker written under another key makes the step run again."""
    marker = done_marker(path)
    if marker.exists() and (not key or marker.read_text().split("\n")[0] == key):
        return path
    log(f"setup: {what}")
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    make()
    marker.write_text(f"{key}\n{datetime.datetime.now().isoformat()}")
    return path


# ---------------------------------------------------------------------------------------- setup


def build_deltadoc() -> tuple[Path, str]:
    """The release binary and the revision it was built from (the tree may change during a run)."""
    run(["cargo", "build", "--release", "--locked"], cwd=REPO)
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return REPO / "target" / "release" / "deltadoc", rev


def graph_source_key() -> str:
    """What deltadoc's model folders depend on: the graph-building sources (src/model, src/onnx)
    as committed, plus a hash of their uncommitted changes. Results and unrelated code may change
    without forcing the folders (and the GGUFs made from the same checkpoint) to be rebuilt."""
    paths = ["src/model", "src/onnx"]

    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout

    trees = git("rev-parse", *[f"HEAD:{p}" for p in paths]).split()
    diff = git("diff", "HEAD", "--", *paths)
    local = f" +{hashlib.sha256(diff.encode()).hexdigest()[:12]}" if diff else ""
    return "graph " + " ".join(t[:12] for t in trees) + local


def make_models(dd: Path, work: Path, seed: int, kv_cache: str, names: list[str] | None = None) -> dict:
    """deltadoc folders of one set of random weights, all with the KV cache type `kv_cache` (the
    fp32 folder and the checkpoint, and the imports among `names`, all by default); made again
    when the sources that write them change ([`graph_source_key`])."""
    sources = graph_source_key()
    hf = work / "hf-0.8b"
    fp32 = work / f"deltadoc-fp32-{kv_cache}"
    cache = ["--kv-cache", kv_cache]

    def synth():
        if hf.exists():
            shutil.rmtree(hf)
        run([dd, "model", "synth", "--shape", "0.8b", "--seed", seed, "--text-only", *cache, "--out", fp32, "--hf-out", hf])
        # llama.cpp's converter and transformers read the tokenizer from the checkpoint folder.
        shutil.copy(fp32 / "tokenizer.json", hf / "tokenizer.json")
        (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))

    step(fp32, "random 0.8B-shape weights (deltadoc fp32 + Hugging Face checkpoint)", synth, f"{sources} seed={seed} {kv_cache}")
    models = {"fp32": fp32, "hf": hf}
    # The other folders go through `model import` from the checkpoint, the path users take.
    for name, flags in (
        ("ort-ops", ["--linear-attn", "builtin"]),
        ("int8", ["--precision", "int8"]),
        ("int4", ["--precision", "int4"]),
        ("int4-128", ["--precision", "int4", "--block-size", "128"]),
    ):
        if names is not None and name not in names:
            continue
        out = work / f"deltadoc-{name}-{kv_cache}"
        key = " ".join([sources, *flags, *cache])
        step(out, f"deltadoc {name} folder", lambda out=out, flags=flags: run([dd, "model", "import", hf, "--out", out, *flags, *cache]), key)
        models[name] = out
    return models


# cpuinfo flag -> ggml's CMake option for it, for the explicit builds of `llama_arch_options`.
GGML_FEATURES = {
    "sse4_2": "SSE42",
    "f16c": "F16C",
    "fma": "FMA",
    "bmi2": "BMI2",
    "avx": "AVX",
    "avx2": "AVX2",
    "avx_vnni": "AVX_VNNI",
    "avx512bw": "AVX512",
    "avx512vbmi": "AVX512_VBMI",
    "avx512_vnni": "AVX512_VNNI",
    "avx512_bf16": "AVX512_BF16",
}


def llama_arch_options() -> list[str]:
    """CMake options for llama.cpp's CPU backend: every instruction set this CPU has. Where it has
    AMX, every one but AMX, named one by one instead of -march=native: llama.cpp's AMX matmul
    crashed (SIGSEGV in ggml_backend_amx_mul_mat, llama-cpp-python 0.3.36) on every prompt of more
    than one token on a 2-vCPU Xeon with AMX, so without this no prefill or decode at a depth could
    be measured there. deltadoc uses no AMX either."""
    flags = next((l.split(":", 1)[1].split() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), [])
    if "amx_int8" not in flags and "amx_tile" not in flags:
        return ["-DGGML_NATIVE=ON"]
    chosen = [f"-DGGML_{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in GGML_FEATURES.items()]
    return ["-DGGML_NATIVE=OFF", *chosen, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def build_llama(work: Path) -> tuple[Path, str]:
    """Compiles llama-bench, llama-quantize and llama-server (for benches/pipeline.py) from the
    llama-cpp-python sdist (CPU backend)."""
    src = work / "llama.cpp"
    if shutil.which("cmake") is None:
        sys.exit("compare.py: cmake is needed to build llama.cpp (Debian: apt-get install cmake)")
    arch = llama_arch_options()

    def fetch_and_build():
        sdist = work / "sdist"
        archive = sdist / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
        if not archive.exists():
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", sdist])
        run(["tar", "xzf", archive, "-C", sdist])
        shutil.copytree(sdist / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp", src, symlinks=True)
        run(
            ["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", *arch, "-DBUILD_SHARED_LIBS=OFF"]
            + [f"-DLLAMA_{o}=OFF" for o in ("BUILD_TESTS", "BUILD_APP", "BUILD_UI", "USE_PREBUILT_UI", "OPENSSL")],
            cwd=src,
        )
        log("compiling llama.cpp (about 12-25 minutes on 2 cores)")
        run(["cmake", "--build", "build", f"-j{os.cpu_count() or 2}", "--target", *LLAMA_TARGETS], cwd=src)

    step(src, f"llama.cpp from llama-cpp-python {LLAMA_CPP_PYTHON}", fetch_and_build, key=" ".join([*arch, *LLAMA_TARGETS]))
    changelog = (work / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "CHANGELOG.md").read_text(errors="replace")
    m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", changelog)
    return src, (m.group(1) if m else "unknown")


def make_ggufs(src: Path, hf: Path, work: Path) -> dict:
    bin_dir = src / "build" / "bin"
    f16 = work / "qwen35-0.8b-F16.gguf"
    step(
        f16,
        "GGUF F16 (llama.cpp's converter)",
        lambda: run([sys.executable, src / "convert_hf_to_gguf.py", hf, "--outfile", f16, "--outtype", "f16", "--no-mtp"]),
    )
    out = {"F16": f16}
    for q in ("Q8_0", "Q4_K_M"):
        path = work / f"qwen35-0.8b-{q}.gguf"
        step(path, f"GGUF {q}", lambda path=path, q=q: run([bin_dir / "llama-quantize", f16, path, q, "2"], capture=True))
        out[q] = path
    return out


# ------------------------------------------------------------------------------------ measuring


def from_disk(path: Path) -> None:
    """Drops `path` (a file, or every file of a folder) from the page cache, so that each engine
    reads its weights as after a reboot. Both map their weights from the file, and how the cache
    holds a file decides the pages they get: the same int4 folder decoded 34 tok/s as cached by
    an earlier session and 46 tok/s freshly written (held in 2 MB folios, mapped as huge pages)."""
    for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def weight_stream(r: dict) -> float | None:
    """GB/s at which deltadoc's QuantMatMul read its weights inside its calls over the decode steps
    of one `deltadoc bench` report (its decode_ops): the weight stream without the rest of a step."""
    for t in r.get("decode_ops", []):
        if t["op"] == "QuantMatMul" and t["seconds"] > 0:
            return t["weight_bytes"] / t["seconds"] / 1e9
    return None


def deltadoc_bench(dd: Path, model: Path, prompt: int, gen: int, threads: int) -> dict:
    from_disk(model)
    cmd = [dd, "bench", "--model", model, "--prompt-tokens", prompt, "--gen-tokens", gen, "--threads", threads, "--json"]
    return last_json(run(cmd, capture=True, may_fail=True))


def llama_bench(src: Path, gguf: Path, prompt: int, gen: int, depth: int, threads: int) -> float | None:
    from_disk(gguf)
    cmd = [src / "build" / "bin" / "llama-bench", "-m", gguf, "-p", prompt, "-n", gen, "-d", depth, "-t", threads, "-r", "1", "-o", "json"]
    # llama-bench's warm-up repeats the whole test; beyond 4K that doubles an hour-long run.
    if prompt + depth > 4096:
        cmd.append("--no-warmup")
    out = run(cmd, capture=True, may_fail=True)
    return None if out is None else float(json.loads(out)[0]["avg_ts"])


def transformers_bench(hf: Path, lengths: list, depths: list, gen: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "_transformers", "--hf", hf, "--threads", threads, "--gen", gen]
    cmd += ["--lengths", ",".join(map(str, lengths)), "--depths", ",".join(map(str, depths))]
    return last_json(run(cmd, capture=True, may_fail=True))


def transformers_main(args) -> None:
    """Runs in its own process: times transformers' Qwen3.5 on CPU and prints one JSON object."""
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(0, ORDINARY_TOKENS, (1, n), generator=gen)

    def decode(cache, last, steps):
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            r = model(last, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t)
            cache, last = r.past_key_values, r.logits[:, -1:].argmax(-1)
        # The first steps grow the cache's buffers; the mean of the rest is the steady rate.
        return len(times[2:]) / sum(times[2:])

    out = {"prefill": {}, "decode": {}, "torch": torch.__version__, "transformers": transformers.__version__}
    with torch.inference_mode():
        model(ids(64), use_cache=True, logits_to_keep=1)
        for n in sorted(set(args.lengths) | {d for d in args.depths if d > 0}):
            t = time.perf_counter()
            r = model(ids(n), use_cache=True, logits_to_keep=1)
            if n in args.lengths:
                out["prefill"][str(n)] = n / (time.perf_counter() - t)
            if n in args.depths:
                out["decode"][str(n)] = decode(r.past_key_values, r.logits[:, -1:].argmax(-1), args.gen)
        if 0 in args.depths:
            r = model(ids(16), use_cache=True, logits_to_keep=1)
            out["decode"]["0"] = decode(r.past_key_values, r.logits[:, -1:].argmax(-1), args.gen)
    print(json.dumps(out))


def machine_ceilings(threads: int) -> dict:
    """Peak fp32 GEMM rate and read bandwidth, measured now: the best of 3 runs of each of two
    libraries. One library alone understates a machine: on an AMD EPYC (Zen 4) torch's 4096³ GEMM
    reached 136–171 GFLOP/s where numpy's OpenBLAS reached 198, and torch.mv read 16–20 GB/s where a
    plain torch sum read 35, so engines showed at 120–170 % of the "ceiling"."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads))
    import numpy as np
    import torch

    torch.set_num_threads(threads)

    def best(f) -> float:
        f()
        fastest = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            f()
            fastest = min(fastest, time.perf_counter() - t)
        return fastest

    a = np.random.rand(4096, 4096).astype(np.float32)
    b = np.random.rand(4096, 4096).astype(np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    gemm = {"numpy (OpenBLAS)": 2 * 4096**3 / best(lambda: a @ b), "torch": 2 * 4096**3 / best(lambda: torch.mm(ta, tb))}
    # Read bandwidth over 1 GiB of f32: decode's own access pattern (a matrix-vector product) and
    # a plain sum of the same bytes; which is faster depends on the library and the CPU.
    w = np.random.rand(32768, 8192).astype(np.float32)
    x = np.random.rand(8192).astype(np.float32)
    tw, tx = torch.from_numpy(w), torch.from_numpy(x)
    read = {
        "numpy mv": w.nbytes / best(lambda: w @ x),
        "torch.mv": w.nbytes / best(lambda: torch.mv(tw, tx)),
        "torch sum": w.nbytes / best(lambda: tw.sum()),
    }
    g, r = max(gemm, key=gemm.get), max(read, key=read.get)
    return {"gemm_flops": gemm[g], "gemm_by": g, "read_bytes_per_s": read[r], "read_by": r, "probes": {**gemm, **read}}


# ---------------------------------------------------------------------------------------- model


class Shape:
    """FLOPs and bytes per token of the checkpoint, for the ceilings."""

    def __init__(self, hf: Path):
        c = json.loads((hf / "config.json").read_text())
        self.c = c
        index = json.loads((hf / "model.safetensors.index.json").read_text())
        params = 0
        for shard in sorted(set(index["weight_map"].values())):
            with open(hf / shard, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            for name, t in header.items():
                if name == "__metadata__":
                    continue
                n = 1
                for d in t["shape"]:
                    n *= d
                params += n
        self.params = params
        self.embedding = c["vocab_size"] * c["hidden_size"]
        types = c["layer_types"]
        self.linear_layers = sum(t == "linear_attention" for t in types)
        self.attn_layers = sum(t == "full_attention" for t in types)
        # The recurrent state; the conv state is a few KB and does not move the ceiling.
        self.state_bytes = self.linear_layers * c["linear_num_value_heads"] * c["linear_key_head_dim"] * c["linear_value_head_dim"] * 4
        self.kv_bytes_per_token = self.attn_layers * 2 * c["num_key_value_heads"] * c["head_dim"] * 2

    def prefill_flops_per_token(self, n: int) -> float:
        """Matrix products (the LM head once per prompt), recurrence and causal attention, averaged
        over a prompt of n tokens."""
        c = self.c
        matmul = 2 * (self.params - self.embedding)
        rule = self.linear_layers * c["linear_num_value_heads"] * 4 * c["linear_key_head_dim"] * c["linear_value_head_dim"] * 2
        attention = self.attn_layers * c["num_attention_heads"] * c["head_dim"] * 4 * n / 2
        return matmul + rule + attention

    def decode_bytes_per_token(self, weight_bytes: int, depth: int) -> float:
        return weight_bytes + 2 * self.state_bytes + depth * self.kv_bytes_per_token


def weight_bytes(path: Path, shape: "Shape") -> int:
    """Bytes of weights one decode step reads."""
    if path.is_file():
        return path.stat().st_size
    files = [f for f in path.iterdir() if f.name.startswith("model.onnx") or f.suffix == ".safetensors"]
    total = sum(f.stat().st_size for f in files)
    manifest = path / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text())["precision"] in ("int8", "int4"):
        # A quantised deltadoc folder keeps the embedding as an f16 table for the token lookup
        # beside its quantised LM head; a decode step reads one row of it, not the table.
        total -= shape.embedding * 2
    return total


# --------------------------------------------------------------------------------------- report


def fmt(x, digits=1):
    return "–" if x is None else f"{x:.{digits}f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def speed_table(rows: dict, kind: str, points: list, heading: str, ceiling) -> list:
    """One row per engine build: tokens/s at each point, with the fraction of `ceiling(key, point)`."""
    lines = [heading, "", "| engine | weights | " + " | ".join(map(str, points)) + " |", "|---|---|" + "---:|" * len(points)]
    for key, row in rows.items():
        cells = []
        for x in points:
            v = row[kind].get(x)
            cells.append("–" if v is None else f"{v:.{1 if v >= 10 else 2}f} ({v / ceiling(key, x):.0%})")
        lines.append(f"| {row['engine']} | {row['weights']} | " + " | ".join(cells) + " |")
    return lines


def report(rows: dict, lengths: list, depths: list, ceil: dict, shape: Shape, wbytes: dict) -> str:

    def compute_ceiling(_key, n):
        return ceil["gemm_flops"] / shape.prefill_flops_per_token(n)

    def bandwidth_ceiling(key, d):
        return ceil["read_bytes_per_s"] / shape.decode_bytes_per_token(wbytes[key], d)

    lines = []
    if lengths:
        lines += speed_table(rows, "prefill", lengths, "### Prefill tokens/s at a prompt length (fraction of the compute ceiling)", compute_ceiling)
        lines.append("| compute ceiling | – | " + " | ".join(f"{compute_ceiling(None, n):.1f}" for n in lengths) + " |")
    if depths:
        lines += ([""] if lines else []) + speed_table(
            rows, "decode", depths, "### Decode tokens/s at a context depth (fraction of the bandwidth ceiling)", bandwidth_ceiling
        )

        # The int classes' weight stream inside the matmul calls, apart from the rest of a step.
        streams = {k: row for k, row in rows.items() if row.get("stream")}
        if streams:
            lines += [""] + speed_table(
                streams,
                "stream",
                depths,
                "### deltadoc's weights read inside its QuantMatMul calls while decoding, GB/s (fraction of the read ceiling)",
                lambda _key, _d: ceil["read_bytes_per_s"] / 1e9,
            )

    def get(key, kind, n):
        return rows.get(key, {}).get(kind, {}).get(n)

    lines += ["", "### Ratios (target in brackets)", ""]
    columns = [f"prefill {n}" for n in lengths] + [f"decode @{d}" for d in depths]
    lines.append("| comparison | " + " | ".join(columns) + " |")
    lines.append("|---|" + "---:|" * len(columns))
    pairs = [
        ("deltadoc fp32 / same graph on ORT's DeltaNet ops [prefill ≥ 1.25]", "deltadoc-fp32", "ort-ops-fp32"),
        ("deltadoc fp32 / transformers fp32 [prefill ≥ 1.2]", "deltadoc-fp32", "transformers-fp32"),
        ("deltadoc fp32 / llama.cpp F16", "deltadoc-fp32", "llama-F16"),
        ("deltadoc int8 / llama.cpp Q8_0 [decode ≥ 1.5]", "deltadoc-int8", "llama-Q8_0"),
        ("deltadoc int4 / llama.cpp Q4_K_M [prefill ≥ 1.5, decode ≥ 1.5]", "deltadoc-int4", "llama-Q4_K_M"),
        ("deltadoc int8 / llama.cpp Q4_K_M [prefill ≥ 1.5]", "deltadoc-int8", "llama-Q4_K_M"),
        ("deltadoc int4, blocks of 128 / llama.cpp Q4_K_M", "deltadoc-int4-128", "llama-Q4_K_M"),
    ]
    for label, a, b in pairs:
        if a not in rows or b not in rows:
            continue
        cells = [fmt(ratio(get(a, "prefill", n), get(b, "prefill", n)), 2) for n in lengths]
        cells += [fmt(ratio(get(a, "decode", d), get(b, "decode", d)), 2) for d in depths]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if len(lengths) > 1:
        lo, hi = lengths[0], lengths[-1]
        lines += ["", f"### Prefill kept at {hi} tokens, relative to {lo} (target for deltadoc at 32K: ≥ 0.85)", ""]
        for key, row in rows.items():
            r = ratio(row["prefill"].get(hi), row["prefill"].get(lo))
            if r is not None:
                lines.append(f"- {row['engine']} {row['weights']}: {r:.2f}")
    return "\n".join(lines)


def machine_line(threads: int) -> str:
    """The CPU, its instruction sets of note, the memory and the threads the engines were given."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((l.split(":", 1)[1].strip() for l in cpuinfo if l.startswith("model name")), platform.processor())
    flags = next((l for l in cpuinfo if l.startswith("flags")), "")
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    mem = int(next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))) * 1024
    return f"{cpu}, {os.cpu_count()} logical CPUs ({', '.join(simd)}), {mem / 2**30:.0f} GiB; {threads} threads everywhere."


def write_results(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    head, sep, rest = text.partition("\n## ")
    path.write_text(head.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n" + (sep + rest if sep else ""))


# ----------------------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_transformers":
        p = argparse.ArgumentParser()
        p.add_argument("_cmd")
        p.add_argument("--hf", type=Path, required=True)
        p.add_argument("--threads", type=int, required=True)
        p.add_argument("--gen", type=int, required=True)
        p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",") if x], required=True)
        p.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",") if x], required=True)
        return transformers_main(p.parse_args())

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    p.add_argument("--work", type=Path, default=cache / "deltadoc-bench", help="models and the llama.cpp build")
    p.add_argument("--lengths", default="512,4096,32768", help="prompt lengths, comma-separated")
    p.add_argument("--depths", default="0,4096", help="context depths of the decode measurement")
    p.add_argument("--gen", type=int, default=32, help="decode steps per measurement")
    p.add_argument("--reps", type=int, default=2, help="rounds of the whole grid; the best round counts")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default=",".join(ENGINES), help=f"subset of {','.join(ENGINES)}")
    p.add_argument("--classes", default=",".join(CLASSES), help=f"subset of {','.join(CLASSES)}")
    p.add_argument("--transformers-max", type=int, default=32768, help="longest prompt given to transformers")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument(
        "--kv-cache",
        choices=("f16", "bf16", "f32"),
        default="f16",
        help="deltadoc's KV cache (f16 is its default; bf16 computes attention in bf16 on CPUs with AVX512_BF16)",
    )
    p.add_argument("--results", type=Path, default=REPO / "benches" / "RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print the tables only")
    args = p.parse_args()

    lengths = [int(x) for x in args.lengths.split(",") if x]
    depths = [int(x) for x in args.depths.split(",") if x]
    engines = [e for e in args.engines.split(",") if e]
    classes = [c for c in args.classes.split(",") if c]
    for e in engines:
        if e not in ENGINES:
            sys.exit(f"compare.py: unknown engine {e!r} (known: {', '.join(ENGINES)})")
    for c in classes:
        if c not in CLASSES:
            sys.exit(f"compare.py: unknown precision class {c!r} (known: {', '.join(CLASSES)})")
    args.work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now()

    dd, rev = build_deltadoc()
    models = make_models(dd, args.work, args.seed, args.kv_cache)
    shape = Shape(models["hf"])
    llama_src, llama_commit, ggufs = None, None, {}
    if "llama" in engines:
        llama_src, llama_commit = build_llama(args.work)
        ggufs = make_ggufs(llama_src, models["hf"], args.work)

    # Rows of the tables: key -> engine, weights, how to measure.
    rows, wbytes = {}, {}
    for c in classes:
        if "deltadoc" in engines:
            block = json.loads((models[c] / "manifest.json").read_text()).get("quant_block")
            weights = f"{c.split('-')[0]}, blocks of {block}" if block else c
            rows[f"deltadoc-{c}"] = {"engine": "deltadoc", "weights": weights, "prefill": {}, "decode": {}}
            wbytes[f"deltadoc-{c}"] = weight_bytes(models[c], shape)
        if "ort-ops" in engines and c == "fp32":
            rows["ort-ops-fp32"] = {"engine": "deltadoc graph, ORT DeltaNet ops", "weights": c, "prefill": {}, "decode": {}}
            wbytes["ort-ops-fp32"] = weight_bytes(models["ort-ops"], shape)
        if "llama" in engines:
            q = CLASSES[c]["llama"]
            rows[f"llama-{q}"] = {"engine": "llama.cpp", "weights": q, "prefill": {}, "decode": {}}
            wbytes[f"llama-{q}"] = weight_bytes(ggufs[q], shape)
        if "transformers" in engines and "transformers" in CLASSES[c]:
            rows["transformers-fp32"] = {"engine": "transformers", "weights": "fp32", "prefill": {}, "decode": {}}
            wbytes["transformers-fp32"] = weight_bytes(models["hf"], shape)

    # The setup just wrote gigabytes of model files; their write-back would run during the first
    # measurements (a 512-token prefill measured 35 % slow right after the imports once).
    os.sync()
    log("measuring this machine's ceilings")
    ceil = machine_ceilings(args.threads)
    log(f"  GEMM {ceil['gemm_flops'] / 1e9:.1f} GFLOP/s ({ceil['gemm_by']}), read {ceil['read_bytes_per_s'] / 1e9:.1f} GB/s ({ceil['read_by']})")

    def dd_model(key):
        return models["ort-ops"] if key == "ort-ops-fp32" else models[key.split("-", 1)[1]]

    # Rounds of the whole grid, each engine build in turn within a round, so that a slow spell of
    # a shared machine costs every build a round; the best round counts (interference only ever
    # slows a run down).
    dd_keys = [k for k in rows if k.startswith(("deltadoc-", "ort-ops-"))]
    llama_keys = [k for k in rows if k.startswith("llama-")]
    runs = {k: {"prefill": {}, "decode": {}, "stream": {}, "peak_rss_bytes": {}} for k in rows}

    def record(key, kind, x, value):
        if value is not None:
            runs[key][kind].setdefault(x, []).append(value)

    versions = {}
    for rnd in range(args.reps):
        for n in lengths:
            log(f"round {rnd + 1}/{args.reps}, prompt length {n}")
            # deltadoc: one call gives prefill at n and decode at depth n.
            for k in dd_keys:
                r = deltadoc_bench(dd, dd_model(k), n, args.gen, args.threads)
                record(k, "prefill", n, r.get("prefill_tokens_per_s"))
                record(k, "peak_rss_bytes", n, r.get("peak_rss_bytes"))
                if n in depths:
                    record(k, "decode", n, r.get("decode_tokens_per_s"))
                    record(k, "stream", n, weight_stream(r))
            for k in llama_keys:
                record(k, "prefill", n, llama_bench(llama_src, ggufs[rows[k]["weights"]], n, 0, 0, args.threads))
        for d in depths:
            for k in dd_keys:
                if d not in lengths:
                    # Depth 0 is a 16-token prompt.
                    r = deltadoc_bench(dd, dd_model(k), max(d, 16), args.gen, args.threads)
                    record(k, "decode", d, r.get("decode_tokens_per_s"))
                    record(k, "stream", d, weight_stream(r))
            for k in llama_keys:
                record(k, "decode", d, llama_bench(llama_src, ggufs[rows[k]["weights"]], 0, args.gen, d, args.threads))
        if "transformers-fp32" in rows:
            # One process per prompt length, so that one that runs out of memory costs only itself.
            tl = [n for n in lengths if n <= args.transformers_max]
            points = [([n], [n] if n in depths else []) for n in tl]
            points += [([], [d]) for d in depths if d not in tl]
            for tls, tds in points:
                t = transformers_bench(models["hf"], tls, tds, args.gen, args.threads)
                for kind in ("prefill", "decode"):
                    for x, v in t.get(kind, {}).items():
                        record("transformers-fp32", kind, int(x), v)
                if t:
                    versions["torch"], versions["transformers"] = t["torch"], t["transformers"]
    for k, row in rows.items():
        for kind in ("prefill", "decode", "stream"):
            row[kind] = {x: max(v) for x, v in runs[k][kind].items()}
        row["runs"] = runs[k]

    tables = report(rows, lengths, depths, ceil, shape, wbytes)
    print(tables)
    for f in FAILURES:
        print(f"failed: {f}")
    (args.work / f"compare-{started:%Y%m%d-%H%M%S}.json").write_text(
        json.dumps({"rows": rows, "ceilings": ceil, "commands": COMMANDS}, indent=1, default=str)
    )
    if args.no_write:
        return

    ort = re.search(r'"onnxruntime==([0-9.]+)"', (REPO / "src" / "fetch.rs").read_text())
    minutes = (datetime.datetime.now() - started).total_seconds() / 60
    section = [
        f"## Side by side: deltadoc, ORT's DeltaNet ops, llama.cpp, transformers ({started:%Y-%m-%d}, `benches/compare.py`)",
        "",
        f"Machine: {machine_line(args.threads)} Measured ceilings this run (the best of two libraries): fp32 GEMM "
        f"{ceil['gemm_flops'] / 1e9:.1f} GFLOP/s ({ceil['gemm_by']}, 4096³), read bandwidth {ceil['read_bytes_per_s'] / 1e9:.1f} GB/s "
        f"({ceil['read_by']} over 1 GiB of f32). The compute ceiling is fp32's: int8 products (VNNI) and bf16 attention "
        f"can pass it. The run took {minutes:.0f} minutes.",
        "",
        f"Versions: deltadoc {rev} (ONNX Runtime {ort.group(1) if ort else '?'}), llama.cpp {llama_commit or '–'} "
        f"(llama-cpp-python {LLAMA_CPP_PYTHON} sdist, {' '.join(llama_arch_options())}), torch {versions.get('torch', 'not run')}, "
        f"transformers {versions.get('transformers', 'not run')}.",
        "",
        "Weights: one random 0.8B-shape checkpoint (`deltadoc model synth --seed "
        f"{args.seed} --hf-out`); the best of {args.reps} rounds. deltadoc's int8/int4 and ORT-ops folders are `model import`s of it, llama.cpp's "
        "GGUFs come from its own converter and `llama-quantize`. Prefill: random ordinary tokens, logits of the "
        f"last token only. Decode: {args.gen} greedy steps after a prompt of the given depth (16 tokens for depth 0); "
        "llama.cpp: `llama-bench -d`. Ceilings: compute = GEMM rate / FLOPs per prompt token (matrix products, "
        "recurrence, causal attention); bandwidth = read rate / (weight bytes + state read and write + KV at depth). "
        f"KV caches: deltadoc {args.kv_cache} (`--kv-cache {args.kv_cache}`, both deltadoc graphs), llama.cpp f16 "
        "(its default), transformers fp32.",
        "",
        tables,
        "",
        *(["Measurements that failed (– in the tables):", "", *(f"- {f}" for f in FAILURES), ""] if FAILURES else []),
        f"Commands, in the order they first ran (the measurements ran {args.reps} times, in rounds):",
        "",
        "```",
        *dict.fromkeys(home_as_tilde(c) for c in COMMANDS),
        "```",
    ]
    write_results(args.results, "\n".join(section))
    log(f"wrote {args.results}")


if __name__ == "__main__":
    main()
