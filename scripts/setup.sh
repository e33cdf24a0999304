#!/usr/bin/env bash
# Install what building and testing segwlb needs, if it is missing:
#   - a wasm32 toolchain for the policies (rustup's target, or Debian's
#     rustc-web + rust-web-src + lld-19 where rustup cannot fetch targets);
#   - as root: iproute2 and ethtool, for the network-namespace tests of
#     `segwlb run` (without root those tests are skipped and need nothing);
#   - as root: strongSwan, keepalived and (unpacked into .tools/, see below)
#     libreswan's pluto, for the lab;
#   - clang and libbpf-dev, for the XDP fast path.
# Idempotent and quiet when everything is there. Never installs by hand what
# it could not name: when it cannot install, it says what to install.
#
# Options:
#   --polyglot  also install the toolchains for policies in Python and
#               JavaScript into .tools/ (see the section at the end).
set -euo pipefail

say() { printf 'setup: %s\n' "$*" >&2; }

# ---- options -----------------------------------------------------------------
POLYGLOT=0
for arg in "$@"; do
    case "$arg" in
        --polyglot) POLYGLOT=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            say "unknown option $arg (try --help)"
            exit 2
            ;;
    esac
done
# -----------------------------------------------------------------------------

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
    # `segwlb lab` and its tests: strongSwan charons (kernel-libipsec is in
    # libcharon-extra-plugins), swanctl, nft for the NAT namespace, ping.
    [ -x /usr/lib/ipsec/charon ] || missing+=(strongswan-charon)
    command -v swanctl >/dev/null || missing+=(strongswan-swanctl)
    [ -e /usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so ] || missing+=(libcharon-extra-plugins)
    command -v nft >/dev/null || missing+=(nftables)
    command -v ping >/dev/null || missing+=(iputils-ping)
    # A pair of balancers in the lab (`lab.balancers = 2`): keepalived's
    # VRRP decides which one is active.
    [ -x /usr/sbin/keepalived ] || missing+=(keepalived)
    if [ ${#missing[@]} -gt 0 ]; then
        if can_apt; then
            apt_install "${missing[@]}"
        else
            say "the network-namespace tests and the lab need: ${missing[*]}"
        fi
    fi
fi

# libreswan's pluto for the lab's second IKE stack, in .tools/libreswan.
# Debian's `libreswan` package Conflicts with strongswan-libcharon and
# strongswan-starter (both ship an `ipsec` command), so it is never installed
# beside the charons: its libraries come from apt, its .deb is unpacked with
# `dpkg -x` into .tools/libreswan, and the lab runs pluto from there in a
# mount namespace of its own (lab/libreswan.rs).
if [ "$(id -u)" -eq 0 ]; then
    lsw=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.tools/libreswan
    if [ ! -x "$lsw/usr/libexec/ipsec/pluto" ] || ! "$lsw/usr/libexec/ipsec/pluto" --version >/dev/null 2>&1; then
        if can_apt; then
            apt_install libnss3-tools libunbound8 libldns3 libevent-core-2.1-7 \
                libevent-pthreads-2.1-7 libcurl3-nss libcap-ng0 libaudit1
            scratch=$(mktemp -d)
            say "apt-get download libreswan; dpkg -x into .tools/libreswan"
            (cd "$scratch" && apt-get download -qq -o APT::Sandbox::User=root libreswan >/dev/null)
            rm -rf "$lsw" && mkdir -p "$lsw"
            dpkg -x "$scratch"/libreswan_*.deb "$lsw"
            rm -rf "$scratch"
            "$lsw/usr/libexec/ipsec/pluto" --version >/dev/null 2>&1 ||
                { say "pluto from .tools/libreswan does not run"; exit 1; }
        else
            say "the lab's libreswan needs: apt-get download libreswan, unpacked into .tools/libreswan"
        fi
    fi
fi

# The XDP fast path (host/xdp/fastpath.c) is C for the kernel's BPF target:
# clang compiles it, libbpf-dev has the helpers' declarations. Without them
# the host still builds, and runs on AF_PACKET alone.
if ! command -v clang >/dev/null || [ ! -e /usr/include/bpf/bpf_helpers.h ]; then
    if can_apt; then
        apt_install clang libbpf-dev
    else
        say "the XDP fast path needs: clang libbpf-dev (without them segwlb runs on AF_PACKET alone)"
    fi
fi

# ==== --polyglot: toolchains for policies in Python and JavaScript ============
# Into .tools/ at the repo root (git-ignored), never system-wide:
#   .tools/venv   a Python venv with componentize-py;
#   .tools/node   npm packages componentize-js (and its engine) and jco.
# Exact versions, so every machine builds the same components; bump them here
# (and re-run) to upgrade. scripts/build-polyglot.sh and `segwlb policy build`
# use these. Needs python3 with venv and Node >= 18 with npm: as root on
# Debian they are installed from apt when missing (Debian 12: python3-venv,
# nodejs 18, npm).
if [ "$POLYGLOT" -eq 1 ]; then
    COMPONENTIZE_PY_VERSION=0.25.1
    COMPONENTIZE_JS_VERSION=0.23.0
    JCO_VERSION=1.35.0

    tools=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.tools
    mkdir -p "$tools"

    # -- Python: componentize-py in .tools/venv --
    venv=$tools/venv
    have_componentize_py() {
        [ -x "$venv/bin/componentize-py" ] &&
            [ "$("$venv/bin/componentize-py" --version 2>/dev/null)" = "componentize-py $COMPONENTIZE_PY_VERSION" ]
    }
    if ! have_componentize_py; then
        if ! command -v python3 >/dev/null; then
            if can_apt; then apt_install python3 python3-venv; else
                say "python3 not found: install python3 (with its venv module)"
                exit 1
            fi
        fi
        # A venv that no longer runs (its python was removed) is rebuilt.
        if ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
            rm -rf "$venv"
            if ! python3 -m venv "$venv" >/dev/null 2>&1; then
                rm -rf "$venv"
                # Debian's python3 has venv without ensurepip until
                # python3-venv (python3.X-venv) is installed.
                if can_apt; then
                    apt_install python3-venv
                    python3 -m venv "$venv" >/dev/null
                else
                    say "python3 -m venv failed: install your distribution's python3-venv"
                    exit 1
                fi
            fi
        fi
        say "pip install componentize-py==$COMPONENTIZE_PY_VERSION into .tools/venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            "componentize-py==$COMPONENTIZE_PY_VERSION"
        have_componentize_py || {
            say "componentize-py $COMPONENTIZE_PY_VERSION did not install into $venv"
            exit 1
        }
    fi

    # -- JavaScript: componentize-js and jco in .tools/node --
    node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        if can_apt; then
            # Only what is missing: a Node from elsewhere (NodeSource) bundles
            # npm, and Debian's npm would try to replace it.
            missing=()
            command -v node >/dev/null || missing+=(nodejs)
            command -v npm >/dev/null || missing+=(npm)
            apt_install "${missing[@]}"
        else
            say "node and npm not found: install Node.js >= 18 with npm"
            exit 1
        fi
    fi
    if [ "$(node_major)" -lt 18 ]; then
        say "Node.js $(node --version) is too old for componentize-js: install Node.js >= 18"
        exit 1
    fi
    node_dir=$tools/node
    npm_version_of() {
        node -p "require('$node_dir/node_modules/$1/package.json').version" 2>/dev/null || true
    }
    if [ "$(npm_version_of @bytecodealliance/componentize-js)" != "$COMPONENTIZE_JS_VERSION" ] ||
        [ "$(npm_version_of @bytecodealliance/jco)" != "$JCO_VERSION" ] ||
        [ ! -x "$node_dir/node_modules/.bin/componentize-js" ] ||
        [ ! -x "$node_dir/node_modules/.bin/jco" ]; then
        say "npm install componentize-js@$COMPONENTIZE_JS_VERSION jco@$JCO_VERSION into .tools/node"
        mkdir -p "$node_dir"
        npm install --prefix "$node_dir" --save-exact --no-audit --no-fund --loglevel=error \
            "@bytecodealliance/componentize-js@$COMPONENTIZE_JS_VERSION" \
            "@bytecodealliance/jco@$JCO_VERSION" >/dev/null
    fi
fi
