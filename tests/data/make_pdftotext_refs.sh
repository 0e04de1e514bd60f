#!/usr/bin/env bash
# Writes tests/data/pdftotext/<corpus path>.txt: poppler's pdftotext (Debian bookworm 22.12) output
# for every text PDF of ../shared/corpus (contracts/ and pdf/), the reference the PDF extraction
# similarity test (tests/extract.rs) compares against. Needs apt-get (no root: the packages are
# downloaded and unpacked, not installed). Rerun when the corpus changes.
set -euo pipefail
cd "$(dirname "$0")"
corpus="${DELTADOC_CORPUS:-../../../shared/corpus}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download poppler-utils libpoppler126 libopenjp2-7 >/dev/null)
for d in "$work"/*.deb; do dpkg-deb -x "$d" "$work/root"; done
export LD_LIBRARY_PATH="$work/root/usr/lib/x86_64-linux-gnu"
pdftotext="$work/root/usr/bin/pdftotext"
"$pdftotext" -v 2>&1 | head -1
rm -rf pdftotext
while IFS= read -r -d '' f; do
  rel="${f#"$corpus"/}"
  mkdir -p "pdftotext/$(dirname "$rel")"
  # Password-protected files have no reference: the extractor must refuse them.
  timeout 60 "$pdftotext" -enc UTF-8 "$f" "pdftotext/$rel.txt" 2>/dev/null || rm -f "pdftotext/$rel.txt"
done < <(find "$corpus/contracts" "$corpus/pdf" -type f \( -iname '*.pdf' \) -print0 | sort -z)
du -sh pdftotext
