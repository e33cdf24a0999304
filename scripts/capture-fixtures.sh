#!/usr/bin/env bash
# Capture real strongSwan IKEv2 / ESP-in-UDP traffic as test fixtures.
#
#   scripts/capture-fixtures.sh [direct|nat|steered|multi|all]...   (default: all)
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
#   all      direct nat steered
#
# Needs root, iproute2, ethtool, nftables, tcpdump, strongswan-charon,
# strongswan-swanctl, libcharon-extra-plugins (kernel-libipsec). Everything it
# creates (namespaces, veths inside them, charon and tcpdump processes, a work
# directory) is removed on exit, also on failure. Addresses are documentation
# / private ranges that exist only inside its namespaces.
#
# Environment: OUT_DIR (default tests/fixtures of this repository),
# NS_PREFIX (default sgwcap-), KEEP_WORK=1 to keep the work directory (logs,
# configurations) for inspection.
set -euo pipefail

say() { printf 'capture: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT_DIR:-$REPO/tests/fixtures}
NS_PREFIX=${NS_PREFIX:-sgwcap-}
CHARON=${CHARON:-/usr/lib/ipsec/charon}

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

preflight() {
    [ "$(id -u)" -eq 0 ] || die "must run as root"
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
strongswan_conf() {
    local name=$1 extra=${2:-}
    cat >"$WORK/$name/strongswan.conf" <<EOF
charon {
    # kernel-libipsec (userland ESP over a TUN device) before kernel-netlink,
    # which still does addresses and routes.
    load = random nonce openssl pem pkcs1 x509 pubkey hmac sha1 sha2 aes gmp kdf kernel-libipsec kernel-netlink socket-default vici
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

resp_swanctl() {
    cat >"$WORK/resp/swanctl.conf" <<EOF
connections {
    segw {
        version = 2
        local_addrs = $VIP
        remote_addrs = %any
        proposals = aes128-sha256-modp2048
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
counts() {
    tcpdump -r "$1" -nn 2>/dev/null | awk -v vip="$VIP" '
        { d = ($5 ~ "^" vip "\\.") ? "to  " : "from" }
        / ARP, / { n["ARP"]++; next }
        /isakmp/ && match($0, /[a-z0-9_]+\[[IVR]*\]/) {
            x = substr($0, RSTART, RLENGTH); split(x, p, "[")
            e = p[1]; fl = p[2]; sub(/\]/, "", fl)
            if (e == "ikev2_init") e = "IKE_SA_INIT"; else if (e == "ikev2_auth") e = "IKE_AUTH"
            else if (e == "child_sa") e = "CREATE_CHILD_SA"; else if (e == "inf2") e = "INFORMATIONAL"
            k = (fl ~ /R/) ? "response" : "request"
            port = ($0 ~ /NONESP-encap/) ? "4500 (non-ESP marker)" : "500"
            n[sprintf("%s %-15s %-8s [%s] on %s", d, e, k, fl, port)]++; next }
        /UDP-encap: ESP/ { n[d " ESP-in-UDP on 4500"]++; next }
        /keep-alive/ { n[d " NAT keepalive (0xff) on 4500"]++; next }
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

main() {
    local what=() w
    [ $# -gt 0 ] || set -- all
    for w in "$@"; do
        if [ "$w" = all ]; then what+=(direct nat steered); else what+=("$w"); fi
    done
    preflight
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
            *) die "unknown scenario $w (direct|nat|steered|multi|all)" ;;
        esac
    done
}

main "$@"
