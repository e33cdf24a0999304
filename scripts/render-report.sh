#!/usr/bin/env bash
# Render a compare or lab compare report as a browser does: headless
# Chromium (Debian package `chromium`) takes a screenshot of DIR/report.html
# and this fails if the page did not render (no file, or a near-empty one).
#   scripts/render-report.sh compare-report [OUT.png]
set -euo pipefail
dir=${1:?usage: $0 REPORT_DIR [OUT.png]}
out=${2:-$dir/report.png}
html=$(realpath "$dir/report.html")
command -v chromium >/dev/null || { echo "render-report: no chromium (apt-get install chromium)" >&2; exit 1; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# The flags keep Chromium off the network (this machine has none) and out
# of the user's profile.
timeout 60 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$profile" --hide-scrollbars --window-size=1200,1900 \
    --screenshot="$out" "file://$html" >/dev/null 2>&1
size=$(stat -c %s "$out" 2>/dev/null || echo 0)
# A blank 1200x1900 page compresses to a few KB; charts take well over 50 KB.
if [ "$size" -lt 50000 ]; then
    echo "render-report: $out is $size bytes: the page did not render its charts" >&2
    exit 1
fi
echo "render-report: $out ($size bytes)"
