// Consistent hashing with a Maglev lookup table, in JavaScript: a
// bit-identical port of plugins/consistent-hash (and of the SDK's hash.rs,
// table.rs and params.rs pieces it uses). For the same parameters, gateway
// set and key it answers exactly what the Rust policy answers.
//
// Every gateway that takes new tunnels fills slots of a table of prime size
// M, each in its own pseudo-random order (offset and skip from its *name*),
// taking turns until the table is full. A tunnel goes to
// `table[endpoint_hash(key) % M]`.
//
// Parameter: `table-size` (prime ≥ 101, default 65537). When the set grows
// past M/100 gateways the policy switches to the next prime above 100·N and
// says so in the log.
//
// Build (from the repo root, after `scripts/setup.sh --polyglot`):
//
//     scripts/build-polyglot.sh            # all examples into policies/
//
// or by hand:
//
//     .tools/node/node_modules/.bin/componentize-js \
//         examples/policies/js-consistent-hash/policy.js \
//         -w wit -n policy -d stdio random clocks http fetch-event \
//         -o policies/js-consistent-hash.wasm
//
// How componentize-js maps the contract (world `policy` in wit/policy.wit):
// - imports are ES imports from the versioned interface name:
//   `import { log } from 'segwlb:policy/log@0.3.0'`; an enum is its case
//   name as a string ('warn');
// - the exported interface is an exported object named after it
//   (`balancer`) whose methods are the functions in camelCase
//   (`configure`, `setGateways`, `choose`);
// - u32 is a Number, u64 a BigInt; records are objects with camelCase
//   fields (`peerPort`, `ikeSpi`, `openedBy`); `ip-address` is
//   `{tag: 'v4', val: Number}` or `{tag: 'v6', val: [BigInt, BigInt]}`;
//   `option<T>` is the value or `undefined`;
// - `result<_, string>`: return normally for ok, `throw "message"` for err.
//   Any other uncaught exception traps.
//
// check.mjs (beside this file) checks the arithmetic under plain Node.

import { log } from 'segwlb:policy/log@0.3.0';

// ---------------------------------------------------------------- hash.rs

const U64 = (x) => BigInt.asUintN(64, x);

/** SplitMix64's finaliser (hash::mix): a bijective 64-bit mix. BigInt in, BigInt out. */
export function mix(z) {
  z = U64((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n);
  z = U64((z ^ (z >> 27n)) * 0x94d049bb133111ebn);
  return z ^ (z >> 31n);
}

/** Hash a sequence of u64 words (hash::words). */
export function words(ws) {
  let h = 0x243f6a8885a308d3n;
  for (const w of ws) h = mix(h ^ mix(U64(BigInt(w))));
  return h;
}

/** The UTF-8 bytes of a string, as Rust's `str::bytes()` sees them. */
export function utf8(s) {
  const out = [];
  for (const ch of s) {
    const c = ch.codePointAt(0);
    if (c < 0x80) out.push(c);
    else if (c < 0x800) out.push(0xc0 | (c >> 6), 0x80 | (c & 0x3f));
    else if (c < 0x10000) out.push(0xe0 | (c >> 12), 0x80 | ((c >> 6) & 0x3f), 0x80 | (c & 0x3f));
    else
      out.push(
        0xf0 | (c >> 18),
        0x80 | ((c >> 12) & 0x3f),
        0x80 | ((c >> 6) & 0x3f),
        0x80 | (c & 0x3f),
      );
  }
  return out;
}

/** FNV-1a of the name's bytes, then mixed with a seed (hash::str_seeded). */
export function strSeeded(s, seed) {
  let fnv = 0xcbf29ce484222325n;
  for (const b of utf8(s)) fnv = U64((fnv ^ BigInt(b)) * 0x100000001b3n);
  return mix(fnv ^ mix(BigInt(seed)));
}

/**
 * TunnelKey::endpoint_hash: words([family, hi, lo, port]) of the peer.
 * v4: family 4, hi 0, lo the u32; v6: family 6, hi/lo the u64 halves.
 */
export function endpointHash(key) {
  const peer = key.peer;
  let family, hi, lo;
  if (peer.tag === 'v4') {
    [family, hi, lo] = [4n, 0n, BigInt(peer.val >>> 0)];
  } else {
    [family, hi, lo] = [6n, U64(BigInt(peer.val[0])), U64(BigInt(peer.val[1]))];
  }
  return words([family, hi, lo, BigInt(key.peerPort)]);
}

// --------------------------------------------------------------- table.rs

export const DEFAULT_SIZE = 65537;
const U32_MAX = 0xffffffff;

export function isPrime(n) {
  if (n < 2) return false;
  // n < 2^32, so d*d stays exact in a Number.
  for (let d = 2; d * d <= n; d++) if (n % d === 0) return false;
  return true;
}

export function nextPrime(from) {
  for (let n = from; n <= U32_MAX; n++) if (isPrime(n)) return n;
  return DEFAULT_SIZE;
}

/** Check a configured size: a prime ≥ 101. */
function validate(size) {
  if (size < 101 || !isPrime(size)) {
    throw `parameter \`table-size\` = ${size}: must be a prime ≥ 101`;
  }
  return size;
}

/** The configured size while it is over 100 per gateway, else the next prime above 100·N. */
export function sizeFor(configured, members) {
  if (configured > 100 * members) return configured;
  // Rust computes 100 * (members as u32) in u32; beyond 42 million
  // gateways it would overflow, which no host gets near.
  const grown = nextPrime(100 * members + 1);
  log('warn', `${members} gateways outgrow table-size ${configured}: using ${grown}`);
  return grown;
}

// -------------------------------------------------------------- params.rs

// Rust's char::is_whitespace (Unicode White_Space), which str::trim uses;
// not quite JavaScript's trim (which adds U+FEFF and lacks U+0085).
const RUST_WS = new Set([
  0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x20, 0x85, 0xa0, 0x1680, 0x2000, 0x2001, 0x2002, 0x2003,
  0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200a, 0x2028, 0x2029, 0x202f, 0x205f,
  0x3000,
]);

function rustTrim(s) {
  const cs = Array.from(s);
  let a = 0;
  let b = cs.length;
  while (a < b && RUST_WS.has(cs[a].codePointAt(0))) a++;
  while (b > a && RUST_WS.has(cs[b - 1].codePointAt(0))) b--;
  return cs.slice(a, b).join('');
}

/** Rust's `{:?}` of a str, close enough for messages. */
function rustDebug(s) {
  let out = '"';
  for (const ch of s) {
    const c = ch.codePointAt(0);
    if (ch === '"') out += '\\"';
    else if (ch === '\\') out += '\\\\';
    else if (ch === '\n') out += '\\n';
    else if (ch === '\r') out += '\\r';
    else if (ch === '\t') out += '\\t';
    else if (c === 0) out += '\\0';
    else if (c < 0x20 || c === 0x7f) out += `\\u{${c.toString(16)}}`;
    else out += ch;
  }
  return out + '"';
}

/** `<u32 as FromStr>::from_str`, with Rust's error texts. */
function parseU32(src) {
  if (src.length === 0) throw 'cannot parse integer from empty string';
  let digits = src;
  if (src === '+' || src === '-') throw 'invalid digit found in string';
  if (src[0] === '+') digits = src.slice(1);
  let n = 0;
  for (const ch of digits) {
    if (ch < '0' || ch > '9') throw 'invalid digit found in string';
    n = n * 10 + (ch.charCodeAt(0) - 48);
    if (n > U32_MAX) throw 'number too large to fit in target type';
  }
  return n;
}

/** The SDK's Params: take keys with get(), then finish() rejects leftovers. */
class Params {
  constructor(pairs) {
    this.pairs = pairs.map(([k, v]) => [k, v]);
  }

  /** Remove `key` (first occurrence) and parse it; undefined when absent. */
  getU32(key) {
    const i = this.pairs.findIndex(([k]) => k === key);
    if (i < 0) return undefined;
    // Vec::swap_remove: the last pair takes the removed one's place, which
    // decides which leftover key finish() names first.
    const [, raw] = this.pairs[i];
    const last = this.pairs.pop();
    if (i < this.pairs.length) this.pairs[i] = last;
    try {
      return parseU32(rustTrim(raw));
    } catch (e) {
      throw `parameter \`${key}\` = ${rustDebug(raw)}: ${e}`;
    }
  }

  finish(accepted) {
    if (this.pairs.length === 0) return;
    const k = this.pairs[0][0];
    if (accepted.length === 0) throw `unknown parameter \`${k}\`: this policy takes none`;
    throw `unknown parameter \`${k}\`: this policy takes ${accepted.join(', ')}`;
  }
}

// ------------------------------------------------------- consistent-hash

function takesNewTunnels(g) {
  return g.healthy && !g.draining && g.weight > 0;
}

/** Rust's Ord for (String, u32): the name's UTF-8 bytes, then the id. */
function byNameThenId(a, b) {
  const x = a.bytes;
  const y = b.bytes;
  const n = Math.min(x.length, y.length);
  for (let i = 0; i < n; i++) if (x[i] !== y[i]) return x[i] - y[i];
  if (x.length !== y.length) return x.length - y.length;
  return a.id - b.id;
}

/**
 * Maglev population: gateways take turns claiming their next preferred free
 * slot until all `m` slots are claimed. `members` are {id, name}.
 */
export function maglevTable(members, m) {
  if (members.length === 0) return new Uint32Array(0);
  // u32::MAX marks a free slot, as in Rust (so a gateway whose id is
  // u32::MAX behaves exactly as it does there).
  const EMPTY = U32_MAX;
  const mBig = BigInt(m);
  // slot[i] = (offset + next[i]·skip) % m, kept incrementally: one step is
  // slot = (slot + skip) % m, which stays below 2m < 2^33 and so is exact
  // in a Number (offset + next·skip itself may pass 2^53 for large m).
  const skip = new Array(members.length);
  const slot = new Array(members.length);
  members.forEach((g, i) => {
    const offset = Number(strSeeded(g.name, 0xa5a5) % mBig);
    skip[i] = Number((strSeeded(g.name, 0x5a5a) % (mBig - 1n)) + 1n);
    slot[i] = offset;
  });
  const slots = new Uint32Array(m).fill(EMPTY);
  let filled = 0;
  for (;;) {
    for (let i = 0; i < members.length; i++) {
      let s = slot[i];
      while (slots[s] !== EMPTY) s = (s + skip[i]) % m;
      slots[s] = members[i].id;
      slot[i] = (s + skip[i]) % m;
      filled += 1;
      if (filled === m) return slots;
    }
  }
}

class ConsistentHash {
  constructor(configuredSize) {
    this.configuredSize = validate(configuredSize);
    /** Gateway id per slot; empty when no gateway takes tunnels. */
    this.table = new Uint32Array(0);
  }

  static configure(pairs) {
    const params = new Params(pairs);
    const size = params.getU32('table-size') ?? DEFAULT_SIZE;
    params.finish(['table-size']);
    return new ConsistentHash(size);
  }

  setGateways(gateways) {
    const members = gateways
      .filter(takesNewTunnels)
      .map((g) => ({ id: g.id, name: g.name, bytes: utf8(g.name) }));
    // The fill order decides ties between gateways: make it depend on
    // names only, never on the host's ordering of the set.
    members.sort(byNameThenId);
    const size = sizeFor(this.configuredSize, members.length);
    this.table = maglevTable(members, size);
  }

  choose(key) {
    if (this.table.length === 0) return undefined;
    const slot = Number(endpointHash(key) % BigInt(this.table.length));
    return this.table[slot];
  }
}

// ------------------------------------------------------------ the export

// Like the Rust SDK's slot: no policy until `configure` succeeds; a failed
// `configure` leaves the previous one in place.
let policy;

export const balancer = {
  configure(params) {
    policy = ConsistentHash.configure(params);
  },
  setGateways(gateways) {
    if (policy) policy.setGateways(gateways);
  },
  choose(key) {
    return policy ? policy.choose(key) : undefined;
  },
};
