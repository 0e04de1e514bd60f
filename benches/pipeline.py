#!/usr/bin/env python3
"""Documents per hour: deltadoc's contracts pipeline against the pipeline a user would assemble
from peers, on one set of random weights, in one run.

deltadoc side: `deltadoc run --once` over an inbox of real contracts from ../shared/corpus with the
repository's own pipelines/contracts.yaml (two summaries and the terms extraction, the pipeline's
own token budgets) on deltadoc's int8 / int4 folders of the 0.8B shape.

Peer side, on the same weights: `pdftotext` for the text of a PDF (other files as they are), and
llama.cpp's `llama-server` (Q8_0 / Q4_K_M GGUF from llama.cpp's own converter and quantizer, the
build of benches/compare.py) with as many parallel slots as deltadoc decodes sequences of one
document; each document's three requests go to it at once with the same prompts (the chat
template of src/chat.rs around the same instructions), `json_schema` for the extraction, greedy.

Random weights rarely stop, and where one side stopped early the other would do less work: each
peer request generates exactly as many tokens as deltadoc generated for that stage of that
document (`n_predict` with `ignore_eos`); the constrained extraction is capped at deltadoc's count
and ends where its grammar ends. Both sides' token counts are reported.

Per precision class, deltadoc runs first (the peer needs its token counts), then the peer; the
classes run one after the other. Reported: documents per hour, prefill and decode tokens/s,
peak RSS, and their ratios; a section is prepended to benches/RESULTS.md.

Needs what benches/compare.py needs (cargo, cmake, a Python with torch and transformers for
llama.cpp's converter) and poppler-utils (`pdftotext`). 20 contracts at int8 took 94 minutes on
2 cores, three quarters of it llama-server's; both classes take about 3 hours. `--docs 3` is a
quick trial on the three shortest.
    python3 benches/pipeline.py [--docs N] [--classes int8,int4]
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (the setup steps, the machine facts and the results file are shared)
from compare import REPO, log  # noqa: E402

CLASSES = {"int8": "Q8_0", "int4": "Q4_K_M"}
PIPELINE = REPO / "pipelines" / "contracts.yaml"
# Kinds of MANIFEST.tsv the benchmark takes: contracts a text layer or plain text holds (an HTML
# fragment would need a converter on the peer side that deltadoc does not need).
KINDS = ("contract-pdf", "contract-pdf-scanned-ocr-layer", "contract-txt", "contract-md")
# The stages of pipelines/contracts.yaml that read the text (its `ocr` stage only runs on pages
# without one, and the chosen documents have none).
STAGES = ("summary", "summary_detailed", "terms")


# ------------------------------------------------------------------------------------ documents


def choose_documents(dd: Path, corpus: Path, count: int) -> list[Path]:
    """The contracts of the corpus whose every page has text (deltadoc's own extraction decides;
    the text-only model reads no scans), one file per contract: a PDF with a plain-text twin is
    taken as the PDF unless one of its pages needs OCR. Shortest text first, so `--docs 3` is
    quick."""
    rows = [l.split("\t") for l in (corpus / "MANIFEST.tsv").read_text().splitlines()[1:] if l.strip()]
    by_stem: dict[str, list[Path]] = {}
    for r in rows:
        if r[1] in KINDS:
            f = corpus / r[0]
            by_stem.setdefault(f.stem, []).append(f)
    chosen = {}
    for stem, files in sorted(by_stem.items()):
        # PDFs before their twins.
        for f in sorted(files, key=lambda f: f.suffix.lower() != ".pdf"):
            out = subprocess.run([dd, "extract", "--json", f], capture_output=True, text=True)
            pages = json.loads(out.stdout).get("ok", {}).get("pages", []) if out.returncode == 0 else []
            if pages and all(p["method"] != "ocr" for p in pages):
                chosen[f] = sum(len(p["text"]) for p in pages)
                break
        else:
            log(f"skipping {stem}: a page without text in every form of it")
    if len(chosen) < count:
        sys.exit(f"pipeline.py: {len(chosen)} usable contracts in {corpus}, {count} asked for")
    return sorted(chosen, key=lambda f: (chosen[f], f.name))[:count]


def peer_text(f: Path) -> str:
    """The text a user's script would hand the model: pdftotext's for a PDF, the file otherwise."""
    if f.suffix.lower() == ".pdf":
        return subprocess.run(["pdftotext", "-enc", "UTF-8", f, "-"], check=True, capture_output=True).stdout.decode("utf-8", "replace")
    return f.read_text(errors="replace")


# -------------------------------------------------------------------------------------- prompts


def stage_specs() -> dict:
    """The text stages of pipelines/contracts.yaml by name (instruction, schema)."""
    import yaml  # transformers' dependency, so in the venv llama.cpp's converter needs

    stages = {s["name"]: s for s in yaml.safe_load(PIPELINE.read_text())["stages"]}
    missing = [s for s in STAGES if "instruction" not in stages.get(s, {})]
    if missing:
        sys.exit(f"pipeline.py: {PIPELINE} has no instruction for stage(s) {', '.join(missing)}")
    return {s: stages[s] for s in STAGES}


def prompt(document: str, instruction: str) -> str:
    """src/chat.rs's stage prompt: one user turn with the document and the instruction, then the
    assistant's header with thinking off."""
    body = f"{document.strip()}\n\n{instruction.strip()}".strip()
    return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def instructions(specs: dict) -> dict:
    """Each stage's instruction as the model sees it; the extraction's followed by its schema, as
    src/stage/extract.rs writes it (serde_json: compact, keys sorted)."""
    out = {}
    for s in STAGES:
        text = specs[s]["instruction"].strip()
        if "schema" in specs[s]:
            schema = json.loads((PIPELINE.parent / specs[s]["schema"]).read_text())
            text += "\n\nReply with one JSON object that matches this JSON Schema:\n" + json.dumps(schema, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
        out[s] = text
    return out


# ------------------------------------------------------------------------------------- deltadoc


def timed(cmd: list, **kw) -> tuple[float, int, int]:
    """Runs `cmd` to its end: wall seconds, exit status and the peak RSS of that process (bytes)."""
    compare.announce(cmd)
    t = time.perf_counter()
    p = subprocess.Popen([str(c) for c in cmd], **kw)
    _, status, usage = os.wait4(p.pid, 0)
    return time.perf_counter() - t, os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024


def run_deltadoc(dd: Path, model: Path, docs: list[Path], work: Path, threads: int, max_batch: int, max_docs: int) -> dict:
    """`deltadoc run --once` over an inbox holding `docs`, from an empty ledger."""
    if work.exists():
        shutil.rmtree(work)
    inbox = work / "data" / "inbox" / "contracts"
    inbox.mkdir(parents=True)
    for f in docs:
        shutil.copy(f, inbox / f.name)
    shutil.copytree(PIPELINE.parent, work / "pipelines", ignore=shutil.ignore_patterns("README.md", "ocr.yaml"))
    cfg = work / "deltadoc.yaml"
    cfg.write_text(
        json.dumps(
            {
                "model": {"path": str(model)},
                "threads": threads,
                "state_dir": str(work / "state"),
                "pipelines": str(work / "pipelines"),
                "data_dir": str(work / "data"),
                "worker": {"max_batch": max_batch, "max_docs": max_docs},
                "metrics": {"enabled": False},
            },
            indent=1,
        )
    )
    compare.from_disk(model)
    with open(work / "deltadoc.log", "w") as err:
        wall, rc, rss = timed([dd, "run", "--once", "--config", cfg], stderr=err)
    if rc != 0:
        sys.exit(f"pipeline.py: deltadoc exited {rc}; see {work / 'deltadoc.log'}")
    results = {}
    for f in sorted((work / "data" / "out" / "contracts").rglob("*.json")):
        r = json.loads(f.read_text())
        if "stages" in r:
            results[r["source"]["relative_path"]] = r
    missing = [f.name for f in docs if f.name not in results]
    if missing:
        sys.exit(f"pipeline.py: deltadoc wrote no result for {', '.join(missing)}; see {work / 'deltadoc.log'}")
    per_doc = {}
    for name, r in results.items():
        st = r["stages"]
        per_doc[name] = {
            "document_tokens": r["document_tokens"],
            "generated": {s: st[s]["generated_tokens"] for s in STAGES},
            "calls": {s: st[s]["calls"] for s in STAGES},
            "prefill_s": sum(st[s]["prefill_s"] for s in STAGES),
            "warnings": r.get("warnings", []),
        }
    tokens = {k: sum(r["tokens"][k] for r in results.values()) for k in ("prompt", "prefilled", "generated")}
    return {"wall_s": wall, "peak_rss_bytes": rss, "tokens": tokens, "prefill_s": sum(d["prefill_s"] for d in per_doc.values()), "docs": per_doc}


# ------------------------------------------------------------------------------------ llama.cpp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 3600) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def run_llama(src: Path, gguf: Path, docs: list[Path], dd_run: dict, work: Path, threads: int, slots: int, at_once: int) -> dict:
    """llama-server with `slots` slots; `at_once` documents at a time, each one's text taken with
    pdftotext and its stage requests sent at once. The clock runs from the server's start to the
    last reply, as deltadoc's includes its model load and its extraction."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    # One slot's context: the longest document in deltadoc's tokens, with room for the schema,
    # the instruction, pdftotext's different layout and the reply.
    longest = max(d["document_tokens"] for d in dd_run["docs"].values())
    ctx = slots * (int(longest * 1.15) + 4096)
    port = free_port()
    cmd = [src / "build" / "bin" / "llama-server", "-m", gguf, "-t", threads, "-c", ctx, "-np", slots, "-kvu", "--no-webui", "--host", "127.0.0.1", "--port", port]
    compare.from_disk(gguf)
    compare.announce(cmd)
    started = time.perf_counter()
    with open(work / "llama-server.log", "w") as server_log:
        server = subprocess.Popen([str(c) for c in cmd], stdout=server_log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    while True:
        if server.poll() is not None:
            sys.exit(f"pipeline.py: llama-server exited {server.returncode}; see {work / 'llama-server.log'}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.5)
    log(f"  llama-server ready after {time.perf_counter() - started:.1f} s")
    specs = stage_specs()
    ins = instructions(specs)
    schema = json.loads((PIPELINE.parent / specs["terms"]["schema"]).read_text())
    replies = {}
    done = 0

    def document(f: Path, stages: concurrent.futures.Executor) -> None:
        nonlocal done
        text = peer_text(f)
        gen = dd_run["docs"][f.name]["generated"]

        def ask(stage):
            body = {"prompt": prompt(text, ins[stage]), "n_predict": gen[stage], "temperature": 0, "cache_prompt": True}
            if stage == "terms":
                body["json_schema"] = schema
            else:
                body["ignore_eos"] = True
            return post(base + "/completion", body)

        t = time.perf_counter()
        replies[f.name] = dict(zip(STAGES, stages.map(ask, STAGES)))
        done += 1
        log(f"  [{done}/{len(docs)}] {f.name}: {time.perf_counter() - t:.1f} s")

    try:
        with (
            concurrent.futures.ThreadPoolExecutor(len(STAGES) * at_once) as stages,
            concurrent.futures.ThreadPoolExecutor(at_once) as documents,
        ):
            for r in [documents.submit(document, f, stages) for f in docs]:
                r.result()
        wall = time.perf_counter() - started
    finally:
        server.send_signal(signal.SIGTERM)
        _, _, usage = os.wait4(server.pid, 0)
    tim = [r["timings"] for d in replies.values() for r in d.values()]
    tokens = {
        "prompt": sum(r["tokens_evaluated"] for d in replies.values() for r in d.values()),
        "prefilled": sum(t["prompt_n"] for t in tim),
        "generated": sum(t["predicted_n"] for t in tim),
    }
    keep = ("prompt_n", "cache_n", "prompt_ms", "predicted_n", "predicted_ms")
    return {
        "wall_s": wall,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "tokens": tokens,
        # A document's requests prefill side by side (one batch); the longest is its prefill time.
        "prefill_s": sum(max(r["timings"]["prompt_ms"] for r in d.values()) for d in replies.values()) / 1000,
        "docs": {n: {s: {k: r["timings"].get(k) for k in keep} | {"stop_type": r.get("stop_type")} for s, r in d.items()} for n, d in replies.items()},
    }


# --------------------------------------------------------------------------------------- report


def rates(r: dict, n_docs: int) -> dict:
    """Documents per hour; prefill tokens/s over the prefill time; decode tokens/s over the rest of
    the wall time (model load, extraction and scheduling included, so a lower bound)."""
    return {
        "docs_per_hour": n_docs / r["wall_s"] * 3600,
        "prefill_tps": r["tokens"]["prefilled"] / r["prefill_s"] if r["prefill_s"] else None,
        "decode_tps": r["tokens"]["generated"] / max(r["wall_s"] - r["prefill_s"], 1e-9),
    }


def table(results: dict, n_docs: int) -> str:
    fmt, ratio = compare.fmt, compare.ratio
    lines = [
        "| class | pipeline | docs/hour | wall s | prompt tok | prefilled tok | prefill tok/s | generated tok | decode tok/s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    for c, pair in results.items():
        for name, r in pair.items():
            x = rates(r, n_docs)
            t = r["tokens"]
            lines.append(
                f"| {c} | {name} | {fmt(x['docs_per_hour'])} | {fmt(r['wall_s'], 0)} | {t['prompt']} | {t['prefilled']} | "
                f"{fmt(x['prefill_tps'])} | {t['generated']} | {fmt(x['decode_tps'])} | {r['peak_rss_bytes'] / 1e9:.2f} |"
            )
        (dn, d), (ln, l) = pair.items()
        a, b = rates(d, n_docs), rates(l, n_docs)
        summary.append(
            f"- {c}, {dn} / {ln}: documents per hour **{fmt(ratio(a['docs_per_hour'], b['docs_per_hour']), 2)}×**, "
            f"prefill {fmt(ratio(a['prefill_tps'], b['prefill_tps']), 2)}×, decode {fmt(ratio(a['decode_tps'], b['decode_tps']), 2)}×, "
            f"peak RSS {fmt(ratio(d['peak_rss_bytes'], l['peak_rss_bytes']), 2)}×"
        )
    return "\n".join(lines + [""] + summary)


def publish(args, started: datetime.datetime, stem: str, runs: dict, heading: str, body: list[str]) -> None:
    """Keeps every run's figures in `<work>/<stem>-<date>.json` and, unless --no-write, prepends a
    section to the results file: `heading`, the machine and how long the run took, `body`, and the
    commands recorded."""
    (args.work / f"{stem}-{started:%Y%m%d-%H%M%S}.json").write_text(json.dumps({"results": runs, "commands": compare.COMMANDS}, indent=1))
    if args.no_write:
        return
    minutes = (datetime.datetime.now() - started).total_seconds() / 60
    section = [
        heading,
        "",
        f"Machine: {compare.machine_line(args.threads)} The run took {minutes:.0f} minutes.",
        "",
        *body,
        "",
        "Commands:",
        "",
        "```",
        *dict.fromkeys(compare.home_as_tilde(c) for c in compare.COMMANDS),
        "```",
    ]
    compare.write_results(args.results, "\n".join(section))
    log(f"wrote {args.results}")


def sweep(args, dd: Path, rev: str, models: dict, docs: list[Path], classes: list[str], started: datetime.datetime) -> None:
    """deltadoc alone over the same documents with each `worker.max_docs` of the sweep: the
    measurement its default comes from."""
    counts = [int(n) for n in args.sweep_max_docs.split(",")]
    lines = [
        "| class | worker.max_docs | wall s | docs/hour | × the first | prompt tok | prefilled tok | generated tok | decode tok/s | prefill tok/s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = {}
    for c in classes:
        first = None
        for n in counts:
            log(f"{c}: deltadoc, worker.max_docs {n}")
            r = run_deltadoc(dd, models[c], docs, args.work / "pipeline-run" / f"sweep-{c}-{n}", args.threads, args.max_batch, n)
            runs[f"{c} max_docs {n}"] = r
            x, t = rates(r, len(docs)), r["tokens"]
            first = first or x["docs_per_hour"]
            lines.append(
                f"| {c} | {n} | {compare.fmt(r['wall_s'], 0)} | {compare.fmt(x['docs_per_hour'])} | {x['docs_per_hour'] / first:.2f} | "
                f"{t['prompt']} | {t['prefilled']} | {t['generated']} | {compare.fmt(x['decode_tps'])} | {compare.fmt(x['prefill_tps'])} | "
                f"{r['peak_rss_bytes'] / 1e9:.2f} |"
            )
    table = "\n".join(lines)
    print(table)
    publish(
        args,
        started,
        "pipeline-sweep",
        runs,
        f"## Documents in flight: `worker.max_docs` {', '.join(map(str, counts))} ({started:%Y-%m-%d}, `benches/pipeline.py --sweep-max-docs`)",
        [
            f"deltadoc {rev}. {len(docs)} contracts of the corpus, shortest text first: " + ", ".join(f"`{f.name}`" for f in docs) + ". "
            f"Each run `deltadoc run --once` from an empty ledger, pipelines/contracts.yaml, worker.max_batch {args.max_batch}, "
            "one after the other. decode tok/s = generated tokens / (wall − prefill seconds), a lower bound.",
            "",
            table,
        ],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    p.add_argument("--work", type=Path, default=cache / "deltadoc-bench", help="models, the llama.cpp build, the runs")
    p.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "corpus")
    p.add_argument("--docs", type=int, default=20, help="contracts, shortest text first (the issue asks for at least 20)")
    p.add_argument("--classes", default="int8,int4", help=f"subset of {','.join(CLASSES)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=8, help="deltadoc's worker.max_batch")
    p.add_argument("--max-docs", type=int, default=2, help="deltadoc's worker.max_docs; the peer gets as many documents at once")
    p.add_argument(
        "--sweep-max-docs",
        metavar="N,N,...",
        help="instead of the comparison: deltadoc alone with each of these worker.max_docs, one after the other",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--results", type=Path, default=REPO / "benches" / "RESULTS.md")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args()
    classes = [c for c in args.classes.split(",") if c]
    for c in classes:
        if c not in CLASSES:
            sys.exit(f"pipeline.py: unknown precision class {c!r} (known: {', '.join(CLASSES)})")
    if shutil.which("pdftotext") is None:
        sys.exit("pipeline.py: pdftotext is needed for the peer pipeline (Debian: apt-get install poppler-utils)")
    args.work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now()
    compare.COMMANDS.append(" ".join(["python3 benches/pipeline.py", *sys.argv[1:]]))

    dd, rev = compare.build_deltadoc()
    models = compare.make_models(dd, args.work, args.seed, "f16", classes)
    llama_src, llama_commit = compare.build_llama(args.work)
    ggufs = compare.make_ggufs(llama_src, models["hf"], args.work)
    docs = choose_documents(dd, args.corpus, args.docs)
    log(f"{len(docs)} contracts: " + ", ".join(f.name for f in docs))
    # deltadoc decodes the stage calls of its documents in flight together: as many slots on the peer.
    slots = min(len(STAGES) * args.max_docs, args.max_batch)
    os.sync()

    if args.sweep_max_docs:
        sweep(args, dd, rev, models, docs, classes, started)
        return
    results = {}
    for c in classes:
        log(f"{c}: deltadoc")
        d = run_deltadoc(dd, models[c], docs, args.work / "pipeline-run" / f"deltadoc-{c}", args.threads, args.max_batch, args.max_docs)
        log(f"{c}: llama-server {CLASSES[c]}")
        l = run_llama(llama_src, ggufs[CLASSES[c]], docs, d, args.work / "pipeline-run" / f"llama-{c}", args.threads, slots, args.max_docs)
        results[c] = {f"deltadoc {c}": d, f"llama-server {CLASSES[c]}": l}
    tables = table(results, len(docs))
    print(tables)
    publish(
        args,
        started,
        "pipeline",
        results,
        f"## Documents per hour: the contracts pipeline against pdftotext + llama-server ({started:%Y-%m-%d}, `benches/pipeline.py`)",
        [
            f"Versions: deltadoc {rev}, llama.cpp {llama_commit} (llama-cpp-python {compare.LLAMA_CPP_PYTHON} sdist).",
            "",
            f"{len(docs)} contracts of the corpus, shortest text first: " + ", ".join(f"`{f.name}`" for f in docs) + ". "
            f"deltadoc: `deltadoc run --once`, pipelines/contracts.yaml, worker.max_batch {args.max_batch}, worker.max_docs {args.max_docs}; "
            f"peer: pdftotext, then {len(STAGES)} requests per document, {args.max_docs} document(s) at a time, to llama-server with {slots} slots, the same prompts, "
            "`json_schema` for terms, greedy; each summary request generates exactly as many tokens as deltadoc's did "
            "(`n_predict` + `ignore_eos`), the extraction at most as many, ending where its grammar ends. Both clocks include "
            "loading the model. prefill tok/s = prefilled tokens / prefill seconds (llama-server: per document the longest of "
            "its requests' prompt times, as they prefill side by side; with several documents at once their prompt times may "
            "overlap, so the peer's prefill seconds are then an upper bound); decode tok/s = generated tokens / (wall − prefill seconds).",
            "",
            tables,
        ],
    )


if __name__ == "__main__":
    main()
