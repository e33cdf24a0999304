#!/usr/bin/env bash
# Every test segwlb has: install what is missing, check formatting and lints,
# build the policies (host/build.rs) and run both workspaces' tests.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

cargo fmt --all -- --check
(cd plugins && cargo fmt --all -- --check)

# The host build compiles every plugin to policies/*.wasm first.
cargo clippy --workspace --all-targets -- -D warnings
# Native tests of the policies, in the host's target dir (same toolchain).
(cd plugins && cargo clippy --workspace --all-targets --target-dir ../target -- -D warnings)
(cd plugins && cargo test --workspace --target-dir ../target)
cargo test --workspace
