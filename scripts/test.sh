#!/usr/bin/env bash
# Every test segwlb has: install what is missing, check formatting and lints,
# build the policies (host/build.rs) and run both workspaces' tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# --polyglot: componentize-py and componentize-js too, for the Python and
# JavaScript policies and their tests.
scripts/setup.sh --polyglot

cargo fmt --all -- --check
(cd plugins && cargo fmt --all -- --check)

# The host build compiles every plugin to policies/*.wasm first.
cargo clippy --workspace --all-targets -- -D warnings
# Native tests of the policies, in plugins/target: sharing the host's target
# dir makes both workspaces build segwlb-policy-sdk under one name from
# different paths, and the next host build sees two versions of it.
(cd plugins && cargo clippy --workspace --all-targets -- -D warnings)
(cd plugins && cargo test --workspace)
# The Python and JavaScript policies (examples/policies/) through
# `segwlb policy build`, and the hostile guests of tests/polyglot.rs; their
# tests must then run, not skip.
# `cargo test --no-run` builds the segwlb binary as the tests use it (with
# the dev-dependencies' features), so the test run below builds nothing
# again; a plain `cargo build` here cost CI a second build of the crate.
cargo test --workspace --no-run
scripts/build-polyglot.sh
# The JavaScript consistent hash's 64-bit arithmetic, against values from
# an independent Python port of the Rust hashes.
node examples/policies/js-consistent-hash/check.mjs
export SEGWLB_REQUIRE_POLYGLOT=1
# As root the network-namespace tests (tests/live_netns.rs) must run, not
# skip: setup.sh installed what they need.
if [ "$(id -u)" -eq 0 ]; then
    export SEGWLB_REQUIRE_NETNS=1
    # With the XDP fast path required, so a kernel or build that cannot
    # load it fails here instead of passing on AF_PACKET alone ...
    export SEGWLB_TEST_FAST_PATH=xdp
fi
cargo test --workspace
if [ "$(id -u)" -eq 0 ]; then
    # ... and again without it: the same behaviour both ways. The lab
    # compare of every policy on 300 tunnels (failure, recovery, hot swap,
    # rebalance, churn, predicted exactly) takes five minutes and runs
    # once, with the fast path; the capacity compare (37 s) runs both ways.
    SEGWLB_TEST_FAST_PATH=off cargo test -p segwlb --test live_netns --test lab_strongswan \
        -- --skip lab_compare_is_predicted_exactly
fi
