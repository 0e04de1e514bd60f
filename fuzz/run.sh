#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) on the stable toolchain and prints one line
# of figures per target: executions, coverage (edges), features, corpus size, findings.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#   fuzz/run.sh --minimise [TARGET...]
#
# Seeds: the committed minimised corpus (fuzz/corpus/TARGET, its smallest 300 inputs within 512 KiB), plus, on the
# first run of a target, the real documents of ../shared/corpus or $DELTADOC_CORPUS and the
# repository's own pipelines, schemas and test files. Every run also reads fuzz/regressions/TARGET, the inputs of
# findings that were fixed. New inputs go to fuzz/work/TARGET (ignored by git); `fuzz/run.sh
# --minimise` folds them back into fuzz/corpus. A crash, hang or out-of-memory input is written to
# fuzz/artifacts/TARGET and makes the script exit 1.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TERM_COLOR=never
if ! command -v cargo-fuzz >/dev/null; then
  cargo install cargo-fuzz --version 0.13.2 --locked
fi
ALL=(pdf_text pdf_page_images image_file text pipeline_yaml extract_schema snapshot)
minimise=0 seconds=60
# `--minimise` takes no SECONDS: what follows it are targets.
if [ "${1:-}" = "--minimise" ]; then minimise=1; shift; elif [ $# -gt 0 ]; then seconds=$1; shift; fi
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=("${ALL[@]}")
corpus="${DELTADOC_CORPUS:-../../shared/corpus}"
# `--sanitizer none`: the sanitizers need a nightly compiler; Rust's own checks and libFuzzer's
# timeout and memory limits find the rest. Optimised without debug assertions, as released.
cargo fuzz build --sanitizer none -O >/dev/null

seed() {
  local t=$1 dir=$2
  mkdir -p "$dir"
  [ -n "$(ls -A "$dir")" ] && return 0
  cp -r "corpus/$t/." "$dir/" 2>/dev/null || true
  local files=()
  case $t in
    pdf_text | pdf_page_images) files=("$corpus"/pdf/*.pdf "$corpus"/malformed/*.pdf "$corpus"/scanned/*.pdf "$corpus"/contracts/*.PDF) ;;
    image_file) files=("$corpus"/scanned/*.png "$corpus"/scanned/*.jpg "$corpus"/scanned/*.tif) ;;
    text) files=("$corpus"/text/* ../tests/data/encodings/*.txt ../tests/data/encodings/*.html) ;;
    pipeline_yaml) files=(../pipelines/*.yaml) ;;
    extract_schema) files=(../pipelines/schemas/*.json) ;;
    snapshot) ;;
  esac
  for f in "${files[@]}"; do
    # Seeds over 1 MiB slow every execution for little coverage.
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -le 1048576 ] && cp "$f" "$dir/" || true
  done
  if [ "$t" = snapshot ]; then
    # The body of a small valid snapshot (the target appends the checksum).
    python3 - "$dir/seed" <<'EOF'
import json, struct, sys
header = json.dumps({"model": "m", "tokens": 3, "rope_delta": 0, "prefix_sha256": "0" * 64,
                     "tensors": [["past.0.key", [1, 3, 1, 2], "f16"], ["past.0.conv", [1, 4, 2], "f32"]]}).encode()
body = b"DDSNAP\0\0" + struct.pack("<II", 3, len(header)) + header + bytes(12) + bytes(32)
open(sys.argv[1], "wb").write(body)
EOF
  fi
}

status=0
for t in "${targets[@]}"; do
  work="work/$t"
  seed "$t" "$work"
  if [ $minimise = 1 ]; then
    mkdir -p corpus && rm -rf "corpus/$t.new" && cp -r "$work" "corpus/$t.new"
    # Minimised in place: what covers no new feature goes.
    cargo fuzz cmin --sanitizer none -O "$t" "corpus/$t.new" >/dev/null 2>&1
    # What the repository keeps of it: the smallest inputs, at most 300 and 512 KiB a target.
    # The real documents the rest grew from seed every first run again.
    ls -rS "corpus/$t.new" | awk -v dir="corpus/$t.new" 'BEGIN { budget = 524288; kept = 0 }
      { cmd = "stat -c %s \"" dir "/" $0 "\""; cmd | getline size; close(cmd)
        if (kept < 300 && budget >= size) { budget -= size; kept++ } else print dir "/" $0 }' |
      while read -r f; do rm -f "$f"; done
    rm -rf "corpus/$t" && mv "corpus/$t.new" "corpus/$t"
    echo "$t: minimised corpus $(ls "corpus/$t" | wc -l) files, $(du -sh "corpus/$t" | cut -f1)"
    continue
  fi
  mkdir -p "artifacts/$t"
  log="work/$t.log"
  # 10 s per input and 2 GiB of memory at most: beyond that an input is a hang or a bomb.
  # Inputs that once crashed or hung a target are read at every start, after the work corpus;
  # minimising never drops them.
  extra=(); [ -d "regressions/$t" ] && extra=("regressions/$t")
  if ! cargo fuzz run --sanitizer none -O "$t" "$work" "${extra[@]}" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 -max_len=1048576 \
      -print_final_stats=1 >"$log" 2>&1; then
    status=1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' || echo "cov: ? ft: ? corp: ?")
  found=$(ls "artifacts/$t" | wc -l)
  echo "$t: $runs executions in ${seconds}s, $last, findings in fuzz/artifacts/$t: $found"
  if [ "$found" -gt 0 ]; then status=1; grep -E 'panicked|ERROR: libFuzzer|SUMMARY' "$log" | head -5; fi
done
exit $status
