#!/usr/bin/env bash
# Install what building and testing segwlb needs, if it is missing:
#   - a wasm32 toolchain for the policies (rustup's target, or Debian's
#     rustc-web + rust-web-src + lld-19 where rustup cannot fetch targets);
#   - as root: iproute2 and ethtool, for the network-namespace tests of
#     `segwlb run` (without root those tests are skipped and need nothing).
# Idempotent and quiet when everything is there. Never installs by hand what
# it could not name: when it cannot install, it says what to install.
set -euo pipefail

say() { printf 'setup: %s\n' "$*" >&2; }

have_rustup_wasm() {
    local libdir
    libdir=$(rustc --print target-libdir --target wasm32-unknown-unknown 2>/dev/null) || return 1
    compgen -G "$libdir/libstd-*.rlib" >/dev/null
}

have_debian_wasm() {
    [ -x /usr/bin/rustc ] || return 1
    [ -d "$(/usr/bin/rustc --print sysroot)/lib/rustlib/src/rust/library/std" ] || return 1
    compgen -G "/usr/lib/llvm-*/bin/wasm-ld" >/dev/null || command -v wasm-ld >/dev/null
}

can_apt() { [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; }

apt_update() {
    if [ -z "${SEGWLB_APT_UPDATED:-}" ]; then
        say "apt-get update"
        apt-get update -qq >/dev/null
        export SEGWLB_APT_UPDATED=1
    fi
}

apt_install() {
    apt_update
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# No pipe into `grep -q` here: under pipefail, grep's early exit kills
# apt-cache with SIGPIPE and the test fails although the package exists.
apt_has() { [[ "$(apt-cache policy "$1" 2>/dev/null)" == *"Candidate: "[0-9]* ]]; }

if ! command -v cargo >/dev/null; then
    say "cargo not found: install Rust (https://rustup.rs) first"
    exit 1
fi

if have_rustup_wasm || have_debian_wasm; then
    :
else
    # Where we are root on Debian and the packages exist, they are the route
    # that works offline from rustup's servers; elsewhere, rustup's target.
    if can_apt; then
        apt_update
        if apt_has rustc-web && apt_has rust-web-src && apt_has lld-19; then
            apt_install rustc-web rust-web-src lld-19
        fi
    fi
    if ! have_debian_wasm && command -v rustup >/dev/null; then
        say "rustup target add wasm32-unknown-unknown"
        timeout 120 rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || true
    fi
    if ! have_rustup_wasm && ! have_debian_wasm; then
        say "no wasm32 toolchain for the policies. Install one of:"
        say "  rustup target add wasm32-unknown-unknown"
        say "  apt-get install rustc-web rust-web-src lld-19   (Debian, when rustup cannot fetch targets)"
        exit 1
    fi
fi

# The live tests build network namespaces: as root they run, and need ip(8)
# and ethtool(8); the lab also needs strongSwan, nft and ping.
if [ "$(id -u)" -eq 0 ]; then
    missing=()
    command -v ip >/dev/null || missing+=(iproute2)
    command -v ethtool >/dev/null || missing+=(ethtool)
    # `segwlb lab` and its test: strongSwan charons (kernel-libipsec is in
    # libcharon-extra-plugins), swanctl, nft for the NAT namespace, ping.
    [ -x /usr/lib/ipsec/charon ] || missing+=(strongswan-charon)
    command -v swanctl >/dev/null || missing+=(strongswan-swanctl)
    [ -e /usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so ] || missing+=(libcharon-extra-plugins)
    command -v nft >/dev/null || missing+=(nftables)
    command -v ping >/dev/null || missing+=(iputils-ping)
    if [ ${#missing[@]} -gt 0 ]; then
        if can_apt; then
            apt_install "${missing[@]}"
        else
            say "the network-namespace tests and the lab need: ${missing[*]}"
        fi
    fi
fi
