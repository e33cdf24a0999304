// {{name}}: a segwlb balancing policy, in JavaScript.
//
// Build it into a component (componentize-js, installed by
// `scripts/setup.sh --polyglot`):
//
//     segwlb policy build policy.js
//
// The contract is wit/policy.wit (world `policy`): the host calls
// `configure` once with the `[policy.params]` of the config, `setGateways`
// whenever the gateway set changes, and `choose` for each NEW tunnel
// (existing tunnels stay where they are without asking). This starting point
// spreads new tunnels over the gateways that take them by a hash of the
// tunnel's outer address and port, the same hash as the Rust SDK's
// `TunnelKey::endpoint_hash`.
//
// What to know about JS policies (componentize-js, StarlingMonkey engine):
// - export an object named `balancer` (the exported interface) with
//   `configure`, `setGateways` and `choose`; import the host's log as
//   `import { log } from 'segwlb:policy/log@0.3.0'`; a load-aware policy
//   reads the live tunnel count of a gateway inside `choose` with
//   `import { tunnels } from 'segwlb:policy/load@0.3.0'` (`tunnels(id)`, a
//   BigInt; one call into the host each), and its `capacity` (0: no limit)
//   comes with the set;
// - u32 values are Numbers, u64 values BigInts (`tunnels`, `ikeSpi`, IPv6
//   halves): do 64-bit arithmetic in BigInt with BigInt.asUintN(64, ...);
//   `peer` is {tag: 'v4', val: Number} or {tag: 'v6', val: [BigInt, BigInt]};
//   an absent option is `undefined`;
// - `configure` reports a bad config by throwing a string; any exception
//   escaping `choose` is a trap: the host counts it and places the tunnel
//   itself;
// - a policy is sandboxed and built with every optional engine feature off:
//   no fetch (calling it traps), no timers, no performance.now() (traps);
//   Math.random() and Date.now() are fixed at build time. Decide from the
//   parameters, the gateway set and the key only.

import { log } from 'segwlb:policy/log@0.3.0';

// ----------------------------------------------------------------- hashing

const u64 = (x) => BigInt.asUintN(64, x);

/** SplitMix64's finaliser, as the Rust SDK's hash::mix. */
function mix(z) {
  z = u64((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n);
  z = u64((z ^ (z >> 27n)) * 0x94d049bb133111ebn);
  return z ^ (z >> 31n);
}

/** Hash a sequence of u64 words (BigInts), as hash::words. */
function words(ws) {
  let h = 0x243f6a8885a308d3n;
  for (const w of ws) h = mix(h ^ mix(u64(w)));
  return h;
}

/** The tunnel's outer address and UDP port, as TunnelKey::endpoint_hash. */
function endpointHash(key) {
  const [family, hi, lo] =
    key.peer.tag === 'v4'
      ? [4n, 0n, BigInt(key.peer.val >>> 0)]
      : [6n, key.peer.val[0], key.peer.val[1]];
  return words([family, hi, lo, BigInt(key.peerPort)]);
}

// ------------------------------------------------------------------ policy

// Ids of the gateways that take new tunnels, in the host's order; undefined
// until `configure` succeeded (then `choose` answers none and the host
// decides).
let members;

/** Healthy, not draining, weight > 0: the host refuses any other answer. */
const takesNewTunnels = (g) => g.healthy && !g.draining && g.weight > 0;

export const balancer = {
  configure(params) {
    const accepted = []; // e.g. ['spread'], then read it below
    for (const [key, value] of params) {
      // To take a parameter: `if (key === 'spread') spread = Number(value);`
      // (throw a message naming it when the value is bad).
      if (!accepted.includes(key)) {
        const takes = accepted.length ? accepted.join(', ') : 'none';
        throw `unknown parameter \`${key}\`: this policy takes ${takes}`;
      }
    }
    members = [];
  },

  setGateways(gateways) {
    if (members === undefined) return;
    members = gateways.filter(takesNewTunnels).map((g) => g.id);
    if (members.length === 0) log('warn', '{{name}}: no gateway takes new tunnels');
  },

  choose(key) {
    if (!members || members.length === 0) return undefined;
    return members[Number(endpointHash(key) % BigInt(members.length))];
  },
};
