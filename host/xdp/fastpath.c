// SPDX-License-Identifier: GPL-2.0
//
// segwlb's XDP fast path: forwards what the balancer core has already
// decided, and nothing else. For a frame of an established tunnel it
// rewrites the two MACs and redirects to the egress port; every other frame
// (ARP, NDP, IKE on 500, fragments, ICMP, VLAN tags, IP options, misses,
// anything unrecognised) is passed to the stack unchanged, where segwlb's
// AF_PACKET sockets give it to the core. The host writes the maps from the
// core's own lookups (host/src/fastpath/), so a hit here is the core's
// answer for that frame.
//
// Lookups, by direction (the port a frame came in on says which):
//   from the uplink  ESP in UDP by source (address, port), raw ESP by
//                    source address
//   from a segw      ESP in UDP by destination (address, port), raw ESP by
//                    destination address, only from the tunnel's segw
// IKE, on 500 or 4500, is always the core's: from the initiator it can
// prove a tunnel and move its next hop, from a segw it teaches SPIs.
// With SPI-range steering, ESP from the uplink whose SPI a segw's range
// owns is forwarded only if that segw is the tunnel's (and counted as
// steered); the core decides the rest (it overrules the SPI, and counts
// that).
// Per tunnel, each way: frames and bytes (IP length, as the core counts),
// in an array segwlb maps into its memory and reads without a syscall.
//
// Built by host/build.rs: clang -O2 -target bpf.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// A source or destination: the address as 16 bytes (IPv4 mapped into
// ::ffff:0:0/96), the UDP port in network order (0 for raw ESP).
struct endpoint {
	__u8 addr[16];
	__u16 port;
	__u16 pad;
};

// Where a tunnel's frames go, and what they must look like to go there.
struct forward {
	__u32 tunnel;   // its slot: the index into `stats`
	__u32 tx;       // the egress port: a key of `tx_ports`
	__u32 from;     // the ifindex frames must come in on (0: any)
	__u8 dst[6];    // rewritten destination MAC
	__u8 src[6];    // rewritten source MAC (the egress port's own)
};

// Per tunnel; [0] towards the segw, [1] back to the peer. Shared by the
// CPUs (atomic adds), a cache line each so that two CPUs counting two
// tunnels do not contend for one line.
struct tunnel_stats {
	__u64 frames[2];
	__u64 bytes[2];
	__u64 steered; // of frames[0]: an SPI range spoke for the segw
	__u64 pad[3];
};

// Config: [0] the uplink's ifindex.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} config SEC(".maps");

// Each port's own MAC, by ifindex: a frame not sent to it is not ours to
// balance (the core's `not_for_us`).
struct port_mac {
	__u8 mac[6];
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, struct port_mac);
} port_macs SEC(".maps");

// Sized by the loader from the balancer's max_tunnels; allocated as used.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct endpoint);
	__type(value, struct forward);
} up SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct endpoint);
	__type(value, struct forward);
} down SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} tx_ports SEC(".maps");

// Indexed by tunnel slot; mmapable, so that reading every tunnel's
// counters costs the host memory reads, not a lookup syscall per tunnel.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1 << 16);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct tunnel_stats);
} stats SEC(".maps");

// The healthy segws' ESP SPI ranges in the core's order (the first that
// owns an SPI speaks for it), ended by an unused slot. `port` is the
// segw's egress port, as `forward.tx`.
#define MAX_SPI_RANGES 16

struct spi_range {
	__u32 min;
	__u32 max;
	__u32 port;
	__u32 used;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SPI_RANGES);
	__type(key, __u32);
	__type(value, struct spi_range);
} spi_ranges SEC(".maps");

#define NON_ESP_MARKER 0
#define IKE_PORT 500
#define IKE_NAT_T_PORT 4500
#define PROTO_ESP 50

// Set by a test's loader (`FastPath::load_traced`), before the verifier
// sees the program: record where each redirect goes, which
// BPF_PROG_TEST_RUN does not say. 0 in production, where the verifier,
// reading it from the frozen .rodata, drops the recording altogether.
const volatile __u32 trace_redirects = 0;

// [0]: the ifindex of the last redirect's devmap entry (traced only).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} redirected SEC(".maps");

static __always_inline void map_v4(__u8 out[16], __u32 addr)
{
	__builtin_memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(&out[12], &addr, 4);
}

// (memcmp would be a call the loader cannot resolve.)
static __always_inline int same_mac(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] &&
	       a[4] == b[4] && a[5] == b[5];
}

// The port of the segw whose range owns `spi` (host order), plus one; 0
// for none.
static __always_inline __u32 spi_owner(__u32 spi)
{
#pragma clang loop unroll(full)
	for (__u32 i = 0; i < MAX_SPI_RANGES; i++) {
		__u32 k = i;
		struct spi_range *r = bpf_map_lookup_elem(&spi_ranges, &k);
		if (!r || !r->used)
			return 0;
		if (spi >= r->min && spi <= r->max)
			return r->port + 1;
	}
	return 0;
}

// `spi` in network order; `way` 0 is towards the segw.
static __always_inline int forward(struct xdp_md *ctx, struct ethhdr *eth,
				   struct forward *f, __u32 ip_len, int way,
				   __u32 spi)
{
	if (f->from && f->from != ctx->ingress_ifindex)
		return XDP_PASS; // not the tunnel's segw: the core decides
	__u32 owner = way == 0 ? spi_owner(bpf_ntohl(spi)) : 0;
	if (owner && owner - 1 != f->tx)
		return XDP_PASS; // the SPI speaks for another segw: the core's
	// Resolved before anything is touched: with no devmap entry (its
	// interface went away) the helper falls back to XDP_PASS, and the
	// frame must then reach the core as it came, uncounted.
	long action = bpf_redirect_map(&tx_ports, f->tx, XDP_PASS);
	if (action != XDP_REDIRECT)
		return XDP_PASS;
	if (trace_redirects) {
		__u32 zero = 0;
		__u32 *to = bpf_map_lookup_elem(&tx_ports, &f->tx);
		__u32 *slot = bpf_map_lookup_elem(&redirected, &zero);
		if (slot)
			*slot = to ? *to : 0;
	}
	struct tunnel_stats *s = bpf_map_lookup_elem(&stats, &f->tunnel);
	if (s) {
		__sync_fetch_and_add(&s->frames[way], 1);
		__sync_fetch_and_add(&s->bytes[way], ip_len);
		if (owner)
			__sync_fetch_and_add(&s->steered, 1);
	}
	__builtin_memcpy(eth->h_dest, f->dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, f->src, ETH_ALEN);
	return action;
}

SEC("xdp")
int segwlb_fastpath(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return XDP_PASS;

	__u32 zero = 0;
	__u32 *uplink = bpf_map_lookup_elem(&config, &zero);
	if (!uplink || !*uplink)
		return XDP_PASS;
	int from_uplink = ctx->ingress_ifindex == *uplink;
	__u32 ingress = ctx->ingress_ifindex;
	struct port_mac *mine = bpf_map_lookup_elem(&port_macs, &ingress);
	if (!mine || !same_mac(eth->h_dest, mine->mac))
		return XDP_PASS;

	// The IP packet's length, and its payload's: the core parses by
	// these, not by the frame, which a NIC pads to 60 bytes and more.
	struct endpoint key = {};
	__u8 proto;
	__u32 ip_len;
	__u32 l4_len;
	void *l4;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return XDP_PASS;
		// Version 4 only (the core's parser refuses another as
		// malformed); no options, no fragments (a piece goes where its
		// first went: the core's fragment table decides).
		if (ip->version != 4 || ip->ihl != 5 ||
		    (ip->frag_off & bpf_htons(0x3fff)))
			return XDP_PASS;
		proto = ip->protocol;
		ip_len = bpf_ntohs(ip->tot_len);
		if (ip_len < sizeof(*ip) || (void *)ip + ip_len > end)
			return XDP_PASS; // cut short or nonsense: the core drops it
		l4_len = ip_len - sizeof(*ip);
		map_v4(key.addr, from_uplink ? ip->saddr : ip->daddr);
		l4 = ip + 1;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end || ip6->version != 6)
			return XDP_PASS;
		// Extension headers (a fragment header among them): the core.
		proto = ip6->nexthdr;
		l4_len = bpf_ntohs(ip6->payload_len);
		ip_len = sizeof(*ip6) + l4_len;
		if ((void *)ip6 + ip_len > end)
			return XDP_PASS; // cut short: the core drops it
		__builtin_memcpy(key.addr,
				 from_uplink ? ip6->saddr.in6_u.u6_addr8 : ip6->daddr.in6_u.u6_addr8,
				 16);
		l4 = ip6 + 1;
	} else {
		return XDP_PASS;
	}

	struct forward *f;
	if (proto == PROTO_ESP) {
		__u32 *spi = l4;
		if (l4_len < 4 || (void *)(spi + 1) > end)
			return XDP_PASS; // no SPI: the core drops it, counted
		f = bpf_map_lookup_elem(from_uplink ? (void *)&up : (void *)&down, &key);
		return f ? forward(ctx, eth, f, ip_len, !from_uplink, *spi) : XDP_PASS;
	}
	if (proto != IPPROTO_UDP)
		return XDP_PASS;
	struct udphdr *udp = l4;
	if ((void *)(udp + 1) > end)
		return XDP_PASS;
	// The core's reading (packet::classify_udp), whichever way the
	// frame goes: the first of the destination and source ports that is
	// 500 or 4500 says what the datagram is. Only 4500 can be ESP; IKE
	// on 500 and the rest are the core's (a segw's 4500 → peer:500 is
	// IKE on 500 to it).
	__u16 ike = udp->dest == bpf_htons(IKE_PORT) || udp->dest == bpf_htons(IKE_NAT_T_PORT) ?
			    udp->dest :
			    udp->source;
	if (ike != bpf_htons(IKE_NAT_T_PORT))
		return XDP_PASS;
	key.port = from_uplink ? udp->source : udp->dest;
	// ESP in UDP has an SPI and a sequence number at least; shorter is a
	// NAT keepalive (one byte) or a runt the core drops.
	__u32 *marker = (void *)(udp + 1);
	if (l4_len < sizeof(*udp) + 8 || (void *)(marker + 1) > end)
		return XDP_PASS;
	// IKE (the non-ESP marker) proves tunnels and teaches SPIs: the core's.
	if (*marker == NON_ESP_MARKER)
		return XDP_PASS;
	f = bpf_map_lookup_elem(from_uplink ? (void *)&up : (void *)&down, &key);
	// ESP in UDP: the SPI is where the marker would be.
	return f ? forward(ctx, eth, f, ip_len, !from_uplink, *marker) : XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
