#!/usr/bin/env bash
# Checks every complete .moe example in the book with `moec check`.
#
# Extracts each ```moe fenced block from book/src/**/*.md (expanding mdBook's
# `{{#include PATH}}` lines, relative to the chapter, so included example
# files are checked as the reader sees them). A block is complete when it has
# a top-level `layer NAME {` and a `mesh {` section; each complete block is
# written to a temporary file named after its chapter and line and checked
# with moec. Partial snippets (a lone `router { ... }` and the like) are
# skipped. Deliberately broken examples are tagged ```text, not ```moe.
#
# Usage, from anywhere:  bash book/check-snippets.sh
# The binary is ./target/debug/moec (build it with `cargo build -p moec`);
# set MOEC=/path/to/moec to use another. Exits 0 when every complete block
# passes, 1 when one fails, 2 when the binary is missing.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

moec="${MOEC:-./target/debug/moec}"
if [[ ! -x "$moec" ]]; then
    echo "check-snippets: $moec not found; run \`cargo build -p moec\` first" >&2
    exit 2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Extract the ```moe blocks: one file per block, named CHAPTER_LINE.moe,
# where CHAPTER is the chapter's path with `/` turned into `__`.
python3 - "$tmp" <<'PY'
import pathlib, re, sys

out = pathlib.Path(sys.argv[1])
src = pathlib.Path("book/src")
include = re.compile(r"^\{\{#include\s+([^}:\s]+)\s*\}\}\s*$")
fence = re.compile(r"^(`{3,})(.*)$")

for md in sorted(src.rglob("*.md")):
    lines = md.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = fence.match(lines[i])
        if not m:
            i += 1
            continue
        ticks, info = m.group(1), m.group(2).strip()
        start = i + 1
        body = []
        i += 1
        while i < len(lines) and not lines[i].startswith(ticks):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        lang = info.split(",")[0].strip()
        if lang != "moe":
            continue
        text = []
        for line in body:
            inc = include.match(line)
            if inc:
                path = (md.parent / inc.group(1)).resolve()
                text.append(path.read_text(encoding="utf-8").rstrip("\n"))
            else:
                text.append(line)
        name = str(md.relative_to(src)).replace("/", "__")
        (out / f"{name}_{start}.moe").write_text("\n".join(text) + "\n", encoding="utf-8")
PY

checked=0
skipped=0
failed=0
for f in "$tmp"/*.moe; do
    [[ -e "$f" ]] || continue
    label="$(basename "$f" .moe)"
    label="${label//__//}"
    label="book/src/${label%_*}, block at line ${label##*_}"
    if grep -Eq '^[[:space:]]*layer[[:space:]]+[A-Za-z_][A-Za-z0-9_]*[[:space:]]*\{' "$f" &&
        grep -Eq '^[[:space:]]*mesh[[:space:]]*\{' "$f"; then
        checked=$((checked + 1))
        if ! output="$("$moec" --color never check "$f" 2>&1)"; then
            failed=$((failed + 1))
            echo "FAIL: $label"
            echo "$output" | sed 's/^/    /'
        fi
    else
        skipped=$((skipped + 1))
    fi
done

echo "check-snippets: $checked complete block(s) checked, $failed failed, $skipped partial block(s) skipped"
if [[ $failed -gt 0 ]]; then
    exit 1
fi
