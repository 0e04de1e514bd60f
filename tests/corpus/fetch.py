#!/usr/bin/env python3
"""Brings the test corpus: the real documents listed in tests/corpus/MANIFEST.tsv, each fetched
from the public Git repository it was taken from, at the recorded commit, and checked against its
SHA-256 before it is kept.

    python3 tests/corpus/fetch.py [--dest DIR] [--base-url URL]

DIR defaults to $DELTADOC_CORPUS_CACHE, else ~/.cache/deltadoc/corpus (where the tests look when
$DELTADOC_CORPUS and ../shared/corpus are absent). A file already there with the right hash is
not fetched again. The manifest is copied into DIR last: the tests take its presence to mean the
folder is complete. Only the Python standard library is used.
"""

import argparse
import csv
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "MANIFEST.tsv"
RAW = "https://raw.githubusercontent.com"


def default_dest() -> Path:
    env = os.environ.get("DELTADOC_CORPUS_CACHE")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "deltadoc" / "corpus"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def url_of(base: str, row: dict) -> str:
    path = urllib.parse.quote(row["source_path"])
    return f"{base.rstrip('/')}/{row['source_repo']}/{row['commit']}/{path}"


def fetch_one(base: str, row: dict, dest: Path) -> str:
    """'kept' when the file was already right, 'fetched' when it was downloaded and verified."""
    target = dest / row["file"]
    if target.is_file() and sha256(target) == row["sha256"]:
        return "kept"
    target.parent.mkdir(parents=True, exist_ok=True)
    url = url_of(base, row)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".fetch-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            shutil.copyfileobj(resp, out)
        got = sha256(Path(tmp))
        if got != row["sha256"]:
            raise RuntimeError(f"{url}: SHA-256 {got}, the manifest says {row['sha256']}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return "fetched"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=default_dest())
    ap.add_argument("--base-url", default=RAW, help="raw-file server: URL/OWNER/REPO/COMMIT/PATH")
    args = ap.parse_args()
    with open(MANIFEST, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    args.dest.mkdir(parents=True, exist_ok=True)
    failed = []
    for i, row in enumerate(rows, 1):
        try:
            what = fetch_one(args.base_url, row, args.dest)
        except Exception as e:  # one bad source must not hide the state of the others
            failed.append(f"{row['file']}: {e}")
            what = "FAILED"
        print(f"[{i}/{len(rows)}] {what:7} {row['file']}", flush=True)
    if failed:
        print(f"\n{len(failed)} of {len(rows)} file(s) could not be fetched:", file=sys.stderr)
        for f in failed:
            print(f"  {f}", file=sys.stderr)
        return 1
    shutil.copyfile(MANIFEST, args.dest / "MANIFEST.tsv")
    print(f"corpus complete in {args.dest} ({len(rows)} files, every SHA-256 checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
