#!/usr/bin/env bash
# Capture real strongSwan (and libreswan) IKEv2 / ESP-in-UDP traffic as test
# fixtures.
#
#   scripts/capture-fixtures.sh [SCENARIO|all]...                 (default: all)
#
# Builds network namespaces with one strongSwan charon each (kernel-libipsec,
# so no kernel ESP is needed; ESP is always UDP-encapsulated on 4500), brings
# a PSK IKEv2 tunnel up, pings through it, rekeys the CHILD_SA and the IKE_SA,
# idles long enough for DPD (and NAT keepalives behind the NAT), terminates,
# and captures everything on the responder's ("segw") interface:
#
#   direct   init ──veth── resp                      tests/fixtures/strongswan-direct.pcap
#   nat      init ──veth── nat (masquerade) ──veth── resp
#                                                    tests/fixtures/strongswan-nat.pcap
#   steered  as direct, the responder with spi_mask/spi_label/spi_min/spi_max
#                                                    tests/fixtures/strongswan-steered.pcap
#   multi    experiment, no fixture: one initiator charon, 3 connections bound
#            to 3 local addresses (local_addrs), against one responder.
#
# The same with libreswan's pluto (4.x) as the initiator against the same
# charon segw:
#
#   libreswan-direct   as direct      tests/fixtures/libreswan-direct.pcap
#   libreswan-nat      as nat         tests/fixtures/libreswan-nat.pcap
#   libreswan-nofloat  as direct, the segw without kernel-libipsec (so it
#                      fakes no NAT and pluto never leaves port 500)
#                                     tests/fixtures/libreswan-nofloat.pcap
#   libreswan-nochild  as direct, without the childless workaround (below):
#                      pluto's fail-and-revive cycle
#                                     tests/fixtures/libreswan-nochild.pcap
#   libreswan-rebind   as nat, but: IKE_SA_INIT, IKE_AUTH, then idle until
#                      the NAT's UDP mapping has expired (conntrack UDP
#                      timeouts shortened in the NAT namespace), a liveness
#                      from pluto that now leaves from a NEW NAT source port
#                      (same IKE SA), the segw's answer there, pluto's DELETE
#                                     tests/fixtures/libreswan-rebind.pcap
#   libreswan-idle     experiment, no fixture: a childless IKE_SA behind the
#                      NAT left alone for 45 s: no liveness, no keepalive, so
#                      the NAT's UDP mapping (30 s) expires and pluto's final
#                      DELETE comes from a new NAT source port
#   libreswan-noanswer experiment, no fixture: the segw's answers dropped;
#                      pluto's retransmits, timeout and revival (~80 s)
#
#   all      direct nat steered libreswan-direct libreswan-nat
#            libreswan-nofloat libreswan-nochild libreswan-rebind
#
# libreswan has no userland ESP and this kernel has no ESP, so pluto cannot
# install a CHILD_SA: it establishes the IKE_SA, fails the kernel SA ("Add SA
# esp...: Function not implemented"), deletes the IKE_SA without telling the
# peer and revives the connection (libreswan-nochild captures just that).
# The other libreswan scenarios therefore run *childless*: `whack --impair
# omit-v2-ike-auth-child` makes pluto send IKE_AUTH without SA/TS payloads and
# the IKE_SA stands on its own (charon accepts it); no ESP at all. Their
# exchange (lsw_exchange): IKE_SA_INIT, IKE_AUTH, liveness (pluto), DPD (the
# segw), IKE_SA rekey (pluto), DPD (the segw), liveness (pluto), DPD (the
# segw), delete (pluto); behind the NAT two NAT keepalives. pluto runs
# liveness only for CHILD_SAs and, on a childless IKE_SA, sends no NAT
# keepalives, so its liveness and keepalives are triggered with whack
# --impair (initiate-v2-liveness, send-keepalive), which call the same code as
# its timers.
#
# Needs root, iproute2, ethtool, nftables, tcpdump, strongswan-charon,
# strongswan-swanctl, libcharon-extra-plugins (kernel-libipsec); for the
# libreswan scenarios also libreswan 4.x unpacked under LIBRESWAN_ROOT (pluto,
# whack, addconn in LIBRESWAN_ROOT/usr/libexec/ipsec; its runtime libraries
# installed) and certutil (libnss3-tools). Everything it creates (namespaces,
# veths inside them, charon, pluto and tcpdump processes, a work directory) is
# removed on exit, also on failure. Addresses are documentation
# / private ranges that exist only inside its namespaces.
#
# Environment: OUT_DIR (default tests/fixtures of this repository),
# NS_PREFIX (default sgwcap-), KEEP_WORK=1 to keep the work directory (logs,
# configurations) for inspection, LIBRESWAN_ROOT (default .tools/libreswan of
# this repository: a libreswan tree, Debian's .deb extracted there by
# scripts/setup.sh; the package cannot be installed beside strongSwan's),
# LSW_PLUTODEBUG (pluto's plutodebug=, default none), LSW_DPDDELAY (2),
# LSW_KEEPALIVE (2), LSW_NOCHILD_SECS (17), LSW_IDLE_SECS (45),
# LSW_NOANSWER_SECS (75), LSW_REBIND_UDP_TIMEOUT (3), LSW_REBIND_IDLE_SECS (5).
set -euo pipefail

say() { printf 'capture: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT_DIR:-$REPO/tests/fixtures}
NS_PREFIX=${NS_PREFIX:-sgwcap-}
CHARON=${CHARON:-/usr/lib/ipsec/charon}
LIBRESWAN_ROOT=${LIBRESWAN_ROOT:-$REPO/.tools/libreswan}
LSW_LIBEXEC=$LIBRESWAN_ROOT/usr/libexec/ipsec
PLUTO=$LSW_LIBEXEC/pluto
WHACK=$LSW_LIBEXEC/whack
ADDCONN=$LSW_LIBEXEC/addconn

NS_INIT=${NS_PREFIX}init
NS_RESP=${NS_PREFIX}resp
NS_NAT=${NS_PREFIX}nat

# Addresses and MACs (fixed, so the fixtures are predictable).
VIP=192.0.2.10                 # the segw's outer address
MAC_RESP=02:00:00:99:02:0a     # resp r0
INIT_DIRECT=192.0.2.100        # initiator outer address, direct/steered
MAC_INIT=02:00:00:99:01:64     # init i0
INIT_NATTED=198.51.100.2       # initiator outer address behind the NAT
MAC_INIT_NAT=02:00:00:99:01:02 # init i0 (nat topology)
NAT_IN=198.51.100.1            # nat n0 (initiator side)
MAC_NAT_IN=02:00:00:99:03:01
NAT_OUT=192.0.2.20             # nat n1 (segw side): the address the segw sees
MAC_NAT_OUT=02:00:00:99:03:14
NAT_PORTS=40000-40999          # masquerade rewrites UDP source ports into this
INNER_INIT=10.200.0.1          # initiator inner address (local_ts /32)
INNER_RESP=10.201.0.1          # segw inner address, local_ts 10.201.0.0/24
MULTI_ADDRS=(192.0.2.101 192.0.2.102 192.0.2.103)
MULTI_INNER=(10.200.0.1 10.200.0.2 10.200.0.3)

# SPI steering of the "steered" responder: segw 3 in the balancer's tests
# (IKE SPI top byte 0x03, ESP SPIs 0xc3000000..0xc3ffffff).
STEER_SPI_MASK=0xff00000000000000
STEER_SPI_LABEL=0x0300000000000000
STEER_SPI_MIN=0xc3000000
STEER_SPI_MAX=0xc3ffffff

PSK=segwlb-fixture-psk-not-a-secret

# libreswan timers. pluto's two have no effect on a childless IKE_SA (see
# lsw_liveness, lsw_keepalive); they are set for the nochild scenario and in
# case a later libreswan acts on them.
LSW_DPDDELAY=${LSW_DPDDELAY:-2}    # conn dpddelay: liveness interval (CHILD_SAs only)
LSW_KEEPALIVE=${LSW_KEEPALIVE:-2}  # config setup keep-alive: NAT-T keepalive interval
LSW_SEGW_DPD=3s     # the segw's dpd_delay in the childless scenarios: its DPD
                    # fires after 3 s without a message from pluto
# libreswan-rebind: conntrack's UDP timeouts (both, unreplied and "stream")
# in the NAT namespace only (they are per netns; the default 30 s would make
# the run last 40 s), and the idle time after IKE_AUTH, which must exceed it.
LSW_REBIND_UDP_TIMEOUT=${LSW_REBIND_UDP_TIMEOUT:-3}
LSW_REBIND_IDLE_SECS=${LSW_REBIND_IDLE_SECS:-5}

WORK=
PIDS=()        # charon and tcpdump processes we started
CREATED_NS=()  # namespaces we created

cleanup() {
    local rc=$? pid ns i
    set +e
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for i in $(seq 30); do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    for ns in "${CREATED_NS[@]}"; do
        # Anything still running in a namespace we made is ours (a ping, ...).
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    PIDS=(); CREATED_NS=()
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "${KEEP_WORK:-0}" = 1 ]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

need() { command -v "$1" >/dev/null || die "missing $1 (apt-get install -y $2)"; }

preflight() { # SCENARIO...
    [ "$(id -u)" -eq 0 ] || die "must run as root"
    local w lsw=0
    for w in "$@"; do case $w in libreswan-*) lsw=1 ;; esac; done
    if [ "$lsw" = 1 ]; then
        local b
        for b in "$PLUTO" "$WHACK" "$ADDCONN"; do
            [ -x "$b" ] || die "missing $b (libreswan 4.x unpacked under LIBRESWAN_ROOT=$LIBRESWAN_ROOT)"
        done
        if ldd "$PLUTO" 2>/dev/null | grep -q "not found"; then
            die "pluto's libraries are missing: $(ldd "$PLUTO" | grep 'not found' | tr -s ' \t' ' ')"
        fi
        need certutil libnss3-tools
        [ -d /usr/libexec ] || die "/usr/libexec missing (pluto's tree is bind-mounted over it)"
    fi
    need ip iproute2; need ethtool ethtool; need nft nftables
    need tcpdump tcpdump; need swanctl strongswan-swanctl
    [ -x "$CHARON" ] || die "missing $CHARON (apt-get install -y strongswan-charon)"
    compgen -G "/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so" >/dev/null ||
        die "missing kernel-libipsec (apt-get install -y libcharon-extra-plugins)"
    [ -c /dev/net/tun ] || die "kernel-libipsec needs /dev/net/tun"
    local ns
    for ns in "$NS_INIT" "$NS_RESP" "$NS_NAT"; do
        if ip netns list | awk '{print $1}' | grep -qx "$ns"; then
            die "namespace $ns exists already (a run of someone else? set NS_PREFIX)"
        fi
    done
}

# ---------------------------------------------------------------- topology

mkns() {
    ip netns add "$1"
    CREATED_NS+=("$1")
    ip -n "$1" link set lo up
    # No IPv6 chatter (RS, MLD, DAD) in the captures.
    ip netns exec "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
}

# veth NS_A IF_A MAC_A NS_B IF_B MAC_B: a veth pair made directly inside the
# two namespaces (never visible in the host namespace), TX checksum offload
# off on both ends (else the captured UDP checksums are wrong/partial).
veth() {
    ip link add "$2" netns "$1" address "$3" type veth peer name "$5" netns "$4" address "$6"
    ip netns exec "$1" ethtool -K "$2" tx off >/dev/null
    ip netns exec "$4" ethtool -K "$5" tx off >/dev/null
    ip -n "$1" link set "$2" up
    ip -n "$4" link set "$5" up
}

inner() { # NS ADDR: the inner (traffic selector) address, a /32 on lo
    # (this kernel has no dummy interfaces).
    ip -n "$1" addr add "$2/32" dev lo
}

topo_direct() {
    mkns "$NS_INIT"; mkns "$NS_RESP"
    veth "$NS_INIT" i0 "$MAC_INIT" "$NS_RESP" r0 "$MAC_RESP"
    ip -n "$NS_INIT" addr add "$INIT_DIRECT/24" dev i0
    ip -n "$NS_RESP" addr add "$VIP/24" dev r0
    inner "$NS_INIT" "$INNER_INIT"
    inner "$NS_RESP" "$INNER_RESP"
}

topo_nat() {
    mkns "$NS_INIT"; mkns "$NS_NAT"; mkns "$NS_RESP"
    veth "$NS_INIT" i0 "$MAC_INIT_NAT" "$NS_NAT" n0 "$MAC_NAT_IN"
    veth "$NS_NAT" n1 "$MAC_NAT_OUT" "$NS_RESP" r0 "$MAC_RESP"
    ip -n "$NS_INIT" addr add "$INIT_NATTED/24" dev i0
    ip -n "$NS_INIT" route add default via "$NAT_IN"
    ip -n "$NS_NAT" addr add "$NAT_IN/24" dev n0
    ip -n "$NS_NAT" addr add "$NAT_OUT/24" dev n1
    ip -n "$NS_RESP" addr add "$VIP/24" dev r0
    ip netns exec "$NS_NAT" sysctl -qw net.ipv4.ip_forward=1
    # Masquerade, forcing UDP source ports into NAT_PORTS so that both 500
    # and the 4500 the initiator floats to are visibly rewritten.
    ip netns exec "$NS_NAT" nft -f - <<EOF
table ip nat {
    chain post {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "n1" meta l4proto udp masquerade to :$NAT_PORTS
        oifname "n1" masquerade
    }
}
EOF
    inner "$NS_INIT" "$INNER_INIT"
    inner "$NS_RESP" "$INNER_RESP"
}

topo_multi() {
    topo_direct
    local a
    for a in "${MULTI_ADDRS[@]}"; do ip -n "$NS_INIT" addr add "$a/24" dev i0; done
    for a in "${MULTI_INNER[@]:1}"; do inner "$NS_INIT" "$a"; done
}

# ---------------------------------------------------------------- charon

# strongswan_conf NAME EXTRA: a self-contained strongswan.conf (no include of
# /etc/strongswan.d), an explicit plugin list, a private vici socket, a log.
STRONGSWAN_LOAD="random nonce openssl pem pkcs1 x509 pubkey hmac sha1 sha2 aes gmp kdf kernel-libipsec kernel-netlink socket-default vici"
strongswan_conf() { # NAME EXTRA [LOAD]
    local name=$1 extra=${2:-} load=${3:-$STRONGSWAN_LOAD}
    cat >"$WORK/$name/strongswan.conf" <<EOF
charon {
    # kernel-libipsec (userland ESP over a TUN device) before kernel-netlink,
    # which still does addresses and routes.
    load = $load
    port = 500
    port_nat_t = 4500
    install_routes = yes
    retransmit_timeout = 2.0
    retransmit_tries = 3
    keep_alive = 2s
$extra
    plugins {
        vici {
            socket = unix://$WORK/$name/charon.vici
        }
    }
    filelog {
        log {
            path = $WORK/$name/charon.log
            time_format = %H:%M:%S
            flush_line = yes
            default = 1
            ike = 2
            cfg = 2
            knl = 2
            esp = 2
        }
    }
}
EOF
}

# start_charon NS NAME: charon in namespace NS, its own /run (pid file) via a
# private mount namespace, configuration and vici socket in $WORK/NAME.
start_charon() {
    local ns=$1 name=$2 i
    ip netns exec "$ns" unshare -m sh -c \
        "mount -t tmpfs tmpfs /run && STRONGSWAN_CONF='$WORK/$name/strongswan.conf' exec '$CHARON'" \
        >"$WORK/$name/charon.out" 2>&1 &
    PIDS+=("$!")
    echo "$!" >"$WORK/$name/charon.pid"
    for i in $(seq 100); do
        if sw "$name" --stats >/dev/null 2>&1; then return 0; fi
        kill -0 "$!" 2>/dev/null || break
        sleep 0.1
    done
    cat "$WORK/$name/charon.out" "$WORK/$name/charon.log" >&2 2>/dev/null || true
    die "charon $name did not come up"
}

sw() { # NAME swanctl-args...
    local name=$1; shift
    STRONGSWAN_CONF=$WORK/swanctl-strongswan.conf swanctl "$@" --uri "unix://$WORK/$name/charon.vici"
}

# swanctl reads strongswan.conf too; without its own plugin list it complains
# about every default plugin Debian does not ship.
swanctl_conf() {
    cat >"$WORK/swanctl-strongswan.conf" <<EOF
swanctl {
    load = random openssl pem pkcs1 x509 pubkey
}
EOF
}

load_conf() {
    sw "$1" --load-all --file "$WORK/$1/swanctl.conf" >"$WORK/$1/load.out" 2>&1 ||
        { cat "$WORK/$1/load.out" >&2; die "swanctl --load-all failed for $1"; }
}

resp_swanctl() { # [EXTRA connection settings]
    cat >"$WORK/resp/swanctl.conf" <<EOF
connections {
    segw {
        version = 2
        local_addrs = $VIP
        remote_addrs = %any
        proposals = aes128-sha256-modp2048${1:+
        $1}
        local {
            auth = psk
            id = segw.example
        }
        remote {
            auth = psk
            id = %any
        }
        children {
            net {
                local_ts = 10.201.0.0/24
                remote_ts = 10.200.0.0/16
                esp_proposals = aes128gcm16
            }
        }
    }
}
secrets {
    ike-any {
        secret = "$PSK"
    }
}
EOF
}

# init_conn NAME LOCAL_ADDR INNER: one initiator connection.
init_conn() {
    cat <<EOF
    $1 {
        version = 2
        local_addrs = $2
        remote_addrs = $VIP
        proposals = aes128-sha256-modp2048
        dpd_delay = 5s
        local {
            auth = psk
            id = $1.init.example
        }
        remote {
            auth = psk
            id = segw.example
        }
        children {
            $1-net {
                local_ts = $3/32
                remote_ts = 10.201.0.0/24
                esp_proposals = aes128gcm16
            }
        }
    }
EOF
}

init_swanctl() { # CONN LOCAL INNER [CONN LOCAL INNER]...
    {
        echo "connections {"
        while [ $# -gt 0 ]; do init_conn "$1" "$2" "$3"; shift 3; done
        echo "}"
        echo "secrets {"
        echo "    ike-any {"
        echo "        secret = \"$PSK\""
        echo "    }"
        echo "}"
    } >"$WORK/init/swanctl.conf"
}

# ---------------------------------------------------------------- capture

TCPDUMP_PID=
start_capture() { # FILE
    ip netns exec "$NS_RESP" tcpdump -i r0 -s 0 -nn -U -w "$1" >"$WORK/tcpdump.out" 2>&1 &
    TCPDUMP_PID=$!
    PIDS+=("$TCPDUMP_PID")
    local i
    for i in $(seq 50); do
        grep -q "listening on" "$WORK/tcpdump.out" 2>/dev/null && return 0
        sleep 0.1
    done
    die "tcpdump did not start: $(cat "$WORK/tcpdump.out")"
}

stop_capture() {
    sleep 0.5
    kill -INT "$TCPDUMP_PID"
    wait "$TCPDUMP_PID" 2>/dev/null || true
    grep -E "captured|dropped" "$WORK/tcpdump.out" >&2 || true
}

ping_through() { # COUNT [SRC]
    ip netns exec "$NS_INIT" ping -n -q -c "$1" -i 0.2 -W 2 -I "${2:-$INNER_INIT}" "$INNER_RESP" >"$WORK/ping.out" ||
        { cat "$WORK/ping.out" >&2; die "ping through the tunnel failed"; }
    say "  $(grep -E 'packets transmitted' "$WORK/ping.out")"
}

now() { date +%s.%N; }

# The exchange every fixture holds.
exchange() {
    local t0 t1
    t0=$(now)
    sw init --initiate --child c1-net --timeout 30 >"$WORK/initiate.out" 2>&1 ||
        { cat "$WORK/initiate.out" "$WORK/init/charon.log" >&2; die "initiate failed"; }
    t1=$(now)
    say "  initiate took $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}') s"
    ping_through 3
    sw init --rekey --child c1-net >"$WORK/rekey-child.out" 2>&1 || die "child rekey failed"
    sleep 1
    ping_through 2
    sw init --rekey --ike c1 >"$WORK/rekey-ike.out" 2>&1 || die "IKE rekey failed"
    sleep 1
    ping_through 2
    # Idle: behind the NAT, keepalives (keep_alive 2s), then DPD (dpd_delay 5s).
    sleep 6
    sw init --list-sas >"$WORK/sas-init.txt"
    sw resp --list-sas >"$WORK/sas-resp.txt"
    sw resp --list-sas --raw >"$WORK/sas-resp-raw.txt"
    sw resp --list-sas --pretty >"$WORK/sas-resp-pretty.txt"
    sw init --terminate --ike c1 --timeout 10 >"$WORK/terminate.out" 2>&1 || die "terminate failed"
    sleep 1
}

# counts FILE: packets per kind; "to" = towards the segw ($VIP), "from" = from it.
# IKE: exchange, request/response (the R flag) and the flags as tcpdump
# prints them ([I] original initiator, [R] response, [IR] both; [] for a
# request of the original responder, e.g. the segw's DPD towards pluto).
counts() {
    tcpdump -r "$1" -nn 2>/dev/null | awk -v vip="$VIP" '
        { d = ($5 ~ "^" vip "\\.") ? "to  " : "from" }
        / ARP, / { n["ARP"]++; next }
        /keep-alive/ { n[d " NAT keepalive (0xff) on 4500"]++; next }
        /isakmp/ && match($0, /[a-z0-9_]+(\[[IVR]*\])?$/) {
            x = substr($0, RSTART, RLENGTH)
            if (index(x, "[")) { split(x, p, "["); e = p[1]; fl = p[2]; sub(/\]/, "", fl) } else { e = x; fl = "" }
            if (e == "ikev2_init") e = "IKE_SA_INIT"; else if (e == "ikev2_auth") e = "IKE_AUTH"
            else if (e == "child_sa") e = "CREATE_CHILD_SA"; else if (e == "inf2") e = "INFORMATIONAL"
            else { n[d " other: " $0]++; next }
            k = (fl ~ /R/) ? "response" : "request"
            port = ($0 ~ /NONESP-encap/) ? "4500 (non-ESP marker)" : "500"
            n[sprintf("%s %-15s %-8s [%s] on %s", d, e, k, fl, port)]++; next }
        /UDP-encap: ESP/ { n[d " ESP-in-UDP on 4500"]++; next }
        { n[d " other: " $0]++ }
        END { for (k in n) printf "  %4d  %s\n", n[k], k }' | sort -k2
}

# ike_spis FILE: "initiator-spi responder-spi" of every IKE message.
ike_spis() {
    tcpdump -r "$1" -nn -vv 2>/dev/null | grep -o 'cookie [0-9a-f]*->[0-9a-f]*' |
        sed 's/cookie //; s/->/ /'
}

# esp_spis FILE: "to|from spi" of every ESP-in-UDP packet.
esp_spis() {
    tcpdump -r "$1" -nn 2>/dev/null | awk -v vip="$VIP" '/UDP-encap: ESP/ {
        match($0, /spi=0x[0-9a-f]+/); print (($5 ~ "^" vip "\\.") ? "to" : "from"), substr($0, RSTART+4, RLENGTH-4) }'
}

summary() { # FILE
    local f=$1
    say "$(basename "$f"): $(stat -c %s "$f") bytes"
    tcpdump -r "$f" -nn -e 2>/dev/null | head -40
    echo "--- counts (to = towards the segw $VIP, from = from it)"
    counts "$f"
    echo "--- IKE SPIs (initiator->responder)"
    tcpdump -r "$f" -nn -vv 2>/dev/null | grep -o 'cookie [0-9a-f]*->[0-9a-f]*' | sort | uniq -c
    echo "--- ESP SPIs (outer src > dst)"
    tcpdump -r "$f" -nn -vv 2>/dev/null | awk '/UDP-encap: ESP/ { match($0, /spi=0x[0-9a-f]+/); s = substr($0, RSTART+4, RLENGTH-4); print "  " $1 " > " $3 " spi=" s }' |
        sed 's/://' | awk '{k=$0; c[k]++} END {for (k in c) print c[k], k}' | sort -k3
}

# verify NAME FILE: the capture holds what the tests rely on, else fail.
verify() {
    local name=$1 f=$2 c k i r spi
    c=$(counts "$f")
    for k in "to   IKE_SA_INIT     request  \[I\] on 500" "from IKE_SA_INIT     response \[R\] on 500" \
             "to   IKE_AUTH        request  \[I\] on 4500" "from IKE_AUTH        response \[R\] on 4500" \
             "to   CREATE_CHILD_SA request" "from CREATE_CHILD_SA response" \
             "to   INFORMATIONAL   request" "from INFORMATIONAL   response" \
             "to   ESP-in-UDP on 4500" "from ESP-in-UDP on 4500"; do
        grep -q "$k" <<<"$c" || die "$name: no '$k' in the capture"
    done
    if grep -q " other: " <<<"$c"; then die "$name: unexpected packets: $(grep ' other: ' <<<"$c")"; fi
    if [ "$name" = nat ]; then
        grep -q "to   NAT keepalive" <<<"$c" || die "nat: no NAT keepalive in the capture"
        # The segw must see the NAT's address and rewritten ports only.
        if tcpdump -r "$f" -nn 'udp and src host '"$NAT_OUT"' and (src port 500 or src port 4500)' 2>/dev/null | grep -q .; then
            die "nat: source ports were not rewritten"
        fi
    fi
    if [ "$name" = steered ]; then
        while read -r i r; do
            [ "$r" = 0000000000000000 ] && continue
            (( (16#$r & STEER_SPI_MASK) == STEER_SPI_LABEL )) ||
                die "steered: responder IKE SPI $r outside mask $STEER_SPI_MASK label $STEER_SPI_LABEL"
        done < <(ike_spis "$f")
        while read -r k spi; do
            [ "$k" = to ] || continue
            (( spi >= STEER_SPI_MIN && spi <= STEER_SPI_MAX )) ||
                die "steered: inbound ESP SPI $spi outside $STEER_SPI_MIN..$STEER_SPI_MAX"
        done < <(esp_spis "$f")
    fi
    say "  $name: verified"
}

# ---------------------------------------------------------------- scenarios

scenario() { # NAME TOPO EXTRA_RESP INIT_ADDR
    local name=$1 topo=$2 extra=$3 init_addr=$4 pcap
    CUR=$name
    say "== $name"
    mkdir -p "$WORK/init" "$WORK/resp"
    "$topo"
    strongswan_conf resp "$extra"
    strongswan_conf init ""
    resp_swanctl
    init_swanctl c1 "$init_addr" "$INNER_INIT"
    start_charon "$NS_RESP" resp
    start_charon "$NS_INIT" init
    load_conf resp; load_conf init
    pcap="$WORK/$name.pcap"
    start_capture "$pcap"
    exchange
    stop_capture
    verify "$name" "$pcap"
    install -m 0644 "$pcap" "$OUT_DIR/strongswan-$name.pcap"
    summary "$OUT_DIR/strongswan-$name.pcap"
    if [ "$name" = steered ]; then
        echo "--- responder strongswan.conf steering: mask $STEER_SPI_MASK label $STEER_SPI_LABEL, ESP $STEER_SPI_MIN..$STEER_SPI_MAX"
    fi
    teardown
}

teardown() {
    local pid ns
    sw init --terminate --ike c1 >/dev/null 2>&1 || true
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
    for ns in "${CREATED_NS[@]}"; do ip netns del "$ns"; done
    CREATED_NS=()
    # Keep each scenario's configurations and logs apart (for KEEP_WORK=1).
    mkdir -p "$WORK/logs-$CUR"
    mv "$WORK/init" "$WORK/resp" "$WORK/logs-$CUR/"
    mv "$WORK"/*.out "$WORK"/*.txt "$WORK/logs-$CUR/" 2>/dev/null || true
}

CUR=

run_multi() {
    CUR=multi
    say "== multi (one initiator charon, 3 connections, local_addrs ${MULTI_ADDRS[*]})"
    mkdir -p "$WORK/init" "$WORK/resp"
    topo_multi
    strongswan_conf resp ""
    strongswan_conf init ""
    resp_swanctl
    init_swanctl m1 "${MULTI_ADDRS[0]}" "${MULTI_INNER[0]}" \
                 m2 "${MULTI_ADDRS[1]}" "${MULTI_INNER[1]}" \
                 m3 "${MULTI_ADDRS[2]}" "${MULTI_INNER[2]}"
    start_charon "$NS_RESP" resp
    start_charon "$NS_INIT" init
    load_conf resp; load_conf init
    start_capture "$WORK/multi.pcap"
    local i t0 t1
    t0=$(now)
    for i in 1 2 3; do
        sw init --initiate --child "m$i-net" --timeout 30 >"$WORK/initiate-m$i.out" 2>&1 ||
            { cat "$WORK/initiate-m$i.out" >&2; die "initiate m$i failed"; }
    done
    t1=$(now)
    say "  3 initiates took $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}') s"
    for i in 0 1 2; do ping_through 2 "${MULTI_INNER[$i]}"; done
    stop_capture
    echo "--- initiator SAs"
    sw init --list-sas
    echo "--- responder SAs"
    sw resp --list-sas
    echo "--- outer source addresses seen by the responder"
    tcpdump -r "$WORK/multi.pcap" -nn 2>/dev/null | awk '$2 == "IP" {print $3}' | sort | uniq -c
    echo "--- initiator routes (table 220)"
    ip -n "$NS_INIT" route show table 220
    echo "--- memory (RSS kB) and threads"
    for i in init resp; do
        local pid; pid=$(cat "$WORK/$i/charon.pid")
        echo "  $i charon: $(ps -o rss=,nlwp= -p "$pid")"
    done
    sw init --terminate --ike m1 >/dev/null 2>&1 || true
    sw init --terminate --ike m2 >/dev/null 2>&1 || true
    sw init --terminate --ike m3 >/dev/null 2>&1 || true
    teardown
}

# ---------------------------------------------------------------- libreswan

# pluto_conf LEFT: ipsec.conf and ipsec.secrets of the libreswan initiator.
pluto_conf() {
    local d=$WORK/init
    cat >"$d/ipsec.conf" <<EOF
config setup
    logfile=$d/pluto.log
    logtime=yes
    plutodebug=${LSW_PLUTODEBUG:-none}
    keep-alive=$LSW_KEEPALIVE
conn c1
    ikev2=insist
    left=$1
    leftid=@c1.init.example
    leftsubnet=$INNER_INIT/32
    right=$VIP
    rightid=@segw.example
    rightsubnet=10.201.0.0/24
    authby=secret
    ike=aes128-sha2_256;modp2048
    esp=aes_gcm128
    dpddelay=$LSW_DPDDELAY
    auto=add
EOF
    echo "@c1.init.example @segw.example : PSK \"$PSK\"" >"$d/ipsec.secrets"
}

lsw() { # NAME whack-args...
    local name=$1; shift
    "$WHACK" --ctlsocket "$WORK/$name/run/pluto.ctl" "$@"
}

# start_pluto NS NAME: pluto in namespace NS, configuration, NSS database,
# control socket and logs in $WORK/NAME. pluto execs /usr/libexec/ipsec/addconn
# by absolute path, so the libreswan tree's libexec is bind-mounted over
# /usr/libexec in a private mount namespace (with its own /run too).
start_pluto() {
    local ns=$1 name=$2 d=$WORK/$2 i
    mkdir -p "$d/run" "$d/nss"
    certutil -N -d "sql:$d/nss" --empty-password >"$d/certutil.out" 2>&1 ||
        { cat "$d/certutil.out" >&2; die "certutil -N failed"; }
    ip netns exec "$ns" unshare -m sh -c \
        "mount -t tmpfs tmpfs /run && mount --bind '$LIBRESWAN_ROOT/usr/libexec' /usr/libexec && exec '$PLUTO' --config '$d/ipsec.conf' --secretsfile '$d/ipsec.secrets' --rundir '$d/run' --nssdir '$d/nss' --ipsecdir '$d' --dumpdir '$d/run' --nofork" \
        >"$d/pluto.out" 2>&1 &
    PIDS+=("$!")
    echo "$!" >"$d/pluto.pid"
    for i in $(seq 100); do
        if [ -S "$d/run/pluto.ctl" ] && lsw "$name" --status >/dev/null 2>&1; then break; fi
        kill -0 "$!" 2>/dev/null || break
        sleep 0.1
    done
    [ -S "$d/run/pluto.ctl" ] || { cat "$d/pluto.out" "$d/pluto.log" >&2 2>/dev/null; die "pluto $name did not come up"; }
    # pluto runs `addconn --autoall` itself on start-up; load the
    # connection by hand only if that did not happen.
    for i in $(seq 30); do
        lsw "$name" --status 2>/dev/null | grep -q '"c1":' && return 0
        sleep 0.1
    done
    ip netns exec "$ns" "$ADDCONN" --config "$d/ipsec.conf" --ctlsocket "$d/run/pluto.ctl" --autoall \
        >"$d/addconn.out" 2>&1 || { cat "$d/addconn.out" >&2; die "addconn failed"; }
    lsw "$name" --status 2>/dev/null | grep -q '"c1":' || die "pluto $name: connection c1 not loaded"
}

lsw_states() { # FILE
    lsw init --showstates >"$1" 2>&1 || true
}

# lsw_ike_serial: pluto's serial number (#N) of the established IKE SA.
lsw_ike_serial() {
    lsw init --showstates 2>/dev/null |
        sed -n 's/^[0-9]* #\([0-9]*\): "c1".* STATE_V2_ESTABLISHED_IKE_SA .*/\1/p' | tail -1
}

# lsw_liveness: make pluto run one IKEv2 liveness exchange (an empty
# INFORMATIONAL) on its IKE SA now. pluto schedules liveness (dpddelay) on
# CHILD_SAs only, so a childless IKE_SA never gets one by itself; this
# impairment calls the same code the liveness timer would.
lsw_liveness() {
    local sa
    sa=$(lsw_ike_serial)
    [ -n "$sa" ] || die "no established IKE SA for a liveness exchange"
    lsw init --impair "initiate-v2-liveness:$sa" >>"$WORK/liveness.out" 2>&1 ||
        { cat "$WORK/liveness.out" >&2; die "whack --impair initiate-v2-liveness:$sa failed"; }
}

# lsw_keepalive: make pluto send one NAT keepalive (1 byte 0xff to the
# peer's 4500) on its IKE SA now. pluto 4.10 sends none by itself on a
# childless IKE SA: its keepalive timer is first run right when the IKE SA is
# established, skips it ("recent message sent using the IKE SA": IKE_AUTH was
# sent < 20 s ago) and, as no state needed one, is never re-armed. The
# impairment calls the same sending code.
lsw_keepalive() {
    local sa
    sa=$(lsw_ike_serial)
    [ -n "$sa" ] || die "no established IKE SA for a keepalive"
    lsw init --impair "send-keepalive:$sa" >>"$WORK/keepalive.out" 2>&1 ||
        { cat "$WORK/keepalive.out" >&2; die "whack --impair send-keepalive:$sa failed"; }
}

lsw_initiate() { # [--asynchronous]
    local t0 t1
    t0=$(now)
    timeout 30 "$WHACK" --ctlsocket "$WORK/init/run/pluto.ctl" --initiate --name c1 "$@" >"$WORK/initiate.out" 2>&1 ||
        { cat "$WORK/initiate.out" "$WORK/init/pluto.log" >&2; die "initiate failed"; }
    t1=$(now)
    say "  initiate took $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}') s"
}

# The exchange of libreswan-direct / libreswan-nat / libreswan-nofloat
# (childless IKE_SA), t in seconds after IKE_AUTH:
#   0    IKE_SA_INIT, IKE_AUTH (pluto)
#   1    liveness, an empty INFORMATIONAL (pluto)
#   2.5  nat: NAT keepalive (pluto)
#   4    DPD, an empty INFORMATIONAL (the segw: dpd_delay 3s after the last
#        message it received)
#   6    IKE_SA rekey (pluto): CREATE_CHILD_SA; 1 s later (pluto waits) the
#        DELETE of the old IKE_SA, and `whack --rekey-ike` returns
#   9    DPD on the new IKE_SA (the segw: 3 s after the rekey)
#   10   liveness on the new IKE_SA (pluto); nat: 0.5 s later a keepalive
#   13   DPD on the new IKE_SA (the segw)
#   15   terminate (pluto): DELETE of the new IKE_SA
lsw_exchange() { # NAT(0|1)
    local nat=$1
    lsw init --impair omit-v2-ike-auth-child >"$WORK/impair.out" 2>&1 ||
        { cat "$WORK/impair.out" >&2; die "whack --impair omit-v2-ike-auth-child failed"; }
    lsw_initiate
    lsw_states "$WORK/states-1.txt"
    grep -q "STATE_V2_ESTABLISHED_IKE_SA" "$WORK/states-1.txt" ||
        { cat "$WORK/states-1.txt" "$WORK/init/pluto.log" >&2; die "no established IKE SA"; }
    sleep 1
    lsw_liveness
    sleep 1.5
    if [ "$nat" = 1 ]; then lsw_keepalive; fi
    sleep 3.5
    lsw init --rekey-ike --name c1 >"$WORK/rekey-ike.out" 2>&1 ||
        { cat "$WORK/rekey-ike.out" >&2; die "IKE rekey failed"; }
    sleep 3
    lsw_states "$WORK/states-2.txt"
    lsw_liveness
    sleep 0.5
    if [ "$nat" = 1 ]; then lsw_keepalive; fi
    sleep 4.5
    lsw_states "$WORK/states-3.txt"
    sw resp --list-sas >"$WORK/sas-resp.txt"
    lsw init --terminate --name c1 >"$WORK/terminate.out" 2>&1 ||
        { cat "$WORK/terminate.out" >&2; die "terminate failed"; }
    sleep 1
    lsw_states "$WORK/states-4.txt"
    sw resp --list-sas >"$WORK/sas-resp-after.txt"
}

# libreswan-nochild: pluto as configured (the CHILD_SA in IKE_AUTH), which
# fails to install the CHILD_SA, deletes the IKE_SA silently and revives
# (at once, then after 5 s, 10 s, 15 s, ...). Let it cycle for
# LSW_NOCHILD_SECS (default 17: four IKE_SAs), then stop pluto.
lsw_nochild_exchange() {
    local pid
    lsw_initiate --asynchronous
    sleep "${LSW_NOCHILD_SECS:-17}"
    lsw_states "$WORK/states-1.txt"
    sw resp --list-sas >"$WORK/sas-resp.txt"
    pid=$(cat "$WORK/init/pluto.pid")
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
    sleep 1
    sw resp --list-sas >"$WORK/sas-resp-after.txt"
}

# libreswan-rebind: pluto 4.10 sends nothing on an idle childless IKE_SA
# (no liveness, no NAT keepalive, see lsw_keepalive), so behind the NAT the
# UDP mapping of its 4500 expires and its next message on the same IKE_SA
# leaves from a new NAT source port. The NAT's conntrack UDP timeouts are
# cut to LSW_REBIND_UDP_TIMEOUT so that this takes seconds; the segw runs no
# DPD here (dpd_delay = 0s, see lsw_scenario), which would otherwise refresh
# the mapping from the other side. t after IKE_AUTH:
#   0        IKE_SA_INIT, IKE_AUTH (pluto, childless)
#   3        the NAT forgets both mappings (500's and 4500's)
#   5        liveness (pluto, whack --impair): from a new NAT port; the
#            segw answers to that port
#   6        terminate (pluto): DELETE, from the new port
lsw_rebind_exchange() {
    awk -v a="$LSW_REBIND_IDLE_SECS" -v b="$LSW_REBIND_UDP_TIMEOUT" 'BEGIN{exit !(a > b + 0.5)}' ||
        die "LSW_REBIND_IDLE_SECS ($LSW_REBIND_IDLE_SECS) must exceed LSW_REBIND_UDP_TIMEOUT ($LSW_REBIND_UDP_TIMEOUT)"
    ip netns exec "$NS_NAT" sysctl -qw \
        net.netfilter.nf_conntrack_udp_timeout="$LSW_REBIND_UDP_TIMEOUT" \
        net.netfilter.nf_conntrack_udp_timeout_stream="$LSW_REBIND_UDP_TIMEOUT"
    lsw init --impair omit-v2-ike-auth-child >"$WORK/impair.out" 2>&1 ||
        { cat "$WORK/impair.out" >&2; die "whack --impair omit-v2-ike-auth-child failed"; }
    lsw_initiate
    lsw_states "$WORK/states-1.txt"
    grep -q "STATE_V2_ESTABLISHED_IKE_SA" "$WORK/states-1.txt" ||
        { cat "$WORK/states-1.txt" "$WORK/init/pluto.log" >&2; die "no established IKE SA"; }
    sw resp --list-sas >"$WORK/sas-resp-1.txt"
    sleep "$LSW_REBIND_IDLE_SECS"
    lsw_liveness
    sw resp --list-sas >"$WORK/sas-resp-2.txt"
    say "  the segw's peer before the idle: $(grep -o 'remote .*' "$WORK/sas-resp-1.txt" | head -1)"
    say "  the segw's peer after the liveness: $(grep -o 'remote .*' "$WORK/sas-resp-2.txt" | head -1)"
    sleep 1
    lsw init --terminate --name c1 >"$WORK/terminate.out" 2>&1 ||
        { cat "$WORK/terminate.out" >&2; die "terminate failed"; }
    sleep 1
    lsw_states "$WORK/states-2.txt"
    sw resp --list-sas >"$WORK/sas-resp-after.txt"
}

# Experiments, no fixture:
# libreswan-idle: a childless IKE_SA behind the NAT left alone for
# LSW_IDLE_SECS (default 45): does pluto send liveness / NAT keepalives by
# itself?
lsw_idle_exchange() {
    lsw init --impair omit-v2-ike-auth-child >"$WORK/impair.out" 2>&1 || die "whack --impair failed"
    lsw_initiate
    sleep "${LSW_IDLE_SECS:-45}"
    lsw_states "$WORK/states-1.txt"
    lsw init --terminate --name c1 >"$WORK/terminate.out" 2>&1 || true
    sleep 1
}

# libreswan-noanswer: the segw's answers are dropped (nft, in its
# namespace, before r0) from a pluto liveness on: pluto's retransmit
# schedule, and what it does when retransmit-timeout expires (LSW_NOANSWER_SECS,
# default 75, > pluto's default 60 s).
lsw_noanswer_exchange() {
    lsw init --impair omit-v2-ike-auth-child >"$WORK/impair.out" 2>&1 || die "whack --impair failed"
    lsw_initiate
    sleep 1
    ip netns exec "$NS_RESP" nft -f - <<EOF
table ip sgwcap_drop {
    chain out {
        type filter hook output priority filter; policy accept;
        udp sport { 500, 4500 } drop
    }
}
EOF
    # whack waits for the exchange to finish (here: for pluto to give up).
    local sa
    sa=$(lsw_ike_serial)
    [ -n "$sa" ] || die "no established IKE SA"
    lsw init --impair "initiate-v2-liveness:$sa" >"$WORK/liveness.out" 2>&1 &
    sleep "${LSW_NOANSWER_SECS:-75}"
    wait "$!" || true
    lsw_states "$WORK/states-1.txt"
    sw resp --list-sas >"$WORK/sas-resp.txt"
}

# ike_msgs FILE: one line per IKE message:
# "time src dst msgid spii spir exchange[flags]" (src/dst as addr.port).
ike_msgs() {
    tcpdump -r "$1" -nn -tt -vv 2>/dev/null | awk '
        /^[0-9]+\.[0-9]+ / { t = $1; next }
        / cookie [0-9a-f]+->[0-9a-f]+:/ {
            sub(/:$/, "", $3)
            match($0, /msgid [0-9a-f]+/); m = substr($0, RSTART + 6, RLENGTH - 6)
            match($0, /cookie [0-9a-f]+->[0-9a-f]+/); c = substr($0, RSTART + 7, RLENGTH - 7); sub(/->/, " ", c)
            x = $NF; sub(/:$/, "", x)
            print t, $1, $3, m, c, x }'
}

# ep_port / ep_host LINE FIELD: port / address of field FIELD (addr.port) of
# an ike_msgs line.
ep_port() { awk -v i="$2" '{print $i}' <<<"$1" | sed 's/.*\.//'; }
ep_host() { awk -v i="$2" '{print $i}' <<<"$1" | sed 's/\.[0-9]*$//'; }

# verify_rebind FILE: libreswan-rebind: one IKE_SA, its messages in the
# expected order, and the NAT source port of pluto's 4500 changed across the
# idle (IKE_AUTH from one port, the liveness and the DELETE from another,
# the segw's answers to the new one) while the SPIs stayed the same.
verify_rebind() {
    local f=$1 n seq spis p_init p1 p2 t_auth t_live
    local -a m
    mapfile -t m < <(ike_msgs "$f")
    n=${#m[@]}
    seq=$(printf '%s\n' "${m[@]}" | awk '{printf "%s ", $7}')
    [ "$seq" = "ikev2_init[I] ikev2_init[R] ikev2_auth[I] ikev2_auth[R] inf2[I] inf2[R] inf2[I] inf2[R] " ] ||
        die "libreswan-rebind: unexpected IKE messages ($n): $seq"
    # One IKE_SA: one SPIi everywhere, one SPIr from the IKE_SA_INIT response on.
    spis=$(printf '%s\n' "${m[@]:1}" | awk '{print $5, $6}' | sort -u)
    [ "$(wc -l <<<"$spis")" -eq 1 ] || die "libreswan-rebind: more than one IKE SA: $spis"
    [ "$(awk '{print $5}' <<<"${m[0]}")" = "${spis%% *}" ] || die "libreswan-rebind: IKE_SA_INIT with another SPIi"
    p_init=$(ep_port "${m[0]}" 2); p1=$(ep_port "${m[2]}" 2); p2=$(ep_port "${m[4]}" 2)
    local i
    for i in 0 2 4 6; do
        [ "$(ep_host "${m[$i]}" 2)" = "$NAT_OUT" ] || die "libreswan-rebind: message $i not from the NAT $NAT_OUT"
    done
    [ "$(ep_port "${m[1]}" 3)" = "$p_init" ] || die "libreswan-rebind: IKE_SA_INIT response to another port"
    [ "$(ep_port "${m[3]}" 3)" = "$p1" ] || die "libreswan-rebind: IKE_AUTH response to another port"
    for i in 2 4 6; do [ "$(ep_port "${m[$i]}" 3)" = 4500 ] || die "libreswan-rebind: message $i not to 4500"; done
    [ "$p1" != 4500 ] && [ "$p2" != 4500 ] && [ "$p_init" != 500 ] || die "libreswan-rebind: source ports not rewritten"
    [ "$p1" != "$p2" ] ||
        die "libreswan-rebind: the source port did not change ($p1; the NAT may have picked the same one at random: 1 in 1000, run again)"
    [ "$(ep_port "${m[5]}" 3)" = "$p2" ] || die "libreswan-rebind: the liveness answer not to the new port $p2"
    [ "$(ep_port "${m[6]}" 2)" = "$p2" ] && [ "$(ep_port "${m[7]}" 3)" = "$p2" ] ||
        die "libreswan-rebind: the DELETE not on the new port $p2"
    t_auth=$(awk '{print $1}' <<<"${m[3]}"); t_live=$(awk '{print $1}' <<<"${m[4]}")
    awk -v a="$t_auth" -v b="$t_live" -v to="$LSW_REBIND_UDP_TIMEOUT" 'BEGIN{exit !(b - a > to)}' ||
        die "libreswan-rebind: idle shorter than the NAT timeout"
    say "  IKE SA $spis (SPIi SPIr) throughout; NAT source port of pluto's 4500: $p1 before, $p2 after $(awk -v a="$t_auth" -v b="$t_live" 'BEGIN{printf "%.3f", b-a}') s idle; IKE_SA_INIT from $p_init"
}

# verify_lsw NAME FILE: the libreswan capture holds what the tests rely on.
verify_lsw() {
    local name=$1 f=$2 c k ike_port=500
    c=$(counts "$f")
    case $name in libreswan-direct|libreswan-nat|libreswan-nochild|libreswan-rebind) ike_port="4500 (non-ESP marker)" ;; esac
    for k in "to   IKE_SA_INIT     request  \[I\] on 500" "from IKE_SA_INIT     response \[R\] on 500" \
             "to   IKE_AUTH        request  \[I\] on $ike_port" "from IKE_AUTH        response \[R\] on $ike_port"; do
        grep -q "$k" <<<"$c" || die "$name: no '$k' in the capture"
    done
    if grep -q " other: " <<<"$c"; then die "$name: unexpected packets: $(grep ' other: ' <<<"$c")"; fi
    if grep -q "ESP-in-UDP" <<<"$c"; then die "$name: ESP in a libreswan capture"; fi
    if tcpdump -r "$f" -nn 'ip proto 50' 2>/dev/null | grep -q .; then die "$name: raw ESP in the capture"; fi
    case $name in
    libreswan-nochild)
        local n
        n=$(grep -c "" < <(tcpdump -r "$f" -nn 2>/dev/null | grep 'ikev2_init\[I\]'))
        [ "$n" -ge 3 ] || die "$name: expected the IKE_SA_INITs of at least two revivals, saw $n"
        # pluto deletes each IKE_SA without a word on the wire.
        if grep -qE "INFORMATIONAL|CREATE_CHILD_SA" <<<"$c"; then die "$name: an exchange after IKE_AUTH"; fi
        [ "$(ike_spis "$f" | awk '{print $1}' | sort -u | wc -l)" -eq "$n" ] ||
            die "$name: expected a new initiator SPI for each IKE_SA_INIT"
        ;;
    libreswan-rebind)
        # No keepalive, no DPD, no rekey: nothing but pluto's exchanges.
        if grep -qE "NAT keepalive|CREATE_CHILD_SA|INFORMATIONAL   request  \[\]" <<<"$c"; then
            die "$name: unexpected traffic: $c"
        fi
        verify_rebind "$f"
        ;;
    *)
        for k in "to   CREATE_CHILD_SA request  \[I\] on $ike_port" "from CREATE_CHILD_SA response \[R\] on $ike_port" \
                 "to   INFORMATIONAL   request  \[I\] on $ike_port" "from INFORMATIONAL   response \[R\] on $ike_port" \
                 "from INFORMATIONAL   request  \[\] on $ike_port" "to   INFORMATIONAL   response \[IR\] on $ike_port"; do
            grep -q "$k" <<<"$c" || die "$name: no '$k' in the capture"
        done
        # Two IKE SAs (before/after the rekey), each with a responder SPI.
        [ "$(ike_spis "$f" | awk '$2 != "0000000000000000"' | sort -u | wc -l)" -eq 2 ] ||
            die "$name: expected exactly 2 IKE SAs: $(ike_spis "$f" | sort | uniq -c | tr '\n' ' ')"
        ;;
    esac
    if [ "$name" = libreswan-nofloat ]; then
        if tcpdump -r "$f" -nn 'udp port 4500' 2>/dev/null | grep -q .; then die "$name: traffic on 4500"; fi
    fi
    if [ "$name" = libreswan-nat ]; then
        grep -q "to   NAT keepalive" <<<"$c" || die "$name: no NAT keepalive in the capture"
        if tcpdump -r "$f" -nn 'udp and src host '"$NAT_OUT"' and (src port 500 or src port 4500)' 2>/dev/null | grep -q .; then
            die "$name: source ports were not rewritten"
        fi
        # One NAT mapping for 500, one for the float to 4500: exactly two
        # source ports, the IKE_SA_INIT's and the other for everything after.
        [ "$(tcpdump -r "$f" -nn 'udp and src host '"$NAT_OUT" 2>/dev/null | awk '{print $3}' | sort -u | wc -l)" -eq 2 ] ||
            die "$name: expected exactly two NAT source ports"
    fi
    say "  $name: verified"
}

# timeline FILE: every IKE message and keepalive, time since the first frame.
timeline() {
    tcpdump -r "$1" -nn -ttttt -vv 2>/dev/null | awk '
        /^ *[0-9][0-9]:[0-9][0-9]:/ { t = $1; next }
        / > .*(isakmp|keep-alive)/ { sub(/^ +/, ""); sub(/\[udp sum ok\] /, ""); sub(/:$/, ""); print "  " t, $0 }'
}

lsw_scenario() { # NAME TOPO INIT_ADDR MODE [RESP_LOAD]
    local name=$1 topo=$2 init_addr=$3 mode=$4 load=${5:-} pcap
    CUR=$name
    say "== $name"
    mkdir -p "$WORK/init" "$WORK/resp"
    "$topo"
    strongswan_conf resp "" "$load"
    # rebind: explicitly no DPD from the segw (charon's default anyway); its
    # DPD would refresh the NAT mapping from the segw's side.
    case $mode in
        childless) resp_swanctl "dpd_delay = $LSW_SEGW_DPD" ;;
        rebind)    resp_swanctl "dpd_delay = 0s" ;;
        *)         resp_swanctl ;;
    esac
    pluto_conf "$init_addr"
    start_charon "$NS_RESP" resp
    load_conf resp
    start_pluto "$NS_INIT" init
    pcap="$WORK/$name.pcap"
    start_capture "$pcap"
    case $mode in
        childless) lsw_exchange "$([ "$topo" = topo_nat ] && echo 1 || echo 0)" ;;
        nochild)   lsw_nochild_exchange ;;
        idle)      lsw_idle_exchange ;;
        noanswer)  lsw_noanswer_exchange ;;
        rebind)    lsw_rebind_exchange ;;
    esac
    stop_capture
    case $mode in
    childless|nochild|rebind)
        verify_lsw "$name" "$pcap"
        install -m 0644 "$pcap" "$OUT_DIR/$name.pcap"
        summary "$OUT_DIR/$name.pcap"
        ;;
    *)
        echo "--- $name (experiment, no fixture): counts"
        counts "$pcap"
        echo "--- timeline (time since the first frame)"
        timeline "$pcap"
        if [ "${KEEP_WORK:-0}" = 1 ]; then cp "$pcap" "$WORK/$name.kept.pcap"; fi
        ;;
    esac
    teardown
}

main() {
    local what=() w
    [ $# -gt 0 ] || set -- all
    for w in "$@"; do
        if [ "$w" = all ]; then
            what+=(direct nat steered libreswan-direct libreswan-nat libreswan-nofloat libreswan-nochild libreswan-rebind)
        else
            what+=("$w")
        fi
    done
    preflight "${what[@]}"
    mkdir -p "$OUT_DIR"
    WORK=$(mktemp -d /tmp/segwlb-capture.XXXXXX)
    swanctl_conf
    for w in "${what[@]}"; do
        case $w in
            direct)  scenario direct topo_direct "" "$INIT_DIRECT" ;;
            nat)     scenario nat topo_nat "" "$INIT_NATTED" ;;
            steered) scenario steered topo_direct "    spi_mask = $STEER_SPI_MASK
    spi_label = $STEER_SPI_LABEL
    spi_min = $STEER_SPI_MIN
    spi_max = $STEER_SPI_MAX" "$INIT_DIRECT" ;;
            multi)   run_multi ;;
            libreswan-direct)  lsw_scenario "$w" topo_direct "$INIT_DIRECT" childless ;;
            libreswan-nat)     lsw_scenario "$w" topo_nat "$INIT_NATTED" childless ;;
            # The segw without kernel-libipsec fakes no NAT: pluto's own
            # choice of ports without a NAT (needs no kernel SA, childless).
            libreswan-nofloat) lsw_scenario "$w" topo_direct "$INIT_DIRECT" childless \
                                   "${STRONGSWAN_LOAD/kernel-libipsec /}" ;;
            libreswan-nochild) lsw_scenario "$w" topo_direct "$INIT_DIRECT" nochild ;;
            libreswan-rebind)  lsw_scenario "$w" topo_nat "$INIT_NATTED" rebind ;;
            libreswan-idle)    lsw_scenario "$w" topo_nat "$INIT_NATTED" idle ;;
            libreswan-noanswer) lsw_scenario "$w" topo_direct "$INIT_DIRECT" noanswer ;;
            *) die "unknown scenario $w (direct|nat|steered|multi|libreswan-direct|libreswan-nat|libreswan-nofloat|libreswan-nochild|libreswan-rebind|libreswan-idle|libreswan-noanswer|all)" ;;
        esac
    done
}

main "$@"
