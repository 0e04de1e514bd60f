#!/usr/bin/env python3
"""Crash campaign: real documents through `deltadoc serve` (watcher on) while the daemon is killed
at random moments, then run to completion, and a report of what survived.

    python3 tests/crash_campaign.py --deltadoc target/debug/deltadoc --kills 100 --documents 60

Documents come from the real corpus (../shared/corpus or $DELTADOC_CORPUS: text PDFs, scans,
malformed files, HTML, text in several encodings) and tests/data/encodings. First a reference run
without kills (`run --once`) says what each document should end as. Then the campaign: documents
arrive in the inbox in waves while the daemon is SIGKILLed 0 to 3 s (sometimes 3 to 15 s) after it
is busy with a document, or (every fourth kill) the moment the marker shows a short step: the
result write, the quarantine copy, an extraction child, chunking (every seventh stop is a SIGTERM
drain instead); then it is restarted; the crash marker (<state>/running) says
which step each kill hit. Last, the daemon runs until every document has ended.

The report counts documents with exactly one result or one quarantine entry, lost ones (neither),
duplicated ones (both, or two results), partial ones (unreadable JSON, a quarantine copy that is
not the whole document or not the only one) and leftover temp files, checks the ledger with `PRAGMA integrity_check`, and lists documents whose outcome differs
from the reference run (quarantined only because of the kills). It exits 1 if any of those is not
zero. The crash rule the daemon follows is in src/daemon/crash_marker.rs.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = """name: campaign
inboxes: [{path: inbox}]
output: out
quarantine: quarantine
quarantine_mode: copy
context: {max_tokens: 4096, overlap: 64}
stages:
  - {name: transcription, kind: ocr, max_new_tokens: 64, max_page_tokens: 256}
  - {name: summary, kind: summarize, max_new_tokens: 96}
  - {name: parties, kind: prompt, instruction: "List the parties.", max_new_tokens: 48}
"""
CONFIG = """model: {{path: {model}}}
threads: 1
memory_budget: 8GiB
state_dir: state
pipelines: pipelines
data_dir: .
metrics: {{enabled: false}}
ingest: {{rescan_interval: 2s, stable_window: 1s}}
limits: {{max_file_bytes: 64MiB, document_timeout: 20m, extract_timeout: 60s, extract_memory: 2GiB,
  max_attempts: 3, retry_backoff: 1s}}
"""


def log(msg):
    print(f"[campaign {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def corpus_dir():
    for c in (os.environ.get("DELTADOC_CORPUS"), ROOT.parent / "shared" / "corpus"):
        if c and (Path(c) / "MANIFEST.tsv").is_file():
            return Path(c)
    sys.exit("no corpus: set DELTADOC_CORPUS or put it at ../shared/corpus")


def pick_documents(n, rng):
    """`n` documents of every kind, round robin over the kinds, none over 2 MB."""
    c = corpus_dir()
    kinds = {
        "text PDF": sorted(c.glob("pdf/*.pdf")) + sorted(c.glob("contracts/*.PDF")),
        "scan": sorted(c.glob("scanned/*.pdf")) + sorted(c.glob("scanned/*.tif")) + sorted(c.glob("scanned/*.png")),
        "malformed": sorted(c.glob("malformed/*")),
        "HTML": sorted(c.glob("text/*.html")) + sorted(c.glob("contracts/*.html")),
        "text": sorted(c.glob("text/*.txt")) + sorted(c.glob("text/*.md")) + sorted(c.glob("contracts/*.txt"))
        + sorted(c.glob("contracts/*.md")) + sorted((ROOT / "tests/data/encodings").glob("*.txt")),
    }
    for k in kinds:
        kinds[k] = [p for p in kinds[k] if p.stat().st_size <= 2_000_000]
        rng.shuffle(kinds[k])
    out, seen = [], set()
    while len(out) < n and any(kinds.values()):
        for k in list(kinds):
            if kinds[k] and len(out) < n:
                p = kinds[k].pop()
                # The same bytes twice would be a skipped duplicate, with neither result nor entry.
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                if digest not in seen:
                    seen.add(digest)
                    out.append((k, p))
    names = Counter(p.name for _, p in out)
    dup = [x for x, m in names.items() if m > 1]
    if dup:
        sys.exit(f"documents with the same name: {dup}")
    return out


class Install:
    def __init__(self, root, deltadoc, model):
        self.root, self.deltadoc = Path(root), deltadoc
        for d in ("inbox", "pipelines", "config"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "pipelines/campaign.yaml").write_text(PIPELINE)
        (self.root / "config/deltadoc.yaml").write_text(CONFIG.format(model=json.dumps(str(model))))
        self.env = dict(os.environ, DELTADOC_CONFIG=str(self.root / "config/deltadoc.yaml"), DELTADOC_LOG="info")

    def run(self, *args, check=True):
        r = subprocess.run([self.deltadoc, *args], cwd=self.root, env=self.env, capture_output=True, text=True)
        if check and r.returncode != 0:
            sys.exit(f"deltadoc {' '.join(args)} failed:\n{r.stderr[-3000:]}")
        return r

    def serve(self):
        errlog = open(self.root / "serve.log", "a")
        return subprocess.Popen([self.deltadoc, "serve"], cwd=self.root, env=self.env, stdout=subprocess.DEVNULL, stderr=errlog)

    def status(self):
        return json.loads(self.run("status", "--json", "--recent", "0").stdout)

    def unfinished(self):
        return sum(c["jobs"] for c in self.status()["counts"] if c["state"] in ("queued", "running", "retry_wait"))

    def steps(self):
        """The step each running job is in: the crash marker holds a record of 256 bytes per
        document in flight, `job beats W|- step` (src/daemon/crash_marker.rs)."""
        try:
            data = (self.root / "state/running").read_bytes()
        except OSError:
            return []
        steps = []
        for at in range(0, len(data), 256):
            words = data[at : at + 254].decode("utf-8", "replace").split(" ", 3)
            if len(words) < 4 or not words[0].strip():
                continue
            step = words[3].strip() or "(starting)"
            steps.append(f"{step} (a child decodes)" if words[2] == "W" else step)
        return steps

    def outcomes(self, names):
        """name -> (results, quarantine entries, partial results)."""
        out = {}
        results = {p.name[: -len(".json")]: p for p in (self.root / "out").rglob("*.json")}
        errors = {p.name[: -len(".error.json")]: p for p in (self.root / "quarantine").rglob("*.error.json")}
        for n in names:
            res = [p for k, p in results.items() if k == n]
            partial = 0
            for p in res:
                try:
                    json.loads(p.read_text())
                except (ValueError, OSError):
                    partial += 1
            reason = None
            if n in errors:
                try:
                    reason = json.loads(errors[n].read_text())["reason"]
                except (ValueError, OSError, KeyError):
                    partial += 1
            out[n] = (len(res), reason, partial)
        return out

    def leftovers(self):
        return [str(p.relative_to(self.root)) for d in ("out", "quarantine") for p in (self.root / d).rglob("*")
                if p.is_file() and (".tmp" in p.name or p.name.startswith("."))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deltadoc", default=str(ROOT / "target/debug/deltadoc"))
    ap.add_argument("--model", help="model folder (default: synthesise the tiny random model)")
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--documents", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", help="keep the installations in this folder")
    ap.add_argument("--report", help="write the report as JSON here too")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="deltadoc-campaign-"))
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    # A copy: a rebuild of the binary during the campaign must not change what the runs compare.
    a.deltadoc = str(shutil.copy2(a.deltadoc, base / "deltadoc"))
    model = Path(a.model).resolve() if a.model else base / "model"
    if not a.model:
        subprocess.run([a.deltadoc, "model", "synth", "--shape", "tiny", "--out", str(model)], check=True,
                       capture_output=True)
    docs = pick_documents(a.documents, rng)
    log(f"{len(docs)} documents: " + ", ".join(f"{k} {n}" for k, n in sorted(Counter(k for k, _ in docs).items())))
    names = [p.name for _, p in docs]

    # The reference: what each document ends as without kills.
    ref = Install(base / "reference", a.deltadoc, model)
    for _, p in docs:
        shutil.copy(p, ref.root / "inbox" / p.name)
    t = time.time()
    ref.run("run", "--once")
    expected = ref.outcomes(names)
    log(f"reference run: {time.time() - t:.0f} s, {sum(r for r, _, _ in expected.values())} results, "
        f"{sum(1 for _, q, _ in expected.values() if q)} quarantined")

    camp = Install(base / "campaign", a.deltadoc, model)
    # Documents arrive in waves spread over the kills (and sooner when the daemon is idle), and
    # each kill comes 0 to 3 s after the daemon is busy with a document, or now and then 3 to
    # 15 s after, so that documents also finish between kills.
    waves = [docs[i::8] for i in range(8)]
    every = max(1, a.kills // (len(waves) + 1))
    phases, signals = Counter(), Counter()
    t = time.time()
    for i in range(a.kills):
        d = camp.serve()
        busy_by = time.time() + 10
        while not camp.steps() and time.time() < busy_by and d.poll() is None:
            time.sleep(0.1)
        if waves and (i % every == 0 or not camp.steps()):
            for _, p in waves.pop(0):
                shutil.copy(p, camp.root / "inbox" / p.name)
        if i % 4 == 3:
            # Aimed: the moment the marker shows a short step (the result write, the quarantine
            # copy, an extraction child, chunking), polled every millisecond for up to 20 s.
            target = ("write", "quarantine", "extract (a child decodes)", "chunk")[(i // 4) % 4]
            until = time.time() + 20
            while target not in camp.steps() and time.time() < until and d.poll() is None:
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(0.0, 3.0) if rng.random() < 0.7 else rng.uniform(3.0, 15.0))
        phase = ", ".join(camp.steps()) or "idle"
        if i % 7 == 6:
            d.send_signal(signal.SIGTERM)
            signals["SIGTERM"] += 1
        else:
            d.kill()
            signals["SIGKILL"] += 1
        d.wait()
        phases[phase] += 1
        if (i + 1) % 10 == 0:
            log(f"{i + 1} stops; {camp.unfinished()} documents unfinished")
    for wave in waves:
        for _, p in wave:
            shutil.copy(p, camp.root / "inbox" / p.name)
    during = camp.outcomes(names)
    ended_during_kills = sum(1 for r, q, _ in during.values() if r or q)
    log(f"{a.kills} stops in {time.time() - t:.0f} s ({dict(signals)}); {ended_during_kills} documents ended "
        "meanwhile; running to completion")
    d = camp.serve()
    deadline = time.time() + 3600
    while True:
        time.sleep(3)
        got = camp.outcomes(names)
        if camp.unfinished() == 0 and all(r or q for r, q, _ in got.values()):
            break
        if time.time() > deadline:
            break
    d.send_signal(signal.SIGTERM)
    d.wait()

    got = camp.outcomes(names)
    one = [n for n, (r, q, p) in got.items() if (r == 1) != bool(q) and not p]
    lost = [n for n, (r, q, _) in got.items() if r == 0 and not q]
    duplicated = [n for n, (r, q, _) in got.items() if r > 1 or (r and q)]
    partial = [n for n, (_, _, p) in got.items() if p]
    # A quarantined document's copy is whole, and there is one copy.
    for _, p in docs:
        if got[p.name][1]:
            copies = sorted((camp.root / "quarantine").glob(p.name + "*"))
            copies = [c for c in copies if not c.name.endswith(".error.json")]
            if [c.name for c in copies] != [p.name] or copies[0].read_bytes() != p.read_bytes():
                partial.append(f"{p.name} (quarantine copies: {[c.name for c in copies]})")
    changed = {n: {"reference": expected[n][1] or "result", "campaign": got[n][1] or "result"}
               for n in names if (expected[n][1] or "result") != (got[n][1] or "result")}
    con = sqlite3.connect(camp.root / "state/ledger.sqlite3")
    integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    interruptions = con.execute("SELECT COALESCE(SUM(interruptions), 0), COALESCE(MAX(interruptions), 0) FROM jobs").fetchone()
    con.close()
    report = {
        "documents": len(names), "stops": dict(signals), "kill_steps": dict(phases.most_common()),
        "ended_while_killed": ended_during_kills,
        "exactly_one": len(one), "lost": lost, "duplicated": duplicated, "partial": partial,
        "leftover_temp_files": camp.leftovers(), "ledger_integrity": integrity,
        "interruptions": {"total": interruptions[0], "most_for_one_document": interruptions[1]},
        "outcome_changed_by_the_kills": changed,
    }
    print(json.dumps(report, indent=2))
    if a.report:
        Path(a.report).write_text(json.dumps(report, indent=2))
    bad = lost or duplicated or partial or report["leftover_temp_files"] or integrity != "ok" or changed \
        or len(one) != len(names)
    if not a.keep:
        shutil.rmtree(base, ignore_errors=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
