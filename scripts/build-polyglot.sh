#!/usr/bin/env bash
# Build the Python and JavaScript policies of examples/policies/ with the
# toolchains `scripts/setup.sh --polyglot` installs in .tools/:
#
#   scripts/build-polyglot.sh [--force] [NAME...]
#
# - the examples (py-round-robin, js-consistent-hash) into policies/NAME.wasm,
#   through `segwlb policy build` (as a user builds a policy), which also
#   checks the component against the contract and warms the compiled-policy
#   cache;
# - the hostile guests of the tests (py-hostile, js-hostile) into
#   target/polyglot/, never into policies/ (a `compare` of every policy must
#   not pick them up).
#
# A component newer than its sources and the contract is skipped unless
# --force. One line per policy: its size and how long the build took.
# SEGWLB names the segwlb binary (default: target/debug/segwlb, which
# `cargo build` makes).
#
# The examples import WASI 0.2 as their toolchains make them (CPython's and
# SpiderMonkey's runtimes do, whether a policy uses it or not); the host
# links it granting nothing. Only HTTP is left out of the JavaScript build:
# no policy may import wasi:http. The JavaScript hostile guest has its own
# world (js-hostile/wit/hostile.wit), importing the WASI interfaces it calls
# directly, beside the contract.
set -euo pipefail

say() { printf 'build-polyglot: %s\n' "$*" >&2; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools=$root/.tools
segwlb=${SEGWLB:-$root/target/debug/segwlb}
componentize_py=$tools/venv/bin/componentize-py
componentize_js=$tools/node/node_modules/.bin/componentize-js
jco_wit=$tools/node/node_modules/@bytecodealliance/jco/lib/wit/builtin/0.2.12
contract=$root/wit/policy.wit
examples=$root/examples/policies
scratch=$tools/scratch

# NAME LANG DIR: the source in examples/policies/NAME, the output in DIR.
POLICIES=(
    "py-round-robin py $root/policies"
    "js-consistent-hash js $root/policies"
    "py-hostile py $root/target/polyglot"
    "js-hostile js $root/target/polyglot"
)

force=0
wanted=()
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        -*)
            say "unknown option $arg (try --help)"
            exit 2
            ;;
        *) wanted+=("$arg") ;;
    esac
done

known=""
for entry in "${POLICIES[@]}"; do
    read -r name _ _ <<<"$entry"
    known+=" $name"
done
for name in "${wanted[@]}"; do
    if [[ " $known " != *" $name "* ]]; then
        say "no policy $name; known:$known"
        exit 2
    fi
done

[ -x "$componentize_py" ] || { say "no componentize-py in .tools/venv: run scripts/setup.sh --polyglot"; exit 1; }
[ -x "$componentize_js" ] || { say "no componentize-js in .tools/node: run scripts/setup.sh --polyglot"; exit 1; }
[ -x "$segwlb" ] || { say "no segwlb binary at $segwlb: run cargo build (or set SEGWLB)"; exit 1; }

# Is $1 newer than every file in the rest of the arguments?
up_to_date() {
    local target=$1
    shift
    [ -f "$target" ] || return 1
    local f
    for f in "$@"; do
        [ "$target" -nt "$f" ] || return 1
    done
}

# The JS hostile world: its own WIT plus the contract and the WASI 0.2.12
# packages that jco ships, as one WIT directory.
assemble_hostile_wit() {
    local dir=$scratch/js-hostile-wit p
    rm -rf "$dir"
    mkdir -p "$dir/deps/segwlb-policy"
    cp "$examples/js-hostile/wit/hostile.wit" "$dir/"
    cp "$contract" "$dir/deps/segwlb-policy/"
    for p in cli clocks filesystem io random sockets; do
        mkdir -p "$dir/deps/wasi-$p"
        cp "$jco_wit/wasi-$p/package.wit" "$dir/deps/wasi-$p/"
    done
    printf '%s\n' "$dir"
}

build_one() {
    local name=$1 lang=$2 dir=$3
    local out=$dir/$name.wasm tmp=$dir/.$name.wasm.tmp log=$scratch/$name.log
    local deps
    mapfile -t deps < <(find "$examples/$name" -type f \( -name '*.py' -o -name '*.js' -o -name '*.wit' \) \
        ! -path '*/__pycache__/*' ! -name 'check.mjs' | sort)
    deps+=("$contract")
    if [ "$force" -eq 0 ] && up_to_date "$out" "${deps[@]}"; then
        printf '%-20s up to date  %10d bytes\n' "$name" "$(stat -c %s "$out")"
        return 0
    fi
    mkdir -p "$scratch" "$dir"
    rm -f "$tmp"
    local start status=0
    start=$(date +%s.%N)
    case "$name" in
        py-hostile)
            "$componentize_py" -q -d "$root/wit" -w policy componentize \
                -p "$examples/$name" app -o "$tmp" >"$log" 2>&1 || status=$?
            ;;
        js-hostile)
            "$componentize_js" "$examples/$name/policy.js" -w "$(assemble_hostile_wit)" -n hostile \
                -d http fetch-event -o "$tmp" >"$log" 2>&1 || status=$?
            ;;
        *)
            "$segwlb" policy build "$examples/$name" -o "$tmp" >"$log" 2>&1 || status=$?
            ;;
    esac
    if [ "$status" -ne 0 ] || [ ! -s "$tmp" ]; then
        rm -f "$tmp"
        say "$name: build failed (exit $status):"
        cat "$log" >&2
        return 1
    fi
    # Renamed into place, so a watching segwlb never sees half a file.
    mv -f "$tmp" "$out"
    printf '%-20s built       %10d bytes  %6.1f s  %s\n' "$name" "$(stat -c %s "$out")" \
        "$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')" "${out#"$root"/}"
}

failed=0
for entry in "${POLICIES[@]}"; do
    read -r name lang dir <<<"$entry"
    if [ ${#wanted[@]} -gt 0 ] && [[ " ${wanted[*]} " != *" $name "* ]]; then
        continue
    fi
    build_one "$name" "$lang" "$dir" || failed=1
done
exit "$failed"
